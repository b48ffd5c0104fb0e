package xtlegacy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"

	"github.com/portguard/portguard/pkg/hostport"
)

// The entry layouts of ip_tables and ip6_tables on 64-bit platforms (struct ipt_entry,
// 112 bytes, and struct ip6t_entry, 168 bytes: the address part, then nfcache,
// target_offset, next_offset, comefrom and the counters), followed by the matches
// (struct xt_entry_match: u16 size, name[29], revision, data) and the target (the same
// header, struct xt_entry_target).
type layout struct {
	proto, invflags    int  // offsets of the protocol (u16) and invflags (u8)
	protoInv           byte // the invflags bit that negates the protocol
	flags              int  // offset of flags (u8; v6 only, -1: none)
	protoFlag          byte // the flags bit that says the protocol is matched (v6)
	targetOff, nextOff int  // offsets of target_offset and next_offset (u16 each)
	size               int
}

var layouts = map[hostport.Family]layout{
	// struct ipt_ip: src, dst, smsk, dmsk (4 each), iniface, outiface and their masks (16
	// each), proto u16, flags u8, invflags u8 (IPT_INV_PROTO 0x40).
	hostport.V4: {proto: 80, invflags: 83, protoInv: 0x40, flags: -1, targetOff: 88, nextOff: 90, size: 112},
	// struct ip6t_ip6: the addresses (16 each), interfaces, proto u16, tos, flags
	// (IP6T_F_PROTO 0x01: the protocol is matched), invflags (IP6T_INV_PROTO 0x40).
	hostport.V6: {proto: 128, invflags: 132, protoInv: 0x40, flags: 131, protoFlag: 0x01, targetOff: 140, nextOff: 142, size: 168},
}

const (
	xtHeader    = 32 // struct xt_entry_match / xt_entry_target before their data
	xtNameLen   = 29
	errorTarget = "ERROR"
	// XT_RETURN and the other negative verdicts are not jumps; a jump's verdict is the
	// offset of the chain's first entry.
	commentLen   = 256
	multiportMax = 15
)

var errMalformed = errors.New("legacy nat table: malformed entry")

var protoNames = map[uint16]string{6: "tcp", 17: "udp", 132: "sctp"}

type entry struct {
	off, next int
	proto     string
	comment   string
	ports     []int
	multiport bool
	target    string // the target's name ("" for the standard target)
	verdict   int32  // the standard target's verdict
	errName   string // an ERROR target's name (a user chain's head)
}

// parse finds the jumps of CNI-HOSTPORT-DNAT in an entry table. It checks every offset
// against the table, so a malformed table is an error, never a panic.
func parse(f hostport.Family, b []byte) ([]Jump, error) {
	l := layouts[f]
	var es []entry
	chainAt := map[int]string{} // offset of a chain's head and of its first entry -> name
	for off := 0; off < len(b); {
		e, err := parseEntry(l, b, off)
		if err != nil {
			return nil, err
		}
		if e.errName != "" && e.errName != errorTarget {
			chainAt[off] = e.errName
			chainAt[off+e.next] = e.errName
		}
		es = append(es, e)
		off += e.next
	}
	var out []Jump
	in := false
	for _, e := range es {
		if e.errName != "" {
			in = e.errName == hostport.DNATChain
			continue
		}
		if !in || e.target != "" || e.verdict < 0 {
			continue
		}
		chain := chainAt[int(e.verdict)]
		if !strings.HasPrefix(chain, hostport.ChainPrefix) {
			continue
		}
		j := Jump{Family: f, Chain: chain, Proto: e.proto}
		if e.multiport {
			j.Ports = e.ports
		}
		j.Owner, _ = hostport.ParseComment(e.comment)
		out = append(out, j)
	}
	return out, nil
}

func parseEntry(l layout, b []byte, off int) (entry, error) {
	if off+l.size > len(b) {
		return entry{}, fmt.Errorf("%w at %d: %d bytes left", errMalformed, off, len(b)-off)
	}
	h := b[off:]
	e := entry{off: off, next: int(binary.NativeEndian.Uint16(h[l.nextOff:])), verdict: -1}
	to := int(binary.NativeEndian.Uint16(h[l.targetOff:]))
	if e.next < l.size || off+e.next > len(b) || to < l.size || to+xtHeader > e.next {
		return entry{}, fmt.Errorf("%w at %d: offsets %d/%d", errMalformed, off, to, e.next)
	}
	if p := binary.NativeEndian.Uint16(h[l.proto:]); h[l.invflags]&l.protoInv == 0 && (l.flags < 0 || h[l.flags]&l.protoFlag != 0) {
		e.proto = protoNames[p]
	}
	for m := l.size; m < to; {
		size := int(binary.NativeEndian.Uint16(h[m:]))
		if size < xtHeader || m+size > to {
			return entry{}, fmt.Errorf("%w at %d: match of %d bytes", errMalformed, off, size)
		}
		name, rev, data := cstr(h[m+2:m+2+xtNameLen]), h[m+2+xtNameLen], h[m+xtHeader:m+size]
		switch {
		case name == "comment" && rev == 0 && len(data) >= commentLen:
			e.comment = cstr(data[:commentLen])
		case name == "multiport" && rev == 1:
			ports, ok := multiportV1(data)
			if !ok {
				return entry{}, fmt.Errorf("%w at %d: multiport match", errMalformed, off)
			}
			e.ports, e.multiport = ports, true
		}
		m += size
	}
	tsize := int(binary.NativeEndian.Uint16(h[to:]))
	if tsize < xtHeader || to+tsize > e.next {
		return entry{}, fmt.Errorf("%w at %d: target of %d bytes", errMalformed, off, tsize)
	}
	e.target = cstr(h[to+2 : to+2+xtNameLen])
	data := h[to+xtHeader : to+tsize]
	switch e.target {
	case "":
		if len(data) < 4 {
			return entry{}, fmt.Errorf("%w at %d: standard target", errMalformed, off)
		}
		e.verdict = int32(binary.NativeEndian.Uint32(data))
	case errorTarget:
		e.errName = cstr(data)
		if e.errName == "" {
			return entry{}, fmt.Errorf("%w at %d: error target without a name", errMalformed, off)
		}
	}
	return e, nil
}

// multiportV1 reads struct xt_multiport_v1 {u8 flags, count; u16 ports[15]; u8
// pflags[15], invert}: destination ports, not inverted; pflags[i] makes ports[i] and
// ports[i+1] a range. Anything else (source ports, inverted) matches no claim: nil.
func multiportV1(d []byte) ([]int, bool) {
	if len(d) < 2+2*multiportMax+multiportMax+1 {
		return nil, false
	}
	flags, count := d[0], int(d[1])
	if count > multiportMax {
		return nil, false
	}
	if flags != 1 || d[2+3*multiportMax] != 0 { // XT_MULTIPORT_DESTINATION, not inverted
		return nil, true
	}
	port := func(i int) int { return int(binary.NativeEndian.Uint16(d[2+2*i:])) }
	var out []int
	for i := 0; i < count; i++ {
		if d[2+2*multiportMax+i] != 0 && i+1 < count {
			lo, hi := port(i), port(i+1)
			if hi-lo > 1<<16 || hi < lo {
				return nil, false
			}
			for p := lo; p <= hi; p++ {
				out = append(out, p)
			}
			i++
			continue
		}
		out = append(out, port(i))
	}
	return out, true
}

func cstr(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}
