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
	// Gate is the conditions chain the claim's gate element jumps to ("" when the claim has
	// no conditions); removing the claim removes the gate with it.
	Gate string
}

// OwnedBy reports whether o owns the element (by name, or by hash for long owners).
func (e Element) OwnedBy(o hostport.Owner) bool { return e.Comment == OwnerComment(o) }

func (e Element) String() string {
	who := e.Owner.String()
	if e.Owner.IsZero() {
		who = e.Comment
	}
	if e.Gate != "" {
		who += " if " + e.Gate
	}
	return fmt.Sprintf("%s -> %s (%s)", e.Claim, e.Dest, who)
}

// MasqElement is one pod address with snat: DNATed flows to it are masqueraded when they
// come from its subnet (hairpin) or, for IPv4, from 127.0.0.1; with All, from every source.
type MasqElement struct {
	Family  hostport.Family
	PodIP   netip.Addr
	All     bool // masqAll
	Owner   hostport.Owner
	Comment string
}

// OwnedBy reports whether o owns the entry.
func (m MasqElement) OwnedBy(o hostport.Owner) bool { return m.Comment == OwnerComment(o) }

func (m MasqElement) set() string {
	if m.All {
		return setName(setMasqAll, m.Family)
	}
	return setName(setSNAT, m.Family)
}

func (m MasqElement) elem() nft.Elem {
	return nft.Elem{Key: addrBytes(m.Family, m.PodIP), Comment: m.Comment}
}

// SNAT asks for masquerade of DNATed flows to one pod address, as the iptables backend
// does with snat: Pod is the address with its subnet's prefix length; All is masqAll.
type SNAT struct {
	Pod netip.Prefix
	All bool
}

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

// ParseOwner reads an element comment; ok is false for hashes and foreign comments, so an
// owner it returns is one whose OwnerComment is c (a plain comment longer than
// nft.MaxComment is another writer's: portguard names such an owner by its hash).
func ParseOwner(c string) (hostport.Owner, bool) {
	if strings.HasPrefix(c, hashPrefix) || len(c) > nft.MaxComment {
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

// gateSet is the verdict map holding the gate of a claim (same key as its NAT element).
func gateSet(c hostport.Claim) string {
	if c.AnyHostIP() {
		return setName(setGateAny, c.Family)
	}
	return setName(setGateHostIP, c.Family)
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
	c := decodeKey(f, hostIP, k)
	// Portguard writes the unspecified address to the wildcard map, never to the host IP
	// map: read as a wildcard claim, such an element (another writer's) would be named by a
	// key of the other map, and a deletion of it would fail every time.
	if hostIP && c.HostIP.IsUnspecified() {
		return Element{}, fmt.Errorf("element with host IP %s in the %s host IP map", c.HostIP, f)
	}
	a, _ := addrFrom(e.Data[:w])
	out := Element{Claim: c, Dest: netip.AddrPortFrom(a, binary.BigEndian.Uint16(e.Data[w:w+2])), Comment: e.Comment}
	out.Owner, _ = ParseOwner(e.Comment)
	return out, nil
}

// decodeKey reads a claim back from a map key of the right length (hostIP: with the
// address first).
func decodeKey(f hostport.Family, hostIP bool, k []byte) hostport.Claim {
	c := hostport.Claim{Family: f}
	if hostIP {
		w := 4
		if f == hostport.V6 {
			w = 16
		}
		c.HostIP, _ = addrFrom(k[:w])
		k = k[w:]
	}
	c.Proto = protoName(k[0])
	c.HostPort = int(binary.BigEndian.Uint16(k[4:6]))
	return c
}

func (e Element) elem() nft.Elem {
	_, k := claimKey(e.Claim)
	return nft.Elem{Key: k, Data: destBytes(e.Claim.Family, e.Dest), Comment: e.Comment}
}

// lastAddr is the last address of a prefix.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 1 << (7 - i%8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// subnetElem is the hairpin entry of a pod subnet: source and destination both in it.
func subnetElem(p netip.Prefix, comment string) nft.Elem {
	f := hostport.Of(p.Addr())
	lo, hi := addrBytes(f, p.Masked().Addr()), addrBytes(f, lastAddr(p))
	return nft.Elem{Key: append(append([]byte(nil), lo...), lo...), KeyEnd: append(append([]byte(nil), hi...), hi...), Comment: comment}
}

// decodeSubnet reads a hairpin entry back; ok is false for entries portguard does not write
// (source and destination ranges that differ, or ranges that are not prefixes).
func decodeSubnet(f hostport.Family, e nft.Elem) (netip.Prefix, bool) {
	w := 4
	if f == hostport.V6 {
		w = 16
	}
	if len(e.Key) != 2*w || len(e.KeyEnd) != 2*w || string(e.Key[:w]) != string(e.Key[w:]) || string(e.KeyEnd[:w]) != string(e.KeyEnd[w:]) {
		return netip.Prefix{}, false
	}
	lo, _ := addrFrom(e.Key[:w])
	hi, _ := addrFrom(e.KeyEnd[:w])
	for bits := 0; bits <= w*8; bits++ {
		p := netip.PrefixFrom(lo, bits)
		if p.Masked().Addr() == lo && lastAddr(p) == hi {
			return p, true
		}
	}
	return netip.Prefix{}, false
}

// guard values: the wildcard claim of a port, or the number of hostIP claims on it. The
// kernel refuses a second value for a key, so a wildcard claim (created with EXCL) and a
// hostIP claim (which needs the count) refuse each other whatever order they come in.
const guardWildcard = 0

// Guard values are opaque to the kernel; big endian, because nft lists a map's mark values
// so when the map does not record a byte order, and a count of 1 then reads 0x00000001.
func guardData(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

func guardValue(b []byte) uint32 { return binary.BigEndian.Uint32(b) }
