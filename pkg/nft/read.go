package nft

import (
	"bytes"
	"encoding/binary"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/state"
)

// Reader reads CNI-HOSTPORT-DNAT over netlink into the table as the rules
// `iptables -t nat -S CNI-HOSTPORT-DNAT` would print, so the model (pkg/state) interprets
// them exactly as it interprets iptables' output; that saves the iptables process and its
// translation of every rule. A rule of any shape other than the jumps portmap and
// portguard write (protocol, comment, multiport, jump) makes it decline, and the wrapped
// runner reads the chain instead. Every other chain is read by the wrapped runner.
type Reader struct {
	iptables.Runner
	Conn *Conn
}

func (r *Reader) List(f hostport.Family, chain string, t *iptables.Table) error {
	if chain == state.DNATChain {
		if rules, exists, ok := r.Conn.jumps(f, chain); ok {
			if !exists {
				t.Missing[chain] = true
			} else {
				t.Add(chain, rules...)
			}
			return nil
		}
	}
	return r.Runner.List(f, chain, t)
}

// jumps reads a chain of jump rules as `iptables -S` shows them; ok is false when any
// rule has another shape or the read fails.
func (c *Conn) jumps(f hostport.Family, chain string) (rules []iptables.Rule, exists, ok bool) {
	nrs, exists, err := c.Rules(f, chain)
	if err != nil {
		return nil, false, false
	}
	rules = make([]iptables.Rule, 0, len(nrs))
	for _, r := range nrs {
		args, ok := jumpArgs(r)
		if !ok {
			return nil, false, false
		}
		rules = append(rules, iptables.Rule{Chain: chain, Args: args})
	}
	return rules, exists, true
}

var protoNames = map[byte]string{unix.IPPROTO_TCP: "tcp", unix.IPPROTO_UDP: "udp", unix.IPPROTO_SCTP: "sctp"}

// jumpArgs turns [meta l4proto, cmp ==] [comment] [multiport] [counter] jump, the
// shape iptables-nft gives `-p P -m comment --comment C -m multiport --dports L -j X`,
// back into those arguments.
func jumpArgs(r Rule) ([]string, bool) {
	if r.Userdata != nil {
		return nil, false // a comment kept as userdata: iptables -S shows it, we would not
	}
	args := make([]string, 0, 12)
	proto := ""
	for i := 0; i < len(r.Exprs); i++ {
		x := r.Exprs[i]
		switch x.Name {
		case "counter":
		case "meta":
			// meta load l4proto => reg 1, then cmp eq reg 1 <proto>
			if proto != "" || len(args) > 0 || i+1 >= len(r.Exprs) || !u32Is(x.Attrs.get(unix.NFTA_META_KEY), unix.NFT_META_L4PROTO) {
				return nil, false
			}
			dreg := x.Attrs.get(unix.NFTA_META_DREG)
			cmp := r.Exprs[i+1]
			if cmp.Name != "cmp" || !bytes.Equal(cmp.Attrs.get(unix.NFTA_CMP_SREG), dreg) || !u32Is(cmp.Attrs.get(unix.NFTA_CMP_OP), unix.NFT_CMP_EQ) {
				return nil, false
			}
			v, err := attrs(cmp.Attrs.get(unix.NFTA_CMP_DATA))
			if err != nil || len(v.get(unix.NFTA_DATA_VALUE)) != 1 {
				return nil, false
			}
			if proto = protoNames[v.get(unix.NFTA_DATA_VALUE)[0]]; proto == "" {
				return nil, false
			}
			args = append(args, "-p", proto)
			i++
		case "match":
			info := x.Attrs.get(unix.NFTA_MATCH_INFO)
			switch name := cstr(x.Attrs.get(unix.NFTA_MATCH_NAME)); {
			case name == "comment" && u32Is(x.Attrs.get(unix.NFTA_MATCH_REV), 0) && len(info) >= 256:
				s := cstr(info[:256])
				if !printable(s) {
					return nil, false
				}
				args = append(args, "-m", "comment", "--comment", s)
			case name == "multiport" && u32Is(x.Attrs.get(unix.NFTA_MATCH_REV), 1) && proto != "":
				l, ok := multiport(info)
				if !ok {
					return nil, false
				}
				args = append(args, "-m", "multiport", "--dports", l)
			default:
				return nil, false
			}
		case "immediate":
			j := r.Jump()
			if i != len(r.Exprs)-1 || j == "" || !printable(j) || strings.ContainsAny(j, " \"\\") {
				return nil, false
			}
			args = append(args, "-j", j)
		default:
			return nil, false
		}
	}
	if len(args) < 2 || args[len(args)-2] != "-j" {
		return nil, false
	}
	return args, true
}

// multiport renders struct xt_multiport_v1 {u8 flags, count; u16 ports[15]; u8 pflags[15],
// invert} (host byte order) as iptables does; only destination ports, not inverted.
func multiport(info []byte) (string, bool) {
	const n = 15
	if len(info) < 2+2*n+n+1 {
		return "", false
	}
	flags, count := info[0], int(info[1])
	pflags, invert := info[2+2*n:2+3*n], info[2+3*n]
	if flags != 1 || invert != 0 || count == 0 || count > n {
		return "", false
	}
	var parts []string
	for i := 0; i < count; i++ {
		p := strconv.Itoa(int(binary.NativeEndian.Uint16(info[2+2*i:])))
		if pflags[i] != 0 {
			if i+1 >= count {
				return "", false
			}
			i++
			p += ":" + strconv.Itoa(int(binary.NativeEndian.Uint16(info[2+2*i:])))
		}
		parts = append(parts, p)
	}
	return strings.Join(parts, ","), true
}

func u32Is(b []byte, v uint32) bool { return len(b) == 4 && binary.BigEndian.Uint32(b) == v }

// printable refuses what must never reach the line-based parser: control characters
// (a newline would end the rule) and bytes that are not UTF-8 text.
func printable(s string) bool {
	for _, r := range s {
		if r < 0x20 || r == 0x7f || r == 0xfffd {
			return false
		}
	}
	return true
}

// SharedLayout reports whether table nat holds, exactly as iptables-nft writes them, the
// entry jumps `-m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT` in PREROUTING and
// OUTPUT and, with masq, POSTROUTING's jump to CNI-HOSTPORT-MASQ, SETMARK's
// `-j MARK --set-xmark B/B` and MASQ's `-m mark --mark B/B -j MASQUERADE` for mark bit
// markBit. ADD then need not assert them with -C, which would make iptables-restore
// fetch every rule of CNI-HOSTPORT-DNAT. false means "not shown": assert them.
func (c *Conn) SharedLayout(f hostport.Family, masq bool, markBit int) (bool, error) {
	has := func(chain string, want func(Rule) bool) (bool, error) {
		rules, _, err := c.Rules(f, chain)
		for _, r := range rules {
			if r.Userdata == nil && want(r) {
				return true, nil
			}
		}
		return false, err
	}
	entry := func(r Rule) bool {
		info, ok := r.Xt("match", "addrtype", 1)
		// struct xt_addrtype_info_v1 {u16 source, dest; u32 flags}: dest LOCAL (1 << RTN_LOCAL).
		return ok && r.Jump() == state.DNATChain && shape(r, "match", "immediate") && len(info) >= 8 &&
			binary.NativeEndian.Uint16(info[0:]) == 0 && binary.NativeEndian.Uint16(info[2:]) == 1<<unix.RTN_LOCAL &&
			binary.NativeEndian.Uint32(info[4:]) == 0
	}
	type check struct {
		chain string
		want  func(Rule) bool
	}
	checks := []check{{"PREROUTING", entry}, {"OUTPUT", entry}}
	if masq {
		bit := uint32(1) << uint(markBit)
		checks = append(checks,
			check{"POSTROUTING", func(r Rule) bool {
				return r.Jump() == state.MasqChain && shape(r, "match", "immediate") && comment(r) == state.MasqJumpComment
			}},
			check{state.SetMarkChain, func(r Rule) bool {
				info, ok := r.Xt("target", "MARK", 2) // struct xt_mark_tginfo2 {u32 mark, mask}
				return ok && shape(r, "match", "target") && comment(r) == state.SetMarkComment && len(info) >= 8 &&
					binary.NativeEndian.Uint32(info[0:]) == bit && binary.NativeEndian.Uint32(info[4:]) == bit
			}},
			check{state.MasqChain, func(r Rule) bool {
				info, ok := r.Xt("target", "MASQUERADE", 0)
				return ok && plainMasquerade(f, info) && shape(r, "meta", "bitwise", "cmp", "target") && markTest(r, bit)
			}})
	}
	for _, ch := range checks {
		if ok, err := has(ch.chain, ch.want); !ok || err != nil {
			return false, err
		}
	}
	return true, nil
}

// shape reports whether the rule's expressions, counters aside, have these names.
func shape(r Rule, names ...string) bool {
	i := 0
	for _, x := range r.Exprs {
		if x.Name == "counter" {
			continue
		}
		if i >= len(names) || x.Name != names[i] {
			return false
		}
		i++
	}
	return i == len(names)
}

func comment(r Rule) string {
	info, ok := r.Xt("match", "comment", 0)
	if !ok || len(info) < 256 {
		return ""
	}
	return cstr(info[:256])
}

// markTest recognises `meta mark & B == B` (iptables-nft's -m mark --mark B/B).
func markTest(r Rule, bit uint32) bool {
	var meta, bw, cmp Expr
	for _, x := range r.Exprs {
		switch x.Name {
		case "meta":
			meta = x
		case "bitwise":
			bw = x
		case "cmp":
			cmp = x
		}
	}
	value := func(b []byte) (uint32, bool) {
		v, err := attrs(b)
		if err != nil || len(v.get(unix.NFTA_DATA_VALUE)) != 4 {
			return 0, false
		}
		return binary.NativeEndian.Uint32(v.get(unix.NFTA_DATA_VALUE)), true
	}
	mask, ok1 := value(bw.Attrs.get(unix.NFTA_BITWISE_MASK))
	xor, ok2 := value(bw.Attrs.get(unix.NFTA_BITWISE_XOR))
	want, ok3 := value(cmp.Attrs.get(unix.NFTA_CMP_DATA))
	return ok1 && ok2 && ok3 && u32Is(meta.Attrs.get(unix.NFTA_META_KEY), unix.NFT_META_MARK) &&
		u32Is(cmp.Attrs.get(unix.NFTA_CMP_OP), unix.NFT_CMP_EQ) && mask == bit && xor == 0 && want == bit
}

// plainMasquerade recognises the info of a bare `-j MASQUERADE` (no --to-ports, --random):
// IPv4's struct nf_nat_ipv4_multi_range_compat with rangesize 1 and an empty range, IPv6's
// struct nf_nat_range all zero.
func plainMasquerade(f hostport.Family, info []byte) bool {
	rest := info
	if f == hostport.V4 {
		if len(info) < 4 || binary.NativeEndian.Uint32(info) != 1 {
			return false
		}
		rest = info[4:]
	}
	for _, b := range rest {
		if b != 0 {
			return false
		}
	}
	return len(info) > 0
}
