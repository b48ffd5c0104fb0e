package nftables

import (
	"fmt"
	"sort"

	gnft "github.com/google/nftables"

	"github.com/portguard/portguard/pkg/hostport"
)

// NATChain is a nat base chain of another table on a hook where portguard DNATs.
type NATChain struct {
	Families []hostport.Family // the families whose packets it sees (inet: both)
	Table    string
	Chain    string
	Hook     string // "prerouting" or "output"
	Priority int
}

func (c NATChain) String() string {
	return fmt.Sprintf("%s %s/%s priority %d", c.Hook, c.Table, c.Chain, c.Priority)
}

// EarlierNAT lists the nat base chains of other tables on prerouting and output that run
// before portguard's (priority below PriorityDNAT): kube-proxy's and iptables' nat (by
// design), upstream's cni_hostport, anything foreign. A DNAT there for a claimed port wins
// over the claim, so CHECK and doctor report what they find here (whose rules match a
// claim is theirs to read: Upstream, the iptables backend). It dumps every chain of the
// ruleset: for CHECK and doctor, not for ADD.
func (t *Table) EarlierNAT() ([]NATChain, error) {
	chains, err := t.g.ListChains()
	if err != nil {
		return nil, fmt.Errorf("list chains: %w", err)
	}
	var out []NATChain
	for _, c := range chains {
		if c.Type != gnft.ChainTypeNAT || c.Hooknum == nil || c.Priority == nil || c.Table == nil {
			continue
		}
		if c.Table.Family == gnft.TableFamilyINet && c.Table.Name == TableName {
			continue
		}
		var hook string
		switch *c.Hooknum {
		case *gnft.ChainHookPrerouting:
			hook = "prerouting"
		case *gnft.ChainHookOutput:
			hook = "output"
		default:
			continue
		}
		if int(*c.Priority) >= PriorityDNAT {
			continue
		}
		var fams []hostport.Family
		switch c.Table.Family {
		case gnft.TableFamilyIPv4:
			fams = []hostport.Family{hostport.V4}
		case gnft.TableFamilyIPv6:
			fams = []hostport.Family{hostport.V6}
		case gnft.TableFamilyINet:
			fams = hostport.Families
		default:
			continue
		}
		out = append(out, NATChain{Families: fams, Table: c.Table.Name, Chain: c.Name, Hook: hook, Priority: int(*c.Priority)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].String() < out[j].String() })
	return out, nil
}
