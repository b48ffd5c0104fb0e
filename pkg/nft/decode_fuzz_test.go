package nft

import (
	"encoding/binary"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
)

// encodeRule is a rule message as the kernel sends it (the attributes after nfgenmsg).
func encodeRule(chain string, handle uint64, xs []Expr) []byte {
	l := &msg{}
	for _, x := range xs {
		l.attr(unix.NFTA_LIST_ELEM|unix.NLA_F_NESTED, enc(unix.NFTA_EXPR_NAME, x.Name, unix.NFTA_EXPR_DATA, x.Attrs))
	}
	m := &msg{}
	m.str(unix.NFTA_RULE_TABLE, "nat").str(unix.NFTA_RULE_CHAIN, chain).u64(unix.NFTA_RULE_HANDLE, handle)
	m.attr(unix.NFTA_RULE_EXPRESSIONS|unix.NLA_F_NESTED, l.data)
	return m.data
}

func be16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }

func payloadExprs(base, off uint32, value, mask []byte, op uint32) []Expr {
	xs := []Expr{{"payload", enc(unix.NFTA_PAYLOAD_DREG, be32(1), unix.NFTA_PAYLOAD_BASE, be32(base),
		unix.NFTA_PAYLOAD_OFFSET, be32(off), unix.NFTA_PAYLOAD_LEN, be32(uint32(len(value))))}}
	if mask != nil {
		xs = append(xs, Expr{"bitwise", enc(unix.NFTA_BITWISE_SREG, be32(1), unix.NFTA_BITWISE_DREG, be32(1),
			unix.NFTA_BITWISE_LEN, be32(uint32(len(value))), unix.NFTA_BITWISE_MASK, enc(unix.NFTA_DATA_VALUE, mask),
			unix.NFTA_BITWISE_XOR, enc(unix.NFTA_DATA_VALUE, make([]byte, len(value))))})
	}
	return append(xs, Expr{"cmp", enc(unix.NFTA_CMP_SREG, be32(1), unix.NFTA_CMP_OP, be32(op), unix.NFTA_CMP_DATA, enc(unix.NFTA_DATA_VALUE, value))})
}

func dnatInfo(addr []byte, port uint16) []byte {
	b := make([]byte, 48)
	binary.NativeEndian.PutUint32(b, 3)
	copy(b[4:], addr)
	copy(b[20:], addr)
	binary.BigEndian.PutUint16(b[36:], port)
	binary.BigEndian.PutUint16(b[38:], port)
	return b
}

// dnatRule is `-s 10.244.0.0/12 ! -d 192.0.2.1 -p tcp --dport 8080 -j DNAT --to-destination 10.244.0.9:80`.
func dnatRule() []Expr {
	xs := jumpRule("c", multiportInfo(1, 1, []uint16{80}, nil, 0)).Exprs[:2]
	xs = append(xs, payloadExprs(unix.NFT_PAYLOAD_NETWORK_HEADER, 12, []byte{10, 240, 0, 0}, []byte{255, 240, 0, 0}, unix.NFT_CMP_EQ)...)
	xs = append(xs, payloadExprs(unix.NFT_PAYLOAD_NETWORK_HEADER, 16, []byte{192, 0, 2, 1}, nil, unix.NFT_CMP_NEQ)...)
	xs = append(xs, payloadExprs(unix.NFT_PAYLOAD_TRANSPORT_HEADER, 2, be16(8080), nil, unix.NFT_CMP_EQ)...)
	return append(xs, Expr{"counter", enc()}, Expr{"target", enc(unix.NFTA_TARGET_NAME, "DNAT", unix.NFTA_TARGET_REV, be32(2), unix.NFTA_TARGET_INFO, dnatInfo([]byte{10, 244, 0, 9}, 80))})
}

func TestDecodeBuiltRules(t *testing.T) {
	r, err := parseRule(encodeRule("CNI-DN-x", 9, dnatRule()))
	if err != nil {
		t.Fatal(err)
	}
	args, ok := ruleArgs(hostport.V4, r)
	want := "-s 10.240.0.0/12 ! -d 192.0.2.1/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.244.0.9:80"
	if !ok || strings.Join(args, " ") != want {
		t.Fatalf("ruleArgs = %q, %v; want %q", strings.Join(args, " "), ok, want)
	}
	// Host bits under the mask, a mask with a hole, a port range: declined.
	for name, change := range map[string]func([]Expr){
		"host bits": func(xs []Expr) {
			copy(xs[2:5], payloadExprs(unix.NFT_PAYLOAD_NETWORK_HEADER, 12, []byte{10, 241, 0, 0}, []byte{255, 240, 0, 0}, unix.NFT_CMP_EQ))
		},
		"holed mask": func(xs []Expr) {
			copy(xs[2:5], payloadExprs(unix.NFT_PAYLOAD_NETWORK_HEADER, 12, []byte{10, 0, 0, 0}, []byte{255, 0, 255, 0}, unix.NFT_CMP_EQ))
		},
		"ordered cmp": func(xs []Expr) {
			copy(xs[7:9], payloadExprs(unix.NFT_PAYLOAD_TRANSPORT_HEADER, 2, be16(8080), nil, unix.NFT_CMP_GTE))
		},
		"source port": func(xs []Expr) {
			copy(xs[7:9], payloadExprs(unix.NFT_PAYLOAD_TRANSPORT_HEADER, 0, be16(8080), nil, unix.NFT_CMP_EQ))
		},
		"IPv6 offsets": func(xs []Expr) {
			copy(xs[5:7], payloadExprs(unix.NFT_PAYLOAD_NETWORK_HEADER, 24, []byte{192, 0, 2, 1}, nil, unix.NFT_CMP_EQ))
		},
	} {
		xs := dnatRule()
		change(xs)
		r, err := parseRule(encodeRule("CNI-DN-x", 9, xs))
		if err != nil {
			t.Fatal(err)
		}
		if args, ok := ruleArgs(hostport.V4, r); ok {
			t.Errorf("%s: accepted as %q", name, args)
		}
	}
}

// FuzzDecodeRule: any bytes as a rule message. The decoder never panics, and what it
// accepts renders as arguments iptables-restore reads back unchanged (no line breaks, no
// control characters), whichever family.
func FuzzDecodeRule(f *testing.F) {
	f.Add(encodeRule("CNI-DN-x", 9, dnatRule()))
	f.Add(encodeRule("CNI-HOSTPORT-DNAT", 7, jumpRule(`dnat name: "n" id: "c"`, multiportInfo(1, 4, []uint16{80, 8000, 8010, 9000}, []int{1}, 0)).Exprs))
	f.Add(encodeRule("CNI-DN-x", 3, payloadExprs(unix.NFT_PAYLOAD_NETWORK_HEADER, 8, make([]byte, 16), append(make([]byte, 15), 0xf0), unix.NFT_CMP_NEQ)))
	f.Fuzz(func(t *testing.T, b []byte) {
		var r Rule
		if parseRuleInto(b, &r) != nil {
			return
		}
		for _, fam := range hostport.Families {
			ri, ok := decodeRule(fam, r)
			if !ok {
				continue
			}
			ri.touches("CNI-DN-x", []hostport.Claim{{Family: fam, Proto: "tcp", HostPort: 80}, {Family: fam, Proto: "sctp", HostPort: 0}})
			args, ok := ri.args(fam)
			if !ok {
				continue
			}
			for _, a := range args {
				if err := iptables.CheckArg(a); err != nil {
					t.Fatalf("%s: %v in %q", fam, err, args)
				}
			}
			back, err := iptables.SplitArgs(iptables.JoinArgs(args))
			if err != nil || strings.Join(back, "\x00") != strings.Join(args, "\x00") {
				t.Fatalf("%s: %q reads back as %q (%v)", fam, args, back, err)
			}
		}
	})
}
