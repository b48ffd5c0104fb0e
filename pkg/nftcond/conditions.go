package nftcond

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/portguard/portguard/pkg/hostport"
)

type kind uint8

// The order of the kinds is the canonical order of matches.
const (
	kSaddr kind = iota
	kDaddr
	kIifname
	kOifname
	kMark
)

// addrRange is an inclusive range of addresses of one family.
type addrRange struct{ first, last netip.Addr }

// match is one parsed match; which fields are set depends on kind.
type match struct {
	kind   kind
	neg    bool
	ranges []addrRange // kSaddr, kDaddr: sorted, disjoint, not adjacent
	name   string      // kIifname, kOifname: may end in '*'
	mask   uint32      // kMark: ^0 when no mask was given
	value  uint32      // kMark
}

// Conditions is one family's parsed conditions: a conjunction of matches in canonical
// order without duplicates. The zero value has no matches.
type Conditions struct {
	family  hostport.Family
	matches []match
}

// Empty reports whether there are no matches (every packet passes).
func (c Conditions) Empty() bool { return len(c.matches) == 0 }

// Family is the family Parse was given.
func (c Conditions) Family() hostport.Family { return c.family }

func (c *Conditions) normalise() {
	slices.SortStableFunc(c.matches, func(a, b match) int {
		if a.kind != b.kind {
			return int(a.kind) - int(b.kind)
		}
		return strings.Compare(c.render(a), c.render(b))
	})
	c.matches = slices.CompactFunc(c.matches, func(a, b match) bool { return c.render(a) == c.render(b) })
}

// String is the canonical form in nft syntax, as `nft list ruleset` prints the
// expressions of Exprs: matches in a fixed order (addresses, interfaces, mark) joined by
// spaces, address values merged (a single prefix or address printed bare, anything else
// as a set), names quoted, marks as 0x%08x. "" when Empty. Equal strings mean equal
// conditions, so it can key a group of attachments; Parse of the string gives it back.
func (c Conditions) String() string {
	parts := make([]string, len(c.matches))
	for i, m := range c.matches {
		parts[i] = c.render(m)
	}
	return strings.Join(parts, " ")
}

func (c Conditions) render(m match) string {
	var b strings.Builder
	switch m.kind {
	case kSaddr, kDaddr:
		b.WriteString(map[hostport.Family]string{hostport.V4: "ip", hostport.V6: "ip6"}[c.family])
		b.WriteString(map[kind]string{kSaddr: " saddr ", kDaddr: " daddr "}[m.kind])
		if m.neg {
			b.WriteString("!= ")
		}
		if _, ok := single(m.ranges); ok {
			b.WriteString(m.ranges[0].String())
			break
		}
		b.WriteString("{ ")
		for i, r := range m.ranges {
			if i > 0 {
				b.WriteString(", ")
			}
			b.WriteString(r.String())
		}
		b.WriteString(" }")
	case kIifname, kOifname:
		b.WriteString(map[kind]string{kIifname: "iifname ", kOifname: "oifname "}[m.kind])
		if m.neg {
			b.WriteString("!= ")
		}
		fmt.Fprintf(&b, "%q", m.name)
	case kMark:
		b.WriteString("meta mark ")
		op := ""
		if m.neg {
			op = "!= "
		}
		if m.mask != ^uint32(0) {
			fmt.Fprintf(&b, "& 0x%08x ", m.mask)
			if op == "" {
				op = "== "
			}
		}
		fmt.Fprintf(&b, "%s0x%08x", op, m.value)
	}
	return b.String()
}

// String spells a range as nft lists it: an address, a prefix, or first-last.
func (r addrRange) String() string {
	if r.first == r.last {
		return r.first.String()
	}
	if bits, ok := r.prefix(); ok {
		return netip.PrefixFrom(r.first, bits).String()
	}
	return r.first.String() + "-" + r.last.String()
}

func bitLen(f hostport.Family) int {
	if f == hostport.V6 {
		return 128
	}
	return 32
}

// lastOf is the highest address of a masked prefix.
func lastOf(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// prefix tells whether the range is exactly one prefix, and its length.
func (r addrRange) prefix() (int, bool) {
	for bits := 0; bits <= r.first.BitLen(); bits++ {
		p := netip.PrefixFrom(r.first, bits).Masked()
		if p.Addr() == r.first && lastOf(p) == r.last {
			return bits, true
		}
	}
	return 0, false
}

func (r addrRange) all() bool {
	bits, ok := r.prefix()
	return ok && bits == 0
}

// single tells whether a value is one prefix (or address), which a comparison matches
// without a set, and its length.
func single(rs []addrRange) (int, bool) {
	if len(rs) != 1 {
		return 0, false
	}
	return rs[0].prefix()
}

// mergeRanges sorts ranges and merges overlapping and adjacent ones, as nft merges the
// values of an anonymous interval set.
func mergeRanges(rs []addrRange) []addrRange {
	rs = slices.Clone(rs)
	slices.SortFunc(rs, func(a, b addrRange) int { return a.first.Compare(b.first) })
	var out []addrRange
	for _, r := range rs {
		if n := len(out); n > 0 {
			prev := &out[n-1]
			next := prev.last.Next()
			if !next.IsValid() || r.first.Compare(next) <= 0 {
				if r.last.Compare(prev.last) > 0 {
					prev.last = r.last
				}
				continue
			}
		}
		out = append(out, r)
	}
	return out
}

// SetAdder adds an anonymous set to the batch a rule goes in; *nftables.Conn is one.
type SetAdder interface {
	AddSet(s *nftables.Set, vals []nftables.SetElement) error
}

// Exprs returns the matches as expressions to put before a rule's statements, encoded as
// nft 1.0.6 encodes the same text, so `nft list` prints String back. An address match
// is preceded once by the `meta nfproto` check nft adds as its dependency (needed in an
// inet table; redundant but harmless in an ip or ip6 table). A value that is not one
// prefix becomes a lookup in an anonymous constant interval set, added through sets to
// table t: the kernel binds it to the rule and frees it with the rule, so no named set
// has to be kept or cleaned up; one rule keeps one lookup however many values (no rule
// per value, no cross product of several sets), and the set lives in the same batch as
// its rule (call Exprs once per rule, before AddRule, and flush them together).
// Matches without an address (interface, mark) check no family: in an inet table the
// rule's own statement (e.g. dnat ip to ...) must pin it. The expressions use register
// 1. Empty conditions give no expressions.
func (c Conditions) Exprs(t *nftables.Table, sets SetAdder) ([]expr.Any, error) {
	var out []expr.Any
	dep := false
	for _, m := range c.matches {
		switch m.kind {
		case kSaddr, kDaddr:
			if !dep {
				proto := byte(unix.NFPROTO_IPV4)
				if c.family == hostport.V6 {
					proto = unix.NFPROTO_IPV6
				}
				out = append(out, &expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
					&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}})
				dep = true
			}
			e, err := c.addrExprs(m, t, sets)
			if err != nil {
				return nil, err
			}
			out = append(out, e...)
		case kIifname, kOifname:
			key := expr.MetaKeyIIFNAME
			if m.kind == kOifname {
				key = expr.MetaKeyOIFNAME
			}
			// An exact name compares all 16 bytes (the name NUL-padded, as the kernel
			// stores it); a wildcard compares only the prefix, without a terminator.
			data := make([]byte, unix.IFNAMSIZ)
			copy(data, m.name)
			if p, ok := strings.CutSuffix(m.name, "*"); ok {
				data = []byte(p)
			}
			out = append(out, &expr.Meta{Key: key, Register: 1}, &expr.Cmp{Op: op(m.neg), Register: 1, Data: data})
		case kMark:
			out = append(out, &expr.Meta{Key: expr.MetaKeyMARK, Register: 1})
			if m.mask != ^uint32(0) {
				out = append(out, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
					Mask: binary.NativeEndian.AppendUint32(nil, m.mask), Xor: make([]byte, 4)})
			}
			out = append(out, &expr.Cmp{Op: op(m.neg), Register: 1, Data: binary.NativeEndian.AppendUint32(nil, m.value)})
		}
	}
	return out, nil
}

func op(neg bool) expr.CmpOp {
	if neg {
		return expr.CmpOpNeq
	}
	return expr.CmpOpEq
}

func (c Conditions) addrExprs(m match, t *nftables.Table, sets SetAdder) ([]expr.Any, error) {
	size := uint32(bitLen(c.family) / 8)
	offset := map[hostport.Family]map[kind]uint32{
		hostport.V4: {kSaddr: 12, kDaddr: 16},
		hostport.V6: {kSaddr: 8, kDaddr: 24},
	}[c.family][m.kind]
	load := func(n uint32) *expr.Payload {
		return &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: n}
	}
	if bits, ok := single(m.ranges); ok {
		addr := m.ranges[0].first.AsSlice()
		if bits%8 == 0 {
			// A whole-byte prefix loads only its bytes, as nft does.
			return []expr.Any{load(uint32(bits / 8)), &expr.Cmp{Op: op(m.neg), Register: 1, Data: addr[:bits/8]}}, nil
		}
		maskBytes := make([]byte, size)
		for i := 0; i < bits; i++ {
			maskBytes[i/8] |= 0x80 >> (i % 8)
		}
		return []expr.Any{load(size),
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: size, Mask: maskBytes, Xor: make([]byte, size)},
			&expr.Cmp{Op: op(m.neg), Register: 1, Data: addr}}, nil
	}
	set := &nftables.Set{Table: t, Anonymous: true, Constant: true, Interval: true, KeyType: nftables.TypeIPAddr}
	if c.family == hostport.V6 {
		set.KeyType = nftables.TypeIP6Addr
	}
	// The kernel's interval set stores each range as a start element and an end
	// element one past its last address (none when the range reaches the top), with a
	// leading end element at zero when the first range starts above it, as nft writes.
	var elems []nftables.SetElement
	if !m.ranges[0].first.IsUnspecified() {
		elems = append(elems, nftables.SetElement{Key: make([]byte, size), IntervalEnd: true})
	}
	for _, r := range m.ranges {
		elems = append(elems, nftables.SetElement{Key: r.first.AsSlice()})
		if next := r.last.Next(); next.IsValid() {
			elems = append(elems, nftables.SetElement{Key: next.AsSlice(), IntervalEnd: true})
		}
	}
	if err := sets.AddSet(set, elems); err != nil {
		return nil, fmt.Errorf("anonymous set for %s: %w", c.render(m), err)
	}
	return []expr.Any{load(size), &expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID, Invert: m.neg}}, nil
}
