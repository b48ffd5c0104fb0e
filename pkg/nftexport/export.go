// Package nftexport writes the nftables backend's claims in upstream portmap's formats, for
// a downgrade: upstream's nftables backend (tables ip/ip6 cni_hostport, one rule per
// mapping, commented with the container ID) or its iptables backend (CNI-HOSTPORT-DNAT and
// CNI-DN-<hash> chains, written by portguard's iptables backend, which is upstream's format).
// Upstream's own CHECK and DEL then find what was written, and portguard's table goes.
package nftexport

import (
	"fmt"
	"net/netip"
	"sort"
	"strings"

	"github.com/portguard/portguard/pkg/backend/nftables"
	"github.com/portguard/portguard/pkg/config"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/nftaudit"
)

// Attachment is one owner's claims in portguard's table, as an ADD of upstream would write
// them.
type Attachment struct {
	Owner    hostport.Owner
	Mappings []nftables.Mapping // sorted by family, protocol, host port, host IP
	// Pods are the pod addresses with snat (their masquerade entries), with the prefix of
	// their hairpin subnet when portguard recorded one (else a host prefix).
	Pods    map[hostport.Family]netip.Prefix
	SNAT    bool
	MasqAll bool
}

// Attachments groups the observed elements by owner. It refuses (changing nothing) what
// upstream's format cannot hold: a claim with conditions (upstream's conditionsV4/V6 are
// table-wide, so exporting would widen or drop them), and an owner whose comment is a hash
// that res cannot name (upstream comments carry the container ID).
func Attachments(o nftables.Observed, res nftaudit.Resolve) ([]Attachment, error) {
	by := map[string]*Attachment{}
	var order []string
	get := func(comment string, ow hostport.Owner) (*Attachment, error) {
		if ow.IsZero() && res != nil {
			ow, _ = res(comment)
		}
		if ow.IsZero() {
			return nil, fmt.Errorf("element comment %q names no owner portguard recorded: upstream's rules need the container ID", comment)
		}
		a := by[comment]
		if a == nil {
			a = &Attachment{Owner: ow, Pods: map[hostport.Family]netip.Prefix{}}
			by[comment] = a
			order = append(order, comment)
		}
		return a, nil
	}
	var conds []string
	for _, e := range o.Dump.Claims {
		if e.Gate != "" {
			conds = append(conds, e.String())
			continue
		}
		a, err := get(e.Comment, e.Owner)
		if err != nil {
			return nil, err
		}
		a.Mappings = append(a.Mappings, nftables.Mapping{Claim: e.Claim, Dest: e.Dest})
	}
	if len(conds) > 0 {
		return nil, fmt.Errorf("claims with conditions cannot be exported (upstream's conditionsV4/V6 apply to its whole table, not to one attachment): %s", strings.Join(conds, "; "))
	}
	for _, m := range o.Dump.Masq {
		a, err := get(m.Comment, m.Owner)
		if err != nil {
			return nil, err
		}
		a.SNAT = true
		a.MasqAll = a.MasqAll || m.All
		p := netip.PrefixFrom(m.PodIP, m.PodIP.BitLen())
		for _, s := range o.Dump.Subnets {
			if s.Contains(m.PodIP) {
				p = netip.PrefixFrom(m.PodIP, s.Bits())
			}
		}
		a.Pods[m.Family] = p
	}
	out := make([]Attachment, 0, len(order))
	for _, c := range order {
		a := *by[c]
		if len(a.Mappings) == 0 {
			continue // masquerade entries without a claim: nothing for upstream to own
		}
		out = append(out, a)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Owner.String() < out[j].Owner.String() })
	return out, nil
}

// IPTablesConfig is the configuration an ADD of upstream's iptables backend would have had
// for a: its mappings (host port, container port, host IP), snat/masqAll, upstream's
// default mark bit, and the pod addresses.
func IPTablesConfig(a Attachment) *config.Config {
	c := &config.Config{Network: a.Owner.Network, SNAT: a.SNAT, MasqAll: a.MasqAll, MarkBit: 13,
		Backend: config.BackendIPTables, PodIPs: map[hostport.Family]netip.Prefix{}}
	seen := map[config.Mapping]bool{}
	for _, m := range a.Mappings {
		cm := config.Mapping{Proto: m.Claim.Proto, HostPort: m.Claim.HostPort, ContainerPort: int(m.Dest.Port()), HostIP: hostIPOf(m.Claim)}
		if !seen[cm] { // a wildcard mapping has an element per family, and is one mapping
			seen[cm] = true
			c.Mappings = append(c.Mappings, cm)
		}
		f := m.Claim.Family
		if _, ok := c.PodIPs[f]; !ok {
			p, ok := a.Pods[f]
			if !ok || p.Addr() != m.Dest.Addr() {
				p = netip.PrefixFrom(m.Dest.Addr(), m.Dest.Addr().BitLen())
			}
			c.PodIPs[f] = p
		}
	}
	return c
}

// hostIPOf is a mapping's hostIP as a runtime passes it: unset for the wildcard. A
// wildcard claim of one family only (portguard records the family in the claim) cannot
// be told apart from a dual-stack one here; it becomes a mapping of every family the pod
// has, as upstream writes it.
func hostIPOf(c hostport.Claim) netip.Addr {
	if c.AnyHostIP() {
		return netip.Addr{}
	}
	return c.HostIP
}
