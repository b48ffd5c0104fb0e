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

func ipx(f hostport.Family) string {
	if f == hostport.V6 {
		return "ip6"
	}
	return "ip"
}

// hostportsRule is the rule upstream's ADD writes for one mapping (knftables' text).
func hostportsRule(m nftables.Mapping) string {
	f := m.Claim.Family
	r := ""
	if !m.Claim.AnyHostIP() {
		r = fmt.Sprintf("%s daddr %s ", ipx(f), m.Claim.HostIP)
	}
	return r + fmt.Sprintf("%s dport %d dnat to %s", m.Claim.Proto, m.Claim.HostPort, m.Dest)
}

// masqRules are the rules upstream's ADD writes with snat for a pod address.
func masqRules(f hostport.Family, pod netip.Addr, all bool) []string {
	if all {
		any := "0.0.0.0/0"
		if f == hostport.V6 {
			any = "::/0"
		}
		return []string{fmt.Sprintf("%s saddr %s %s daddr %s masquerade", ipx(f), any, ipx(f), pod)}
	}
	out := []string{fmt.Sprintf("%s saddr %s %s daddr %s masquerade", ipx(f), pod, ipx(f), pod)}
	if f == hostport.V4 {
		out = append(out, fmt.Sprintf("ip saddr 127.0.0.1 ip daddr %s masquerade", pod))
	}
	return out
}

// UpstreamScript is the nft script that writes the attachments in upstream's nftables
// layout (v1.10.0: the chains and base chains its ADD creates, flushed and refilled the way
// it does) and deletes portguard's table, as one transaction (`nft -f`): the claims move
// from one table to the other with no moment in which a port is unclaimed. A claim already
// written identically by upstream is not written again; an upstream rule of another
// container on a claimed port is an error (repair first). Container IDs are CNI-grammar
// names (letters, digits, _ . -), so quoting them is safe.
func UpstreamScript(atts []Attachment, o nftables.Observed) (string, error) {
	have := map[string]bool{}
	for _, u := range o.Upstream {
		if u.Chain == nftables.UpstreamHostports {
			have[u.ContainerID+" "+hostportsRule(nftables.Mapping{Claim: u.Claim, Dest: u.Dest})] = true
		}
	}
	var b strings.Builder
	fams := map[hostport.Family]bool{}
	masq := map[hostport.Family]bool{}
	for _, a := range atts {
		if !hostport.ValidContainerID(a.Owner.ContainerID) {
			return "", fmt.Errorf("owner %s: container ID outside the CNI grammar", a.Owner)
		}
		for _, m := range a.Mappings {
			fams[m.Claim.Family] = true
			for _, u := range o.Upstream {
				if u.Chain == nftables.UpstreamHostports && u.ContainerID != a.Owner.ContainerID && u.Claim.Conflicts(m.Claim) {
					return "", fmt.Errorf("%s of %s is also claimed by upstream's rule of container %s (-> %s): run portguardctl repair first", m.Claim, a.Owner, u.ContainerID, u.Dest)
				}
			}
		}
		if a.SNAT {
			for f := range a.Pods {
				masq[f] = true
			}
		}
	}
	for _, f := range hostport.Families {
		if !fams[f] {
			continue
		}
		t := ipx(f) + " " + nftables.UpstreamTable
		fmt.Fprintf(&b, "add table %s { comment \"CNI portmap plugin\" ; }\n", t)
		for _, c := range []string{"hostports", "hostip_hostports", "hostports_all"} {
			fmt.Fprintf(&b, "add chain %s %s\n", t, c)
		}
		fmt.Fprintf(&b, "flush chain %s hostports_all\n", t)
		fmt.Fprintf(&b, "add rule %s hostports_all jump hostip_hostports\n", t)
		fmt.Fprintf(&b, "add rule %s hostports_all jump hostports\n", t)
		for _, hook := range []string{"prerouting", "output"} {
			fmt.Fprintf(&b, "add chain %s %s { type nat hook %s priority -100 ; }\n", t, hook, hook)
			fmt.Fprintf(&b, "flush chain %s %s\n", t, hook)
			fmt.Fprintf(&b, "add rule %s %s fib daddr type local jump hostports_all\n", t, hook)
		}
		if masq[f] {
			fmt.Fprintf(&b, "add chain %s masquerading { type nat hook postrouting priority 100 ; }\n", t)
		}
	}
	for _, a := range atts {
		for _, m := range a.Mappings {
			r := hostportsRule(m)
			if have[a.Owner.ContainerID+" "+r] {
				continue
			}
			fmt.Fprintf(&b, "add rule %s %s hostports %s comment \"%s\"\n", ipx(m.Claim.Family), nftables.UpstreamTable, r, a.Owner.ContainerID)
		}
		if !a.SNAT {
			continue
		}
		for _, f := range hostport.Families {
			p, ok := a.Pods[f]
			if !ok {
				continue
			}
			for _, r := range masqRules(f, p.Addr(), a.MasqAll) {
				fmt.Fprintf(&b, "add rule %s %s masquerading %s comment \"%s\"\n", ipx(f), nftables.UpstreamTable, r, a.Owner.ContainerID)
			}
		}
	}
	fmt.Fprintf(&b, "delete table inet %s\n", nftables.TableName)
	return b.String(), nil
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
