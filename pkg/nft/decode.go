package nft

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
)

// The decoder: what iptables-nft (1.8.x) writes for the host-port rules of portmap and
// portguard, read back from the kernel's expressions. It knows exactly these pieces:
//
//	-s/-d PREFIX, negated or not   payload (network header) [bitwise] cmp eq|neq
//	-p tcp|udp|sctp                meta l4proto, cmp eq
//	-m tcp|udp --dport N           payload (transport header + 2, 2 bytes), cmp eq
//	-m sctp --dport N              the same payload, or xt match sctp rev 0
//	-m comment --comment C         xt match comment rev 0
//	-m multiport --dports L        xt match multiport rev 1 (destination ports)
//	-j CHAIN                       immediate jump verdict
//	-j DNAT --to-destination A:P   xt target DNAT rev 2 (one address, one port)
//
// plus the counter iptables-nft adds to every rule. A rule holding anything else (another
// match, a userdata comment, a port range, another verdict) is not decoded, and callers
// leave it to iptables. Decoding allocates nothing: the result points into the message.

// ruleInfo is a decoded rule.
type ruleInfo struct {
	src, dst addrCond
	proto    byte // IPPROTO_*; 0 when the rule has no -p
	matches  [4]matchInfo
	nmatch   int
	jump     []byte // the chain of a jump verdict
	dnat     []byte // the info of a DNAT target
}

// addrCond is one -s or -d: the first bits bits of addr (host byte order is not involved:
// addresses are in network order, as in the packet).
type addrCond struct {
	set, neg bool
	addr     [16]byte
	bits     int
}

type matchKind uint8

const (
	matchPort      matchKind = iota + 1 // -m <proto> --dport N
	matchComment                        // -m comment --comment C
	matchMultiport                      // -m multiport --dports L
)

type matchInfo struct {
	kind matchKind
	port uint16
	info []byte
}

// Header offsets of the addresses iptables matches with -s and -d.
func addrOffsets(f hostport.Family) (src, dst uint32, size int) {
	if f == hostport.V6 {
		return 8, 24, 16
	}
	return 12, 16, 4
}

// decodeRule decodes a rule of family f; ok is false for any shape outside the list above.
func decodeRule(f hostport.Family, r Rule) (ri ruleInfo, ok bool) {
	if r.Userdata != nil {
		return ri, false // a comment kept as userdata: iptables -S shows it, we would not
	}
	xs := r.Exprs
	last := len(xs) - 1
	for i := 0; i <= last; i++ {
		x := xs[i]
		switch x.Name {
		case "counter":
		case "meta":
			// meta load l4proto => reg, cmp eq reg <proto>
			if ri.proto != 0 || i == last || !u32Is(x.Attrs.get(unix.NFTA_META_KEY), unix.NFT_META_L4PROTO) {
				return ri, false
			}
			v, eq, ok := cmpValue(xs[i+1], x.Attrs.get(unix.NFTA_META_DREG))
			if !ok || !eq || len(v) != 1 || protoNames[v[0]] == "" {
				return ri, false
			}
			ri.proto = v[0]
			i++
		case "payload":
			n, ok := ri.payload(f, xs[i:])
			if !ok {
				return ri, false
			}
			i += n - 1
		case "match":
			m, ok := ri.xtMatch(x)
			if !ok || ri.nmatch == len(ri.matches) {
				return ri, false
			}
			ri.matches[ri.nmatch] = m
			ri.nmatch++
		case "immediate":
			if i != last {
				return ri, false
			}
			if ri.jump = verdictChain(x); len(ri.jump) == 0 {
				return ri, false
			}
		case "target":
			if i != last || !bytes.Equal(x.Attrs.get(unix.NFTA_TARGET_NAME), []byte("DNAT\x00")) || !u32Is(x.Attrs.get(unix.NFTA_TARGET_REV), 2) {
				return ri, false
			}
			ri.dnat = x.Attrs.get(unix.NFTA_TARGET_INFO)
			if _, ok := dnatDest(f, ri.dnat); !ok {
				return ri, false
			}
		default:
			return ri, false
		}
	}
	return ri, ri.jump != nil || ri.dnat != nil
}

// cmpValue reads `cmp eq|neq reg <value>` comparing register reg; eq is false for neq.
func cmpValue(x Expr, reg []byte) (v []byte, eq, ok bool) {
	if x.Name != "cmp" || len(reg) != 4 || !bytes.Equal(x.Attrs.get(unix.NFTA_CMP_SREG), reg) {
		return nil, false, false
	}
	switch op := x.Attrs.get(unix.NFTA_CMP_OP); {
	case u32Is(op, unix.NFT_CMP_EQ):
		eq = true
	case u32Is(op, unix.NFT_CMP_NEQ):
	default:
		return nil, false, false
	}
	v = dataValue(x.Attrs.get(unix.NFTA_CMP_DATA))
	return v, eq, v != nil
}

// dataValue is the NFTA_DATA_VALUE inside a nested nft_data; nil when it is not one.
func dataValue(b []byte) []byte {
	v, err := attrs(b)
	if err != nil {
		return nil
	}
	return v.get(unix.NFTA_DATA_VALUE)
}

// payload decodes an address condition (payload, optional bitwise, cmp) or a destination
// port (payload, cmp eq) starting at xs[0]; n is the number of expressions used.
func (ri *ruleInfo) payload(f hostport.Family, xs []Expr) (n int, ok bool) {
	a := xs[0].Attrs
	reg := a.get(unix.NFTA_PAYLOAD_DREG)
	base, off, size := a.get(unix.NFTA_PAYLOAD_BASE), a.get(unix.NFTA_PAYLOAD_OFFSET), a.get(unix.NFTA_PAYLOAD_LEN)
	if len(base) != 4 || len(off) != 4 || len(size) != 4 || a.get(unix.NFTA_PAYLOAD_SREG) != nil {
		return 0, false
	}
	l := int(binary.BigEndian.Uint32(size))
	switch binary.BigEndian.Uint32(base) {
	case unix.NFT_PAYLOAD_TRANSPORT_HEADER:
		// The destination port; iptables-nft emits it after the protocol.
		if binary.BigEndian.Uint32(off) != 2 || l != 2 || ri.proto == 0 || len(xs) < 2 {
			return 0, false
		}
		v, eq, ok := cmpValue(xs[1], reg)
		if !ok || !eq || len(v) != 2 || ri.nmatch == len(ri.matches) {
			return 0, false
		}
		ri.matches[ri.nmatch] = matchInfo{kind: matchPort, port: binary.BigEndian.Uint16(v)}
		ri.nmatch++
		return 2, true
	case unix.NFT_PAYLOAD_NETWORK_HEADER:
	default:
		return 0, false
	}
	srcOff, dstOff, full := addrOffsets(f)
	var c *addrCond
	switch binary.BigEndian.Uint32(off) {
	case srcOff:
		c = &ri.src
	case dstOff:
		c = &ri.dst
	default:
		return 0, false
	}
	if c.set || l < 1 || l > full {
		return 0, false
	}
	// A prefix on a byte boundary loads just its bytes; any other loads the address and
	// masks it.
	bits, i := 8*l, 1
	var mask []byte
	if len(xs) > 1 && xs[1].Name == "bitwise" {
		b := xs[1].Attrs
		if !bytes.Equal(b.get(unix.NFTA_BITWISE_SREG), reg) || !bytes.Equal(b.get(unix.NFTA_BITWISE_DREG), reg) ||
			!u32Is(b.get(unix.NFTA_BITWISE_LEN), uint32(l)) || (b.get(nftaBitwiseOp) != nil && !u32Is(b.get(nftaBitwiseOp), 0)) {
			return 0, false
		}
		mask = dataValue(b.get(unix.NFTA_BITWISE_MASK))
		if len(mask) != l || !allZero(dataValue(b.get(unix.NFTA_BITWISE_XOR)), l) {
			return 0, false
		}
		if bits, ok = prefixLen(mask); !ok {
			return 0, false
		}
		i = 2
	}
	if len(xs) <= i {
		return 0, false
	}
	v, eq, ok := cmpValue(xs[i], reg)
	if !ok || len(v) != l {
		return 0, false
	}
	for k := range v {
		if mask != nil && v[k]&^mask[k] != 0 {
			return 0, false // host bits: iptables never writes them
		}
	}
	c.set, c.neg, c.bits = true, !eq, bits
	copy(c.addr[:], v)
	return i + 1, true
}

// nftaBitwiseOp is NFTA_BITWISE_OP (kernel 5.6 and later; 0 is mask-and-xor).
const nftaBitwiseOp = 6

// prefixLen reports the number of leading one bits of a mask made of ones then zeros.
func prefixLen(mask []byte) (int, bool) {
	n, done := 0, false
	for _, b := range mask {
		for bit := 7; bit >= 0; bit-- {
			one := b&(1<<bit) != 0
			switch {
			case one && done:
				return 0, false
			case one:
				n++
			default:
				done = true
			}
		}
	}
	return n, n > 0
}

func allZero(b []byte, l int) bool {
	if len(b) != l {
		return false
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// xtMatch decodes the xtables matches iptables-nft keeps as such.
func (ri *ruleInfo) xtMatch(x Expr) (matchInfo, bool) {
	info := x.Attrs.get(unix.NFTA_MATCH_INFO)
	rev := x.Attrs.get(unix.NFTA_MATCH_REV)
	name := x.Attrs.get(unix.NFTA_MATCH_NAME)
	if i := bytes.IndexByte(name, 0); i >= 0 {
		name = name[:i]
	}
	switch string(name) {
	case "comment":
		// Whether the text is printable is left to args: most comments are never rendered.
		if u32Is(rev, 0) && len(info) >= 256 {
			return matchInfo{kind: matchComment, info: info[:256]}, true
		}
	case "multiport":
		if u32Is(rev, 1) && ri.proto != 0 && multiportValid(info) {
			return matchInfo{kind: matchMultiport, info: info}, true
		}
	case "sctp":
		// struct xt_sctp_info {u16 dpts[2], spts[2]; u32 chunkmap[64], chunk_match_type;
		// struct {u8 chunktype, flag, flag_mask} flag_info[4]; int flag_count; u32 flags,
		// invflags} (host byte order): only a single destination port, not inverted.
		const flagsAt = 8 + 256 + 4 + 12 + 4
		if !u32Is(rev, 0) || ri.proto != unix.IPPROTO_SCTP || len(info) < flagsAt+8 {
			break
		}
		lo, hi := binary.NativeEndian.Uint16(info[0:]), binary.NativeEndian.Uint16(info[2:])
		const destPorts = 0x02 // XT_SCTP_DEST_PORTS
		if binary.NativeEndian.Uint32(info[flagsAt:]) == destPorts && binary.NativeEndian.Uint32(info[flagsAt+4:]) == 0 && lo == hi {
			return matchInfo{kind: matchPort, port: lo}, true
		}
	}
	return matchInfo{}, false
}

// verdictChain is the chain of an immediate jump verdict; nil for anything else.
func verdictChain(x Expr) []byte {
	data, err := attrs(x.Attrs.get(unix.NFTA_IMMEDIATE_DATA))
	if err != nil {
		return nil
	}
	v, err := attrs(data.get(unix.NFTA_DATA_VERDICT))
	code := v.get(unix.NFTA_VERDICT_CODE)
	if err != nil || len(code) != 4 || int32(binary.BigEndian.Uint32(code)) != unix.NFT_JUMP {
		return nil
	}
	name := v.get(unix.NFTA_VERDICT_CHAIN)
	if i := bytes.IndexByte(name, 0); i >= 0 {
		name = name[:i]
	}
	if len(name) == 0 || !printable(string(name)) || bytes.ContainsAny(name, " \"\\") {
		return nil
	}
	return name
}

// dnatDest reads struct nf_nat_range2 {u32 flags; nf_inet_addr min_addr, max_addr;
// be16 min_proto, max_proto, base_proto}: one address and one port, the shape of
// `--to-destination A:P`, nothing else.
func dnatDest(f hostport.Family, info []byte) (netip.AddrPort, bool) {
	const mapIPs, protoSpecified = 1, 2
	if len(info) < 4+16+16+6 || binary.NativeEndian.Uint32(info) != mapIPs|protoSpecified {
		return netip.AddrPort{}, false
	}
	lo, hi := info[4:20], info[20:36]
	plo, phi, pbase := info[36:38], info[38:40], info[40:42]
	if !bytes.Equal(lo, hi) || !bytes.Equal(plo, phi) || !allZero(pbase, 2) {
		return netip.AddrPort{}, false
	}
	var a netip.Addr
	if f == hostport.V6 {
		a = netip.AddrFrom16([16]byte(lo))
	} else {
		if !allZero(lo[4:], 12) {
			return netip.AddrPort{}, false
		}
		a = netip.AddrFrom4([4]byte(lo[:4]))
	}
	return netip.AddrPortFrom(a, binary.BigEndian.Uint16(plo)), true
}

// touches reports whether the rule could matter to an attachment whose chain is own and
// whose claims are these: it jumps to own, or it matches one of the claims' protocol
// and port (what plan.Check compares; host IPs are left to the planner).
func (ri *ruleInfo) touches(own string, claims []hostport.Claim) bool {
	if string(ri.jump) == own {
		return true
	}
	name := protoNames[ri.proto]
	for _, c := range claims {
		if c.Proto != name {
			continue
		}
		for _, m := range ri.matches[:ri.nmatch] {
			switch {
			case m.kind == matchPort && int(m.port) == c.HostPort:
				return true
			case m.kind == matchMultiport && multiportHas(m.info, c.HostPort):
				return true
			}
		}
	}
	return false
}

// args renders the rule as `iptables -S` prints it (the arguments after "-A CHAIN");
// ok is false when a comment is not printable text, which must never reach the
// line-based parser (a newline would end the rule).
func (ri *ruleInfo) args(f hostport.Family) (_ []string, ok bool) {
	out := make([]string, 0, 12)
	for _, c := range []struct {
		flag string
		a    *addrCond
	}{{"-s", &ri.src}, {"-d", &ri.dst}} {
		if !c.a.set {
			continue
		}
		if c.a.neg {
			out = append(out, "!")
		}
		out = append(out, c.flag, prefix(f, c.a).String())
	}
	if ri.proto != 0 {
		out = append(out, "-p", protoNames[ri.proto])
	}
	for _, m := range ri.matches[:ri.nmatch] {
		switch m.kind {
		case matchPort:
			out = append(out, "-m", protoNames[ri.proto], "--dport", strconv.Itoa(int(m.port)))
		case matchComment:
			c := cstr(m.info)
			if !printable(c) {
				return nil, false
			}
			out = append(out, "-m", "comment", "--comment", c)
		case matchMultiport:
			out = append(out, "-m", "multiport", "--dports", multiportList(m.info))
		}
	}
	if ri.dnat != nil {
		dest, _ := dnatDest(f, ri.dnat)
		return append(out, "-j", "DNAT", "--to-destination", dest.String()), true
	}
	return append(out, "-j", string(ri.jump)), true
}

func prefix(f hostport.Family, c *addrCond) netip.Prefix {
	a := netip.AddrFrom16(c.addr)
	if f == hostport.V4 {
		a = netip.AddrFrom4([4]byte(c.addr[:4]))
	}
	return netip.PrefixFrom(a, c.bits)
}

// ruleArgs decodes a rule into the arguments `iptables -S` prints for it.
func ruleArgs(f hostport.Family, r Rule) ([]string, bool) {
	ri, ok := decodeRule(f, r)
	if !ok {
		return nil, false
	}
	return ri.args(f)
}

// ReadChain reads a chain of table nat as `iptables -t nat -S CHAIN` shows its rules;
// exists is false when the chain does not exist. ok is false when any rule has a shape the
// decoder does not know, or the read failed: read it with iptables then.
func (c *Conn) ReadChain(f hostport.Family, chain string) (rules []iptables.Rule, exists, ok bool) {
	rules, _, exists, ok = c.ReadChainHandles(f, chain)
	return rules, exists, ok
}

// ReadChainHandles is ReadChain that also returns each rule's kernel handle
// (handles[i] is that of rules[i]), for a batch that deletes some of them by handle.
func (c *Conn) ReadChainHandles(f hostport.Family, chain string) (rules []iptables.Rule, handles []uint64, exists, ok bool) {
	nrs, exists, err := c.Rules(f, chain)
	if err != nil {
		return nil, nil, false, false
	}
	rules = make([]iptables.Rule, 0, len(nrs))
	handles = make([]uint64, 0, len(nrs))
	for _, r := range nrs {
		args, ok := ruleArgs(f, r)
		if !ok {
			return nil, nil, false, false
		}
		rules = append(rules, iptables.Rule{Chain: chain, Args: args})
		handles = append(handles, r.Handle)
	}
	return rules, handles, exists, true
}

var protoNames = map[byte]string{unix.IPPROTO_TCP: "tcp", unix.IPPROTO_UDP: "udp", unix.IPPROTO_SCTP: "sctp"}

// The multiport match: struct xt_multiport_v1 {u8 flags, count; u16 ports[15]; u8
// pflags[15], invert} (host byte order); only destination ports, not inverted.
const multiportMax = 15

func multiportValid(info []byte) bool {
	const n = multiportMax
	if len(info) < 2+2*n+n+1 {
		return false
	}
	flags, count, pflags := info[0], int(info[1]), info[2+2*n:2+3*n]
	if flags != 1 || info[2+3*n] != 0 || count == 0 || count > n {
		return false
	}
	for i := 0; i < count; i++ {
		if pflags[i] != 0 {
			if i+1 >= count {
				return false // a range without its end
			}
			i++
		}
	}
	return true
}

// multiportEach calls fn with each port (hi == lo, isRange false) or range of a valid
// multiport info, until fn returns false.
func multiportEach(info []byte, fn func(lo, hi int, isRange bool) bool) {
	const n = multiportMax
	count, pflags := int(info[1]), info[2+2*n:2+3*n]
	for i := 0; i < count; i++ {
		lo := int(binary.NativeEndian.Uint16(info[2+2*i:]))
		hi, isRange := lo, pflags[i] != 0
		if isRange {
			i++
			hi = int(binary.NativeEndian.Uint16(info[2+2*i:]))
		}
		if !fn(lo, hi, isRange) {
			return
		}
	}
}

func multiportHas(info []byte, port int) (has bool) {
	multiportEach(info, func(lo, hi int, _ bool) bool {
		has = lo <= port && port <= hi
		return !has
	})
	return has
}

// multiportList renders a valid multiport info as iptables does ("80,8000:8010").
func multiportList(info []byte) string {
	var b strings.Builder
	multiportEach(info, func(lo, hi int, isRange bool) bool {
		if b.Len() > 0 {
			b.WriteByte(',')
		}
		b.WriteString(strconv.Itoa(lo))
		if isRange {
			b.WriteByte(':')
			b.WriteString(strconv.Itoa(hi))
		}
		return true
	})
	return b.String()
}
