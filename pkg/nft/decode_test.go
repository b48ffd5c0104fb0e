package nft

import (
	"encoding/binary"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/portguard/portguard/pkg/hostport"
)

// enc builds a run of attributes the way the kernel sends them.
func enc(kv ...any) attrList {
	m := &msg{}
	for i := 0; i < len(kv); i += 2 {
		switch v := kv[i+1].(type) {
		case string:
			m.str(uint16(kv[i].(int)), v)
		case []byte:
			m.attr(uint16(kv[i].(int)), v)
		case attrList:
			m.attr(uint16(kv[i].(int))|unix.NLA_F_NESTED, v)
		}
	}
	return attrList(m.data)
}

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

func multiportInfo(flags, count byte, ports []uint16, ranges []int, invert byte) []byte {
	b := make([]byte, 48)
	b[0], b[1] = flags, count
	for i, p := range ports {
		binary.NativeEndian.PutUint16(b[2+2*i:], p)
	}
	for _, r := range ranges {
		b[32+r] = 1
	}
	b[47] = invert
	return b
}

func commentInfo(s string) []byte {
	b := make([]byte, 256)
	copy(b, s)
	return b
}

func jumpRule(comment string, mp []byte) Rule {
	verdict := enc(unix.NFTA_VERDICT_CODE, be32(uint32(0xfffffffd)), unix.NFTA_VERDICT_CHAIN, "CNI-DN-x")
	return Rule{Handle: 7, Exprs: []Expr{
		{"meta", enc(unix.NFTA_META_KEY, be32(unix.NFT_META_L4PROTO), unix.NFTA_META_DREG, be32(1))},
		{"cmp", enc(unix.NFTA_CMP_SREG, be32(1), unix.NFTA_CMP_OP, be32(unix.NFT_CMP_EQ), unix.NFTA_CMP_DATA, enc(unix.NFTA_DATA_VALUE, []byte{6}))},
		{"match", enc(unix.NFTA_MATCH_NAME, "comment", unix.NFTA_MATCH_REV, be32(0), unix.NFTA_MATCH_INFO, commentInfo(comment))},
		{"match", enc(unix.NFTA_MATCH_NAME, "multiport", unix.NFTA_MATCH_REV, be32(1), unix.NFTA_MATCH_INFO, mp)},
		{"counter", enc()},
		{"immediate", enc(unix.NFTA_IMMEDIATE_DREG, be32(0), unix.NFTA_IMMEDIATE_DATA, enc(unix.NFTA_DATA_VERDICT, verdict))},
	}}
}

func TestJumpArgs(t *testing.T) {
	r := jumpRule(`dnat name: "n" id: "c"`, multiportInfo(1, 4, []uint16{80, 8000, 8010, 9000}, []int{1}, 0))
	if r.Jump() != "CNI-DN-x" {
		t.Fatalf("Jump() = %q", r.Jump())
	}
	args, ok := ruleArgs(hostport.V4, r)
	want := `-p tcp -m comment --comment dnat name: "n" id: "c" -m multiport --dports 80,8000:8010,9000 -j CNI-DN-x`
	if !ok || strings.Join(args, " ") != want {
		t.Fatalf("ruleArgs = %q, %v; want %q", strings.Join(args, " "), ok, want)
	}
	for name, r := range map[string]Rule{
		"inverted ports":      jumpRule("c", multiportInfo(1, 1, []uint16{80}, nil, 1)),
		"source ports":        jumpRule("c", multiportInfo(0, 1, []uint16{80}, nil, 0)),
		"too many ports":      jumpRule("c", multiportInfo(1, 16, nil, nil, 0)),
		"range without end":   jumpRule("c", multiportInfo(1, 1, []uint16{80}, []int{0}, 0)),
		"newline in comment":  jumpRule("a\n-A PREROUTING -j ACCEPT", multiportInfo(1, 1, []uint16{80}, nil, 0)),
		"control in comment":  jumpRule("a\x1b", multiportInfo(1, 1, []uint16{80}, nil, 0)),
		"truncated multiport": jumpRule("c", []byte{1, 1, 80, 0}),
	} {
		if args, ok := ruleArgs(hostport.V4, r); ok {
			t.Errorf("%s: accepted as %q", name, args)
		}
	}
	other := jumpRule("c", multiportInfo(1, 1, []uint16{80}, nil, 0))
	other.Exprs = append(other.Exprs[:1:1], append([]Expr{{"payload", enc()}}, other.Exprs[1:]...)...)
	if args, ok := ruleArgs(hostport.V4, other); ok {
		t.Errorf("a rule with a payload match accepted as %q", args)
	}
}

func TestAttrsMalformed(t *testing.T) {
	good := enc(1, "abc", 2, be32(5))
	if l, err := attrs(good); err != nil || string(l.get(1)) != "abc\x00" || len(l.get(3)) != 0 {
		t.Fatalf("attrs(good) = %v, %v", l, err)
	}
	bad := append([]byte(nil), good...)
	binary.NativeEndian.PutUint16(bad[0:], 200) // longer than the run
	if _, err := attrs(bad); err == nil {
		t.Fatal("a length past the end was accepted")
	}
	if attrList(bad).get(2) != nil {
		t.Fatal("get read past a malformed attribute")
	}
	if _, err := parseRule(bad); err == nil {
		t.Fatal("parseRule accepted a malformed rule")
	}
}
