package nft

import (
	"encoding/binary"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/state"
)

// Reader reads CNI-HOSTPORT-DNAT over netlink into the table as the rules
// `iptables -t nat -S CNI-HOSTPORT-DNAT` would print, so the model (pkg/state) interprets
// them exactly as it interprets iptables' output; that saves the iptables process and its
// translation of every rule. With Attachments it reads the per-attachment chains
// (CNI-DN-...) the same way. A rule of any shape the decoder does not know (see
// decode.go) makes it decline, and the wrapped runner reads the chain instead. Every
// other chain is read by the wrapped runner.
type Reader struct {
	iptables.Runner
	Conn        *Conn
	Attachments bool
}

func (r *Reader) List(f hostport.Family, chain string, t *iptables.Table) error {
	if chain == state.DNATChain || r.Attachments && strings.HasPrefix(chain, hostport.ChainPrefix) {
		if rules, exists, ok := r.Conn.ReadChain(f, chain); ok {
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
