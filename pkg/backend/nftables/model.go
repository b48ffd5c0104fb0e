package nftables

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/netip"
	"strings"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/nft"
)

// Element is one claim as the table holds it: the claim (hostIP unset for the wildcard
// map), where it forwards to, and who owns it.
type Element struct {
	Claim hostport.Claim
	Dest  netip.AddrPort
	// Owner is parsed from Comment; zero when the comment is a hash (owners longer than
	// nft.MaxComment): match those with OwnedBy against the owners portguard recorded.
	Owner   hostport.Owner
	Comment string
}

// OwnedBy reports whether o owns the element (by name, or by hash for long owners).
func (e Element) OwnedBy(o hostport.Owner) bool { return e.Comment == OwnerComment(o) }

func (e Element) String() string {
	who := e.Owner.String()
	if e.Owner.IsZero() {
		who = e.Comment
	}
	return fmt.Sprintf("%s -> %s (%s)", e.Claim, e.Dest, who)
}

// MasqElement is one masquerade entry: DNATed flows from Source to PodIP are masqueraded.
type MasqElement struct {
	Family  hostport.Family
	PodIP   netip.Addr
	Source  netip.Prefix
	Owner   hostport.Owner
	Comment string
}

// OwnedBy reports whether o owns the entry.
func (m MasqElement) OwnedBy(o hostport.Owner) bool { return m.Comment == OwnerComment(o) }

// hashPrefix starts the comment of an owner too long for an element comment.
const hashPrefix = "sha256:"

// OwnerComment is the element comment naming o: "network/containerID" (neither may contain
// a slash, by the CNI grammar), or for owners longer than the kernel's 128 bytes
// "sha256:" and the hex digest of that string; portguard's attachment records
// (pkg/liveness) keep the owner, so the hash can be matched back with OwnedBy.
func OwnerComment(o hostport.Owner) string {
	s := o.Network + "/" + o.ContainerID
	if len(s) <= nft.MaxComment {
		return s
	}
	sum := sha256.Sum256([]byte(s))
	return hashPrefix + hex.EncodeToString(sum[:])
}

// ParseOwner reads an element comment; ok is false for hashes and foreign comments.
func ParseOwner(c string) (hostport.Owner, bool) {
	if strings.HasPrefix(c, hashPrefix) {
		return hostport.Owner{}, false
	}
	n, id, ok := strings.Cut(c, "/")
	if !ok || !hostport.ValidNetworkName(n) || !hostport.ValidContainerID(id) {
		return hostport.Owner{}, false
	}
	return hostport.Owner{Network: n, ContainerID: id}, true
}

var protoNum = map[string]byte{"tcp": 6, "udp": 17, "sctp": 132}

func protoName(b byte) string {
	for n, v := range protoNum {
		if v == b {
			return n
		}
	}
	return fmt.Sprintf("proto-%d", b)
}

// addr returns the address in its family's width.
func addrBytes(f hostport.Family, a netip.Addr) []byte {
	if f == hostport.V4 {
		b := a.Unmap().As4()
		return b[:]
	}
	b := a.As16()
	return b[:]
}

func pad4(b []byte) []byte {
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func protoPort(proto string, port int) []byte {
	b := pad4([]byte{protoNum[proto]})
	return append(b, pad4(binary.BigEndian.AppendUint16(nil, uint16(port)))...)
}

// key returns the map and key of a claim's element.
func claimKey(c hostport.Claim) (set string, key []byte) {
	if c.AnyHostIP() {
		return setName(setAny, c.Family), protoPort(c.Proto, c.HostPort)
	}
	return setName(setHostIP, c.Family), append(addrBytes(c.Family, c.HostIP), protoPort(c.Proto, c.HostPort)...)
}

func destBytes(f hostport.Family, d netip.AddrPort) []byte {
	return append(addrBytes(f, d.Addr()), pad4(binary.BigEndian.AppendUint16(nil, d.Port()))...)
}

func addrFrom(b []byte) (netip.Addr, bool) {
	switch len(b) {
	case 4:
		return netip.AddrFrom4([4]byte(b)), true
	case 16:
		return netip.AddrFrom16([16]byte(b)), true
	}
	return netip.Addr{}, false
}

// decodeElement turns a NAT map element back into the shared model.
func decodeElement(f hostport.Family, hostIP bool, e nft.Elem) (Element, error) {
	w := 4
	if f == hostport.V6 {
		w = 16
	}
	k := e.Key
	want := 8
	if hostIP {
		want += w
	}
	if len(k) != want || len(e.Data) != w+4 {
		return Element{}, fmt.Errorf("element of %d/%d bytes in a %s map", len(k), len(e.Data), f)
	}
	c := hostport.Claim{Family: f}
	if hostIP {
		c.HostIP, _ = addrFrom(k[:w])
		k = k[w:]
	}
	c.Proto = protoName(k[0])
	c.HostPort = int(binary.BigEndian.Uint16(k[4:6]))
	a, _ := addrFrom(e.Data[:w])
	out := Element{Claim: c, Dest: netip.AddrPortFrom(a, binary.BigEndian.Uint16(e.Data[w:w+2])), Comment: e.Comment}
	out.Owner, _ = ParseOwner(e.Comment)
	return out, nil
}

func (e Element) elem() nft.Elem {
	_, k := claimKey(e.Claim)
	return nft.Elem{Key: k, Data: destBytes(e.Claim.Family, e.Dest), Comment: e.Comment}
}

// lastAddr is the last address of a prefix.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	bits := p.Bits()
	for i := range b {
		for j := 7; j >= 0; j-- {
			if i*8+(7-j) >= bits {
				b[i] |= 1 << j
			}
		}
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

func (m MasqElement) elem() nft.Elem {
	pod := addrBytes(m.Family, m.PodIP)
	start := append(append([]byte(nil), pod...), addrBytes(m.Family, m.Source.Masked().Addr())...)
	end := append(append([]byte(nil), pod...), addrBytes(m.Family, lastAddr(m.Source))...)
	return nft.Elem{Key: start, KeyEnd: end, Comment: m.Comment}
}

func decodeMasq(f hostport.Family, e nft.Elem) (MasqElement, error) {
	w := 4
	if f == hostport.V6 {
		w = 16
	}
	if len(e.Key) != 2*w || len(e.KeyEnd) != 2*w {
		return MasqElement{}, fmt.Errorf("masquerade element of %d bytes in a %s set", len(e.Key), f)
	}
	pod, _ := addrFrom(e.Key[:w])
	lo, _ := addrFrom(e.Key[w:])
	hi, _ := addrFrom(e.KeyEnd[w:])
	// The range is a prefix (portguard writes only prefixes): the bits where lo and hi agree.
	bits := 0
	lb, hb := lo.AsSlice(), hi.AsSlice()
	for i := 0; i < len(lb)*8; i++ {
		if (lb[i/8]>>(7-i%8))&1 != (hb[i/8]>>(7-i%8))&1 {
			break
		}
		bits++
	}
	m := MasqElement{Family: f, PodIP: pod, Source: netip.PrefixFrom(lo, bits), Comment: e.Comment}
	m.Owner, _ = ParseOwner(e.Comment)
	return m, nil
}

// guard values: the wildcard claim of a port, or the number of hostIP claims on it. The
// kernel refuses a second value for a key, so a wildcard claim (created with EXCL) and a
// hostIP claim (which needs the count) refuse each other whatever order they come in.
const guardWildcard = 0

// Guard values are marks, which nft keeps in host byte order.
func guardData(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }

func binaryNative(b []byte) uint32 { return binary.NativeEndian.Uint32(b) }

// MasqFor is the masquerade the iptables backend applies with snat, per pod address (pod
// with its subnet's prefix length): flows from the pod's own subnet (hairpin) and, for IPv4,
// from 127.0.0.1 (localhost, needs route_localnet); with masqAll, from every source.
func MasqFor(pod netip.Prefix, masqAll bool, o hostport.Owner) []MasqElement {
	f := hostport.Of(pod.Addr())
	a := pod.Addr().Unmap()
	c := OwnerComment(o)
	if masqAll {
		all := netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		if f == hostport.V6 {
			all = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
		return []MasqElement{{Family: f, PodIP: a, Source: all, Owner: o, Comment: c}}
	}
	out := []MasqElement{{Family: f, PodIP: a, Source: netip.PrefixFrom(a, pod.Bits()).Masked(), Owner: o, Comment: c}}
	if f == hostport.V4 {
		out = append(out, MasqElement{Family: f, PodIP: a, Source: netip.MustParsePrefix("127.0.0.1/32"), Owner: o, Comment: c})
	}
	return out
}
