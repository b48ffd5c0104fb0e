package nftexport

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strings"

	gnft "github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"

	"github.com/portguard/portguard/pkg/backend/nftables"
	"github.com/portguard/portguard/pkg/hostport"
)

// upRule is one rule of upstream's layout: where it goes, its nft text and its expressions
// (what nft compiles that text to), built together so the dry run shows exactly the batch.
type upRule struct {
	f       hostport.Family
	chain   string
	text    string
	exprs   []expr.Any
	comment string // the container ID; "" for the layout's own rules
}

// UpstreamPlan is the export to upstream's nftables backend: the chains its ADD creates in
// each family's cni_hostport table (the base chains flushed and refilled as its ADD does,
// without conditions), one rule per mapping and the masquerade rules of pods with snat,
// then the deletion of portguard's table. Apply commits it as ONE netlink batch, so no
// port is unclaimed at any moment and nothing needs the nft binary.
type UpstreamPlan struct {
	families []hostport.Family
	masq     map[hostport.Family]bool
	rules    []upRule
	atts     []Attachment
}

// Attachments are the exported attachments.
func (p *UpstreamPlan) Attachments() []Attachment { return p.atts }

func ipx(f hostport.Family) string {
	if f == hostport.V6 {
		return "ip6"
	}
	return "ip"
}

func addrOf(f hostport.Family, a netip.Addr) []byte {
	if f == hostport.V4 {
		b := a.Unmap().As4()
		return b[:]
	}
	b := a.As16()
	return b[:]
}

// addrMatch is `ipX saddr|daddr A` (a prefix of length 0 matches everything: `0.0.0.0/0`).
func addrMatch(f hostport.Family, dst bool, a netip.Addr, all bool) []expr.Any {
	off, l := uint32(12), uint32(4)
	if f == hostport.V6 {
		off, l = 8, 16
	}
	if dst {
		off += l
	}
	e := []expr.Any{&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: l}}
	if all {
		zero := make([]byte, l)
		return append(e, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: l, Mask: zero, Xor: zero},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: zero})
	}
	return append(e, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: addrOf(f, a)})
}

var protoNum = map[string]byte{"tcp": unix.IPPROTO_TCP, "udp": unix.IPPROTO_UDP, "sctp": unix.IPPROTO_SCTP}

// hostportsRule: `[ipX daddr H] PROTO dport P dnat to A:p`, upstream's rule of a mapping.
func hostportsRule(m nftables.Mapping) upRule {
	f := m.Claim.Family
	var e []expr.Any
	text := ""
	if !m.Claim.AnyHostIP() {
		e = addrMatch(f, true, m.Claim.HostIP, false)
		text = fmt.Sprintf("%s daddr %s ", ipx(f), m.Claim.HostIP)
	}
	text += fmt.Sprintf("%s dport %d dnat to %s", m.Claim.Proto, m.Claim.HostPort, m.Dest)
	natFam := uint32(unix.NFPROTO_IPV4)
	if f == hostport.V6 {
		natFam = unix.NFPROTO_IPV6
	}
	e = append(e,
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{protoNum[m.Claim.Proto]}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.BigEndian.AppendUint16(nil, uint16(m.Claim.HostPort))},
		&expr.Immediate{Register: 1, Data: addrOf(f, m.Dest.Addr())},
		&expr.Immediate{Register: 2, Data: binary.BigEndian.AppendUint16(nil, m.Dest.Port())},
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: natFam, RegAddrMin: 1, RegProtoMin: 2, Specified: true},
	)
	return upRule{f: f, chain: nftables.UpstreamHostports, text: text, exprs: e}
}

// masqRules are upstream's masquerade rules of a pod with snat: `ipX saddr POD ipX daddr
// POD masquerade` (hairpin) and, for IPv4, from 127.0.0.1; with masqAll, from everyone.
func masqRules(f hostport.Family, pod netip.Addr, all bool) []upRule {
	rule := func(src netip.Addr, srcText string, any bool) upRule {
		e := append(addrMatch(f, false, src, any), addrMatch(f, true, pod, false)...)
		return upRule{f: f, chain: nftables.UpstreamMasquerades, exprs: append(e, &expr.Masq{}),
			text: fmt.Sprintf("%s saddr %s %s daddr %s masquerade", ipx(f), srcText, ipx(f), pod)}
	}
	if all {
		z := "0.0.0.0/0"
		if f == hostport.V6 {
			z = "::/0"
		}
		return []upRule{rule(netip.Addr{}, z, true)}
	}
	out := []upRule{rule(pod, pod.String(), false)}
	if f == hostport.V4 {
		lo := netip.AddrFrom4([4]byte{127, 0, 0, 1})
		out = append(out, rule(lo, lo.String(), false))
	}
	return out
}

// PlanUpstream plans the export of atts to upstream's nftables layout. A claim that
// upstream already holds identically (same container, rule) is not written again; an
// upstream rule of another container on a claimed port is an error (repair first).
// Container IDs are CNI-grammar names, checked here.
func PlanUpstream(atts []Attachment, o nftables.Observed) (*UpstreamPlan, error) {
	have := map[string]bool{}
	for _, u := range o.Upstream {
		if u.Chain == nftables.UpstreamHostports {
			have[u.ContainerID+" "+hostportsRule(nftables.Mapping{Claim: u.Claim, Dest: u.Dest}).text] = true
		}
	}
	p := &UpstreamPlan{masq: map[hostport.Family]bool{}, atts: atts}
	fams := map[hostport.Family]bool{}
	for _, a := range atts {
		if !hostport.ValidContainerID(a.Owner.ContainerID) {
			return nil, fmt.Errorf("owner %s: container ID outside the CNI grammar", a.Owner)
		}
		for _, m := range a.Mappings {
			fams[m.Claim.Family] = true
			for _, u := range o.Upstream {
				if u.Chain == nftables.UpstreamHostports && u.ContainerID != a.Owner.ContainerID && u.Claim.Conflicts(m.Claim) {
					return nil, fmt.Errorf("%s of %s is also claimed by upstream's rule of container %s (-> %s): run portguardctl repair first", m.Claim, a.Owner, u.ContainerID, u.Dest)
				}
			}
			r := hostportsRule(m)
			if have[a.Owner.ContainerID+" "+r.text] {
				continue
			}
			r.comment = a.Owner.ContainerID
			p.rules = append(p.rules, r)
		}
		if !a.SNAT {
			continue
		}
		for _, f := range hostport.Families {
			if pod, ok := a.Pods[f]; ok {
				p.masq[f] = true
				for _, r := range masqRules(f, pod.Addr(), a.MasqAll) {
					r.comment = a.Owner.ContainerID
					p.rules = append(p.rules, r)
				}
			}
		}
	}
	for _, f := range hostport.Families {
		if fams[f] || p.masq[f] {
			p.families = append(p.families, f)
		}
	}
	return p, nil
}

func upTable(f hostport.Family) *gnft.Table {
	if f == hostport.V6 {
		return &gnft.Table{Family: gnft.TableFamilyIPv6, Name: nftables.UpstreamTable}
	}
	return &gnft.Table{Family: gnft.TableFamilyIPv4, Name: nftables.UpstreamTable}
}

// layout is upstream's chains in family f: regular chains, and base chains with their
// rules (`jump hostip_hostports; jump hostports` and `fib daddr type local jump
// hostports_all`), in the order its ADD writes them.
func (p *UpstreamPlan) layout(f hostport.Family) (regular []string, base []*gnft.Chain, rules map[string][]upRule) {
	t := upTable(f)
	dst, src := gnft.ChainPriority(-100), gnft.ChainPriority(100)
	regular = []string{nftables.UpstreamHostports, "hostip_hostports", "hostports_all"}
	base = []*gnft.Chain{
		{Table: t, Name: "prerouting", Type: gnft.ChainTypeNAT, Hooknum: gnft.ChainHookPrerouting, Priority: &dst},
		{Table: t, Name: "output", Type: gnft.ChainTypeNAT, Hooknum: gnft.ChainHookOutput, Priority: &dst},
	}
	if p.masq[f] {
		base = append(base, &gnft.Chain{Table: t, Name: nftables.UpstreamMasquerades, Type: gnft.ChainTypeNAT, Hooknum: gnft.ChainHookPostrouting, Priority: &src})
	}
	jump := func(c string) []expr.Any { return []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: c}} }
	entry := []expr.Any{
		&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)},
		&expr.Verdict{Kind: expr.VerdictJump, Chain: "hostports_all"},
	}
	rules = map[string][]upRule{
		"hostports_all": {{f: f, text: "jump hostip_hostports", exprs: jump("hostip_hostports")}, {f: f, text: "jump hostports", exprs: jump(nftables.UpstreamHostports)}},
		"prerouting":    {{f: f, text: "fib daddr type local jump hostports_all", exprs: entry}},
		"output":        {{f: f, text: "fib daddr type local jump hostports_all", exprs: entry}},
	}
	return regular, base, rules
}

// Script is the plan in nft syntax (what --dry-run prints; `nft -f` of it does the same).
func (p *UpstreamPlan) Script() string {
	var b strings.Builder
	for _, f := range p.families {
		t := ipx(f) + " " + nftables.UpstreamTable
		regular, base, rules := p.layout(f)
		fmt.Fprintf(&b, "add table %s\n", t)
		for _, c := range regular {
			fmt.Fprintf(&b, "add chain %s %s\n", t, c)
		}
		fmt.Fprintf(&b, "flush chain %s hostports_all\n", t)
		for _, r := range rules["hostports_all"] {
			fmt.Fprintf(&b, "add rule %s hostports_all %s\n", t, r.text)
		}
		for _, c := range base {
			hook := map[*gnft.ChainHook]string{gnft.ChainHookPrerouting: "prerouting", gnft.ChainHookOutput: "output", gnft.ChainHookPostrouting: "postrouting"}[c.Hooknum]
			fmt.Fprintf(&b, "add chain %s %s { type nat hook %s priority %d ; }\n", t, c.Name, hook, *c.Priority)
			if rs, ok := rules[c.Name]; ok {
				fmt.Fprintf(&b, "flush chain %s %s\n", t, c.Name)
				for _, r := range rs {
					fmt.Fprintf(&b, "add rule %s %s %s\n", t, c.Name, r.text)
				}
			}
		}
	}
	for _, r := range p.rules {
		fmt.Fprintf(&b, "add rule %s %s %s %s comment \"%s\"\n", ipx(r.f), nftables.UpstreamTable, r.chain, r.text, r.comment)
	}
	fmt.Fprintf(&b, "delete table inet %s\n", nftables.TableName)
	return b.String()
}

// Apply commits the plan in this network namespace as one batch: all of it or nothing.
func (p *UpstreamPlan) Apply() error {
	c, err := gnft.New()
	if err != nil {
		return fmt.Errorf("nf_tables netlink socket: %w", err)
	}
	chains := map[string]*gnft.Chain{}
	for _, f := range p.families {
		t := c.AddTable(upTable(f))
		regular, base, rules := p.layout(f)
		for _, name := range regular {
			chains[ipx(f)+name] = c.AddChain(&gnft.Chain{Table: t, Name: name})
		}
		hpa := chains[ipx(f)+"hostports_all"]
		c.FlushChain(hpa)
		for _, r := range rules["hostports_all"] {
			c.AddRule(&gnft.Rule{Table: t, Chain: hpa, Exprs: r.exprs})
		}
		for _, bc := range base {
			ch := c.AddChain(bc)
			chains[ipx(f)+bc.Name] = ch
			if rs, ok := rules[bc.Name]; ok {
				c.FlushChain(ch)
				for _, r := range rs {
					c.AddRule(&gnft.Rule{Table: t, Chain: ch, Exprs: r.exprs})
				}
			}
		}
	}
	for _, r := range p.rules {
		c.AddRule(&gnft.Rule{Table: upTable(r.f), Chain: chains[ipx(r.f)+r.chain], Exprs: r.exprs,
			UserData: userdata.AppendString(nil, userdata.TypeComment, r.comment)})
	}
	c.DelTable(&gnft.Table{Family: gnft.TableFamilyINet, Name: nftables.TableName})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("export batch refused (nothing was changed): %w", err)
	}
	return nil
}
