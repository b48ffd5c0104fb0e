package nftables

import (
	"fmt"
	"sort"

	"golang.org/x/sys/unix"

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
// claim is theirs to read: Upstream, the iptables backend). The kernel can only list every
// chain of a family (pkg/nft BaseChains), so its cost follows the ruleset's chain count
// (~3 ms for 12,000), not portguard's claims; CHECK and doctor pay it, ADD and DEL do not.
func (t *Table) EarlierNAT() ([]NATChain, error) {
	chains, err := t.nl.BaseChains(unix.NFPROTO_UNSPEC)
	if err != nil {
		return nil, err
	}
	var out []NATChain
	for _, c := range chains {
		var fams []hostport.Family
		switch c.Family {
		case unix.NFPROTO_IPV4:
			fams = []hostport.Family{hostport.V4}
		case unix.NFPROTO_IPV6:
			fams = []hostport.Family{hostport.V6}
		case unix.NFPROTO_INET:
			fams = hostport.Families
		default:
			continue
		}
		if c.Type != "nat" || c.Family == unix.NFPROTO_INET && c.Table == TableName {
			continue
		}
		var hook string
		switch c.Hook {
		case unix.NF_INET_PRE_ROUTING:
			hook = "prerouting"
		case unix.NF_INET_LOCAL_OUT:
			hook = "output"
		default:
			continue
		}
		if int(c.Priority) >= PriorityDNAT {
			continue
		}
		out = append(out, NATChain{Families: fams, Table: c.Table, Chain: c.Name, Hook: hook, Priority: int(c.Priority)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].String() < out[j].String() })
	return out, nil
}
