package nftables

import (
	"bytes"
	"net/netip"
	"testing"

	gnft "github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/nft"
)

// Fuzz tests of the decoders that read what the kernel hands back: elements of the claim
// maps (decodeElement), hairpin entries (decodeSubnet) and rules of upstream's cni_hostport
// tables (decodeUpstream). Anything may sit in those tables (another tool, a hostile
// writer with CAP_NET_ADMIN, a newer layout), so whatever the bytes, the decoders never
// panic, and what they accept is well-formed in the family it was read from.

func famOf(v6 bool) hostport.Family {
	if v6 {
		return hostport.V6
	}
	return hostport.V4
}

// FuzzDecodeElement: any key, value and comment as an element of a NAT map. Accepted, the
// element is a claim of the map's family (host IP exactly for the hostIP map, of that
// family), its destination an address of that family, and decoding is a fixed point: its
// canonical encoding decodes to the same element.
func FuzzDecodeElement(f *testing.F) {
	for _, e := range []Element{
		{Claim: hostport.Claim{Family: hostport.V4, Proto: "tcp", HostPort: 8080}, Dest: netip.MustParseAddrPort("10.0.0.5:80"), Comment: "net/id"},
		{Claim: hostport.Claim{Family: hostport.V6, Proto: "udp", HostIP: netip.MustParseAddr("fd00::1"), HostPort: 53}, Dest: netip.MustParseAddrPort("[fd00::5]:5353"), Comment: "sha256:00"},
	} {
		n := e.elem()
		f.Add(e.Claim.Family == hostport.V6, !e.Claim.AnyHostIP(), n.Key, n.Data, n.Comment)
	}
	f.Add(false, true, []byte{1, 2, 3}, []byte{}, "")
	f.Fuzz(func(t *testing.T, v6, hostIP bool, key, data []byte, comment string) {
		fam := famOf(v6)
		e, err := decodeElement(fam, hostIP, nft.Elem{Key: key, Data: data, Comment: comment})
		if err != nil {
			return
		}
		c := e.Claim
		if c.Family != fam || c.HostPort < 0 || c.HostPort > 65535 || c.Proto == "" {
			t.Fatalf("decoded claim %+v from a %s map", c, fam)
		}
		if c.AnyHostIP() == hostIP || (hostIP && hostport.Of(c.HostIP) != fam) {
			t.Fatalf("decoded host IP %v from a %s map (hostIP map: %v)", c.HostIP, fam, hostIP)
		}
		if !e.Dest.Addr().IsValid() || hostport.Of(e.Dest.Addr()) != fam {
			t.Fatalf("decoded destination %v from a %s map", e.Dest, fam)
		}
		if owner, ok := ParseOwner(comment); ok && (owner != e.Owner || OwnerComment(owner) != comment) {
			t.Fatalf("comment %q: owner %v, which names itself %q", comment, e.Owner, OwnerComment(owner))
		}
		if _, known := protoNum[c.Proto]; !known {
			return // an unknown protocol has no canonical key of portguard's
		}
		back, err := decodeElement(fam, hostIP, e.elem())
		if err != nil || back != e {
			t.Fatalf("%v re-encoded as %x : %x decodes to %v, %v", e, e.elem().Key, e.elem().Data, back, err)
		}
	})
}

// FuzzDecodeSubnet: any interval entry as a hairpin entry. Accepted, it is a prefix of the
// set's family whose entry, written back, is exactly the bytes read.
func FuzzDecodeSubnet(f *testing.F) {
	for _, s := range []string{"10.88.0.0/24", "0.0.0.0/0", "fd00:71::/64", "2001:db8::1/128"} {
		p := netip.MustParsePrefix(s)
		e := subnetElem(p, "hairpin")
		f.Add(p.Addr().Is6(), e.Key, e.KeyEnd)
	}
	f.Fuzz(func(t *testing.T, v6 bool, key, keyEnd []byte) {
		fam := famOf(v6)
		e := nft.Elem{Key: key, KeyEnd: keyEnd}
		p, ok := decodeSubnet(fam, e)
		if !ok {
			return
		}
		if !p.IsValid() || hostport.Of(p.Addr()) != fam || p.Masked() != p {
			t.Fatalf("decoded %v from a %s set", p, fam)
		}
		back := subnetElem(p, "")
		if !bytes.Equal(back.Key, key) || !bytes.Equal(back.KeyEnd, keyEnd) {
			t.Fatalf("%x-%x decoded as %v, which is %x-%x", key, keyEnd, p, back.Key, back.KeyEnd)
		}
	})
}

// upstreamSeed is a rule of upstream portmap's nftables backend as the kernel lists it:
// `ip daddr 192.0.2.1 tcp dport 8080 dnat ip to 10.88.0.2:80 comment "<id>"` (hostports) or
// `ip daddr 10.88.0.2 masquerade` (masquerading), each expression as its kernel attributes.
func upstreamSeed(f hostport.Family, masq bool) []byte {
	doff, w := addrField(f, true)
	addr := []byte{192, 0, 2, 1}
	pod := []byte{10, 88, 0, 2}
	if f == hostport.V6 {
		addr = netip.MustParseAddr("2001:db8::1").AsSlice()
		pod = netip.MustParseAddr("fd00:88::2").AsSlice()
	}
	var xs []expr.Any
	if masq {
		xs = []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: doff, Len: w},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: pod},
			&expr.Masq{},
		}
	} else {
		xs = []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: doff, Len: w},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: addr},
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0x1f, 0x90}},
			&expr.Immediate{Register: 1, Data: pod},
			&expr.Immediate{Register: 2, Data: []byte{0, 80}},
			&expr.NAT{Type: expr.NATTypeDestNAT, Family: uint32(upstreamFamily(f)), RegAddrMin: 1, RegProtoMin: 2},
		}
	}
	var out []byte
	for _, x := range xs {
		b, err := expr.MarshalExprData(byte(upstreamFamily(f)), x)
		if err != nil {
			panic(err)
		}
		out = append(out, exprKind(x), byte(len(b)))
		out = append(out, b...)
	}
	return out
}

// The expression kinds decodeUpstream reads, in the order a fuzz input's kind byte names them.
func newExpr(kind byte) expr.Any {
	switch kind % 6 {
	case 0:
		return &expr.Payload{}
	case 1:
		return &expr.Meta{}
	case 2:
		return &expr.Cmp{}
	case 3:
		return &expr.Immediate{}
	case 4:
		return &expr.NAT{}
	}
	return &expr.Masq{}
}

func exprKind(x expr.Any) byte {
	switch x.(type) {
	case *expr.Payload:
		return 0
	case *expr.Meta:
		return 1
	case *expr.Cmp:
		return 2
	case *expr.Immediate:
		return 3
	case *expr.NAT:
		return 4
	}
	return 5
}

// FuzzDecodeUpstream: any sequence of expressions, each unmarshalled by google/nftables
// from fuzzed kernel attributes (input: kind, length, attribute bytes, repeated), with any
// comment, as a rule of either upstream chain in either family. The decoder never panics;
// what it accepts names a container, and a hostports rule a claim of the table's family
// (protocol, port 1-65535, host IP of the family or none) forwarding to an address and
// port, a masquerading rule a pod address.
func FuzzDecodeUpstream(f *testing.F) {
	for _, fam := range hostport.Families {
		for _, masq := range []bool{false, true} {
			f.Add(fam == hostport.V6, masq, upstreamSeed(fam, masq), "cnitool-0123456789abcdef0123")
		}
	}
	f.Fuzz(func(t *testing.T, v6, masq bool, b []byte, comment string) {
		fam := famOf(v6)
		r := &gnft.Rule{Handle: 7, UserData: userdata.AppendString(nil, userdata.TypeComment, comment)}
		for len(b) >= 2 {
			kind, n := b[0], int(b[1])
			b = b[2:]
			if n > len(b) {
				n = len(b)
			}
			x := newExpr(kind)
			if expr.Unmarshal(byte(upstreamFamily(fam)), b[:n], x) == nil {
				r.Exprs = append(r.Exprs, x)
			}
			b = b[n:]
		}
		chain := UpstreamHostports
		if masq {
			chain = UpstreamMasquerades
		}
		u, ok := decodeUpstream(fam, chain, r)
		if !ok {
			return
		}
		if u.Family != fam || u.Chain != chain || u.Handle != 7 || u.ContainerID == "" {
			t.Fatalf("decoded %+v from %s %s", u, fam, chain)
		}
		if masq {
			if u.Claim != (hostport.Claim{}) || !u.Dest.Addr().IsValid() {
				t.Fatalf("masquerading rule decoded as %+v", u)
			}
			return
		}
		c := u.Claim
		if c.Family != fam || c.Proto == "" || c.HostPort < 1 || c.HostPort > 65535 || !u.Dest.Addr().IsValid() {
			t.Fatalf("hostports rule decoded as %+v", u)
		}
		if !c.AnyHostIP() && hostport.Of(c.HostIP) != fam {
			t.Fatalf("%s hostports rule decoded with host IP %v", fam, c.HostIP)
		}
	})
}

// The fuzz seeds of FuzzDecodeUpstream decode to the rules they stand for, so the fuzzer
// starts from inputs the decoder accepts.
func TestUpstreamSeedsDecode(t *testing.T) {
	for _, fam := range hostport.Families {
		for _, masq := range []bool{false, true} {
			b := upstreamSeed(fam, masq)
			r := &gnft.Rule{UserData: userdata.AppendString(nil, userdata.TypeComment, "c1")}
			for len(b) >= 2 {
				x := newExpr(b[0])
				if err := expr.Unmarshal(byte(upstreamFamily(fam)), b[2:2+int(b[1])], x); err != nil {
					t.Fatal(err)
				}
				r.Exprs = append(r.Exprs, x)
				b = b[2+int(b[1]):]
			}
			chain := UpstreamHostports
			if masq {
				chain = UpstreamMasquerades
			}
			u, ok := decodeUpstream(fam, chain, r)
			if !ok || u.ContainerID != "c1" || (!masq && (u.Claim.HostPort != 8080 || u.Claim.Proto != "tcp" || u.Dest.Port() != 80)) {
				t.Errorf("%s %s seed: %+v, %v", fam, chain, u, ok)
			}
		}
	}
}
