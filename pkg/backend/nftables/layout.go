// Package nftables is portguard's nftables backend: one `inet` table owned by portguard in
// which every host-port claim is one element of an exact-key map, so the kernel itself
// keeps claims unique, and every change of a call is one netlink transaction covering both
// families. It observes, plans and applies in its own terms and reports claims in the
// shared vocabulary (pkg/hostport); what a conflict is and whether an owner is alive is
// decided above it (pkg/engine, pkg/liveness).
//
// Objects (table, maps, chains, rules) are built with google/nftables; elements, point
// lookups and the generation-checked commit go through pkg/nft (see pkg/nft/elems.go for
// what google/nftables v0.3.0 lacks and why it matters here).
//
// A verb, under the engine's lock, in the node's network namespace:
//
//	t, _ := Open()                 // once per call; keep it open until the end
//	t.Ensure()                     // ADD: create or repair the layout (no-op when in place)
//	ch4, _ := t.EnsureConditions(c4) // conditionsV4/V6 parsed by pkg/nftcond ("" for none)
//	tx, _ := t.Begin()             // reads from here on are checked at Commit
//	es, _ := tx.Claims(claims...)  // point lookups: every element conflicting with a claim
//	ms, _ := tx.Masq(podIPs...)    // this attachment's (or a loser's) masquerade entries
//	up, _ := tx.Upstream()         // upstream cni_hostport rules (takeover, DEL leftovers)
//	// the engine judges the owners of es/up (pkg/liveness), refuses or goes on:
//	tx.RemoveClaims(losers...); tx.RemoveMasq(...); tx.RemoveUpstream(...)
//	tx.AddAttachment(Attachment{Owner, Mappings, SNAT, Conditions: {V4: ch4, V6: ch6}})
//	err := tx.Commit()             // one batch, both families; ErrClaimed / ErrChanged / ErrGone
//
// ErrChanged means another writer committed after Begin: observe again and re-plan.
// DEL is the same without AddAttachment; CHECK is Verify, Claims compared with the
// mappings, and EarlierNAT/Upstream for what could shadow them; audit and GC read Dump.
// A Table is not safe for concurrent use.
package nftables

import (
	"bytes"
	"fmt"
	"slices"

	gnft "github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"

	"github.com/portguard/portguard/pkg/hostport"
)

// TableName is portguard's table, family inet. One inet table (not ip + ip6 like upstream's
// cni_hostport) so both families change in one transaction under one name; its own name
// (not upstream's cni_hostport, not kube-proxy's kube-proxy) so no other component ever
// writes into it, and a downgrade removes exactly it.
const TableName = "portguard"

// Hook priorities. For a new connection the first nat base chain (lowest number) that
// DNATs wins, and chains of equal priority run in an order the kernel does not promise.
//   - dstnat -100 is iptables' nat PREROUTING/OUTPUT (kube-proxy iptables mode, iptables-nft
//     CNI chains) and kube-proxy's nftables table. One step after it, kube-proxy's Services
//     (NodePorts on local addresses included) keep precedence over a host port, as they do
//     with upstream portmap's chains which kube-proxy's jumps precede; and a rule of
//     upstream's cni_hostport (also -100) re-added after a downgrade wins over a leftover of
//     ours instead of racing it.
//   - srcnat 100 is iptables' POSTROUTING and kube-proxy's masquerade: ours runs after, so
//     their decisions stand; ours only adds masquerade to DNATed flows to claimed pods.
const (
	PriorityDNAT = -99
	PrioritySNAT = 101
)

// Set names. The family suffix keeps one layout for both families in one table.
const (
	setHostIP     = "hostip"     // hostIP . l4proto . port : podIP . port
	setAny        = "any"        // l4proto . port : podIP . port
	setGuard      = "guard"      // l4proto . port : mark (wildcard claim or count of hostIP claims)
	setGateHostIP = "gatehostip" // hostIP . l4proto . port : jump cond-… (claims with conditions)
	setGateAny    = "gateany"    // l4proto . port : jump cond-…
	setSNAT       = "snat"       // podIP: pods with snat (hairpin from their subnet, IPv4 localhost)
	setMasqAll    = "masqall"    // podIP: pods with snat and masqAll (every source)
	setSubnets    = "subnets"    // subnet . subnet (interval): hairpin = source and pod in one subnet
)

// Chain names.
const (
	chainPrerouting  = "prerouting"
	chainOutput      = "output"
	chainPostrouting = "postrouting"
)

// layoutMark is the comment on every layout rule; Verify compares rule counts and marks.
// Bump it whenever the rules change, so Ensure rewrites them on an upgraded node.
const layoutMark = "portguard layout 3"

func setName(base string, f hostport.Family) string {
	if f == hostport.V6 {
		return base + "6"
	}
	return base + "4"
}

var table = &gnft.Table{Family: gnft.TableFamilyINet, Name: TableName}

func addrType(f hostport.Family) gnft.SetDatatype {
	if f == hostport.V6 {
		return gnft.TypeIP6Addr
	}
	return gnft.TypeIPAddr
}

func sets(f hostport.Family) []*gnft.Set {
	a := addrType(f)
	dest := gnft.MustConcatSetType(a, gnft.TypeInetService)
	return []*gnft.Set{
		{Table: table, Name: setName(setHostIP, f), IsMap: true, Concatenation: true,
			KeyType: gnft.MustConcatSetType(a, gnft.TypeInetProto, gnft.TypeInetService), DataType: dest},
		{Table: table, Name: setName(setAny, f), IsMap: true, Concatenation: true,
			KeyType: gnft.MustConcatSetType(gnft.TypeInetProto, gnft.TypeInetService), DataType: dest},
		{Table: table, Name: setName(setGuard, f), IsMap: true, Concatenation: true,
			KeyType: gnft.MustConcatSetType(gnft.TypeInetProto, gnft.TypeInetService), DataType: gnft.TypeMark},
		{Table: table, Name: setName(setGateHostIP, f), IsMap: true, Concatenation: true,
			KeyType: gnft.MustConcatSetType(a, gnft.TypeInetProto, gnft.TypeInetService), DataType: gnft.TypeVerdict},
		{Table: table, Name: setName(setGateAny, f), IsMap: true, Concatenation: true,
			KeyType: gnft.MustConcatSetType(gnft.TypeInetProto, gnft.TypeInetService), DataType: gnft.TypeVerdict},
		{Table: table, Name: setName(setSNAT, f), KeyType: a},
		{Table: table, Name: setName(setMasqAll, f), KeyType: a},
		// An interval set (pipapo) costs O(elements) per change (measured: a DEL that
		// removed per-pod interval elements took 21 ms at 1,000 pods, 88 ms at 5,000), so
		// it holds only pod subnets, which change when a network appears, never per call.
		{Table: table, Name: setName(setSubnets, f), Interval: true, Concatenation: true,
			KeyType: gnft.MustConcatSetType(a, a)},
	}
}

func chains() []*gnft.Chain {
	pre, post := gnft.ChainPriority(PriorityDNAT), gnft.ChainPriority(PrioritySNAT)
	return []*gnft.Chain{
		{Table: table, Name: chainPrerouting, Type: gnft.ChainTypeNAT, Hooknum: gnft.ChainHookPrerouting, Priority: &pre},
		{Table: table, Name: chainOutput, Type: gnft.ChainTypeNAT, Hooknum: gnft.ChainHookOutput, Priority: &pre},
		{Table: table, Name: chainPostrouting, Type: gnft.ChainTypeNAT, Hooknum: gnft.ChainHookPostrouting, Priority: &post},
	}
}

// Registers: 1 is the 16-byte register the map value lands in; 8.. are 4-byte registers,
// which concatenated keys use (each field padded to 4 bytes, as nft does).
const (
	reg1  = 1
	reg32 = 8
)

func nfproto(f hostport.Family) []expr.Any {
	p := byte(unix.NFPROTO_IPV4)
	if f == hostport.V6 {
		p = unix.NFPROTO_IPV6
	}
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: reg1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: reg1, Data: []byte{p}},
	}
}

// daddrOff/saddrOff/addrLen locate the addresses in the network header.
func addrField(f hostport.Family, dst bool) (off, l uint32) {
	if f == hostport.V6 {
		if dst {
			return 24, 16
		}
		return 8, 16
	}
	if dst {
		return 16, 4
	}
	return 12, 4
}

// gateRules: `meta nfproto ipvX fib daddr type local [ip daddr .] meta l4proto . th dport
// vmap @gate…X`, before the DNAT rules. A claim with conditions has, besides its NAT
// element, a gate element with the same key that jumps to its conditions' chain, which
// returns when they hold (the DNAT rules then forward it) and accepts otherwise (the packet
// leaves this chain untranslated). Claims stay in the same maps whatever their conditions,
// so the kernel keeps them unique across networks with different conditions too.
func gateRules(f hostport.Family) [][]expr.Any {
	var out [][]expr.Any
	for _, hostIP := range []bool{true, false} {
		set := setName(setGateAny, f)
		if hostIP {
			set = setName(setGateHostIP, f)
		}
		e := append(localClaimKey(f, hostIP),
			&expr.Lookup{SourceRegister: reg32, DestRegister: 0 /* verdict */, IsDestRegSet: true, SetName: set})
		out = append(out, e)
	}
	return out
}

// localClaimKey matches `meta nfproto ipvX fib daddr type local` and loads a claim's key,
// `[ip daddr .] meta l4proto . th dport`, into the registers from reg32 on: what both the
// gate and the DNAT lookups are keyed by.
func localClaimKey(f hostport.Family, hostIP bool) []expr.Any {
	e := nfproto(f)
	e = append(e,
		&expr.Fib{Register: reg1, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: reg1, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)},
	)
	r := uint32(reg32)
	if hostIP {
		off, l := addrField(f, true)
		e = append(e, &expr.Payload{DestRegister: r, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: l})
		r += l / 4
	}
	return append(e,
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: r},
		&expr.Payload{DestRegister: r + 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
	)
}

// dnatRules: `meta nfproto ipvX fib daddr type local [ip daddr .] meta l4proto . th dport
// dnat ipX to <key> map @set`, hostIP map first so a specific claim is looked up before the
// wildcard one. `fib daddr type local` keeps transit traffic (to addresses that are not the
// node's) from being redirected (plugins#1209).
func dnatRules(f hostport.Family) [][]expr.Any {
	natFam := uint32(unix.NFPROTO_IPV4)
	if f == hostport.V6 {
		natFam = unix.NFPROTO_IPV6
	}
	_, l := addrField(f, true)
	addrRegs := l / 4
	var out [][]expr.Any
	for _, hostIP := range []bool{true, false} {
		set := setName(setAny, f)
		if hostIP {
			set = setName(setHostIP, f)
		}
		e := append(localClaimKey(f, hostIP),
			&expr.Lookup{SourceRegister: reg32, DestRegister: reg1, IsDestRegSet: true, SetName: set},
			// The value podIP . port: the address fills register 1 from its start, the port
			// follows in the next 4-byte register.
			&expr.NAT{Type: expr.NATTypeDestNAT, Family: natFam, RegAddrMin: reg1, RegProtoMin: reg32 + addrRegs, Specified: true},
		)
		out = append(out, e)
	}
	return out
}

// masqRules masquerade DNATed flows (`ct status dnat`, like the iptables backend's mark,
// which only its DNAT chains set) to pods with snat, with the iptables backend's sources:
//
//	ct status dnat ipX daddr @masqallX masquerade                            (masqAll)
//	ct status dnat ip daddr @snat4 ip saddr 127.0.0.1 masquerade             (localhost, IPv4)
//	ct status dnat ipX daddr @snatX ipX saddr . ipX daddr @subnetsX masquerade (hairpin)
func masqRules(f hostport.Family) [][]expr.Any {
	doff, l := addrField(f, true)
	soff, _ := addrField(f, false)
	head := func() []expr.Any {
		return append(nfproto(f),
			&expr.Ct{Key: expr.CtKeySTATUS, Register: reg1},
			&expr.Bitwise{SourceRegister: reg1, DestRegister: reg1, Len: 4,
				Mask: binaryutil.NativeEndian.PutUint32(0x20 /* IPS_DST_NAT */), Xor: make([]byte, 4)},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: reg1, Data: make([]byte, 4)},
			&expr.Payload{DestRegister: reg1, Base: expr.PayloadBaseNetworkHeader, Offset: doff, Len: l},
		)
	}
	all := append(head(), &expr.Lookup{SourceRegister: reg1, SetName: setName(setMasqAll, f)}, &expr.Masq{})
	hairpin := append(head(),
		&expr.Lookup{SourceRegister: reg1, SetName: setName(setSNAT, f)},
		&expr.Payload{DestRegister: reg32, Base: expr.PayloadBaseNetworkHeader, Offset: soff, Len: l},
		&expr.Payload{DestRegister: reg32 + l/4, Base: expr.PayloadBaseNetworkHeader, Offset: doff, Len: l},
		&expr.Lookup{SourceRegister: reg32, SetName: setName(setSubnets, f)},
		&expr.Masq{},
	)
	out := [][]expr.Any{all}
	if f == hostport.V4 {
		out = append(out, append(head(),
			&expr.Lookup{SourceRegister: reg1, SetName: setName(setSNAT, f)},
			&expr.Payload{DestRegister: reg1, Base: expr.PayloadBaseNetworkHeader, Offset: soff, Len: l},
			&expr.Cmp{Op: expr.CmpOpEq, Register: reg1, Data: []byte{127, 0, 0, 1}},
			&expr.Masq{},
		))
	}
	return append(out, hairpin)
}

// layoutRules returns the rules of each base chain, in order.
func layoutRules() map[string][][]expr.Any {
	out := map[string][][]expr.Any{}
	for _, f := range hostport.Families {
		d := append(gateRules(f), dnatRules(f)...)
		out[chainPrerouting] = append(out[chainPrerouting], d...)
		out[chainOutput] = append(out[chainOutput], d...)
		out[chainPostrouting] = append(out[chainPostrouting], masqRules(f)...)
	}
	return out
}

var markUserdata = userdata.AppendString(nil, userdata.TypeComment, layoutMark)

// Verify reports what differs between the kernel's table and portguard's layout (empty when
// it is in place): a missing table or set, or base chains whose rules are not exactly the
// current layout's (counted and marked; a missing chain has none). It reads no element and
// no expression: two dumps of the table (its sets, its rules' marks), whatever it holds.
func (t *Table) Verify() ([]string, error) {
	l, ok, err := t.nl.Layout(inet, TableName)
	if err != nil {
		return nil, err
	}
	if !ok {
		return []string{"table inet " + TableName + " missing"}, nil
	}
	var problems []string
	for _, f := range hostport.Families {
		for _, s := range sets(f) {
			if !slices.Contains(l.Sets, s.Name) {
				problems = append(problems, "map "+s.Name+" missing")
			}
		}
	}
	want := layoutRules()
	for _, c := range chains() {
		rs := l.Rules[c.Name]
		ok := len(rs) == len(want[c.Name])
		for _, u := range rs {
			ok = ok && bytes.Equal(u, markUserdata)
		}
		if !ok {
			problems = append(problems, fmt.Sprintf("chain %s: %d rules, not the layout's %d", c.Name, len(rs), len(want[c.Name])))
		}
	}
	return problems, nil
}

// Ensure creates the table, its maps and chains and (re)writes the base chains' rules, in
// one transaction, unless Verify finds the layout in place; it never touches elements, so
// it is safe on a table full of claims. It returns whether it wrote anything.
func (t *Table) Ensure() (bool, error) {
	problems, err := t.Verify()
	if err != nil {
		return false, err
	}
	if len(problems) == 0 {
		return false, nil
	}
	t.g.AddTable(table)
	for _, f := range hostport.Families {
		for _, s := range sets(f) {
			if err := t.g.AddSet(s, nil); err != nil {
				return false, fmt.Errorf("layout map %s: %w", s.Name, err)
			}
		}
	}
	rules := layoutRules()
	for _, c := range chains() {
		t.g.AddChain(c)
		// Added then flushed in the same batch: a chain that exists loses its old rules, a
		// new one starts empty, and the rules below are the only ones either way.
		t.g.FlushChain(c)
		for _, e := range rules[c.Name] {
			t.g.AddRule(&gnft.Rule{Table: table, Chain: c, Exprs: e, UserData: markUserdata})
		}
	}
	if err := t.g.Flush(); err != nil {
		return false, fmt.Errorf("create table inet %s: %w", TableName, err)
	}
	return true, nil
}
