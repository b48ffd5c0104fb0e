package nftcond

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"

	"github.com/portguard/portguard/pkg/hostport"
)

func TestParseAccepts(t *testing.T) {
	for _, tc := range []struct {
		f    hostport.Family
		in   []string
		want string
	}{
		// Upstream joins items with spaces: tokens or whole fragments are the same.
		{hostport.V4, []string{"ip", "saddr", "192.0.2.1"}, "ip saddr 192.0.2.1"},
		{hostport.V4, []string{"ip saddr 192.0.2.1"}, "ip saddr 192.0.2.1"},
		{hostport.V4, []string{"ip saddr == 192.0.2.1"}, "ip saddr 192.0.2.1"},
		{hostport.V4, []string{"ip saddr eq 192.0.2.1"}, "ip saddr 192.0.2.1"},
		{hostport.V4, []string{"ip daddr != 192.0.2.1"}, "ip daddr != 192.0.2.1"},
		{hostport.V4, []string{"ip daddr ne 192.0.2.1"}, "ip daddr != 192.0.2.1"},
		{hostport.V4, []string{"ip saddr 10.0.0.0/8"}, "ip saddr 10.0.0.0/8"},
		{hostport.V4, []string{"ip saddr 10.1.2.3/8"}, "ip saddr 10.0.0.0/8"},
		{hostport.V4, []string{"ip saddr 10.0.0.0/20"}, "ip saddr 10.0.0.0/20"},
		{hostport.V4, []string{"ip saddr 192.0.2.1/32"}, "ip saddr 192.0.2.1"},
		{hostport.V4, []string{"ip saddr != 10.0.0.0/8"}, "ip saddr != 10.0.0.0/8"},
		{hostport.V4, []string{"ip saddr 192.0.2.1-192.0.2.5"}, "ip saddr { 192.0.2.1-192.0.2.5 }"},
		{hostport.V4, []string{"ip saddr 192.0.2.0-192.0.2.255"}, "ip saddr 192.0.2.0/24"},
		{hostport.V4, []string{"ip saddr { 192.0.2.1, 10.0.0.0/8 }"}, "ip saddr { 10.0.0.0/8, 192.0.2.1 }"},
		{hostport.V4, []string{"ip", "saddr", "{", "192.0.2.1,", "10.0.0.0/8", "}"}, "ip saddr { 10.0.0.0/8, 192.0.2.1 }"},
		{hostport.V4, []string{"ip saddr {192.0.2.1,10.0.0.0/8,}"}, "ip saddr { 10.0.0.0/8, 192.0.2.1 }"},
		{hostport.V4, []string{"ip saddr != { 192.0.2.1, 10.0.0.0/8 }"}, "ip saddr != { 10.0.0.0/8, 192.0.2.1 }"},
		{hostport.V4, []string{"ip saddr { 192.0.2.1 }"}, "ip saddr 192.0.2.1"},
		// Merged as nft merges an anonymous set: overlapping and adjacent values.
		{hostport.V4, []string{"ip saddr { 10.0.0.0/8, 10.1.0.0/16 }"}, "ip saddr 10.0.0.0/8"},
		{hostport.V4, []string{"ip saddr { 10.0.0.0/25, 10.0.0.128/25 }"}, "ip saddr 10.0.0.0/24"},
		{hostport.V4, []string{"ip saddr { 10.0.0.0/25, 10.0.0.128/26 }"}, "ip saddr { 10.0.0.0-10.0.0.191 }"},
		{hostport.V4, []string{"ip saddr { 0.0.0.0/1, 255.255.255.255 }"}, "ip saddr { 0.0.0.0/1, 255.255.255.255 }"},
		{hostport.V6, []string{"ip6 saddr 2001:db8::1"}, "ip6 saddr 2001:db8::1"},
		{hostport.V6, []string{"ip6 saddr 2001:DB8::/32"}, "ip6 saddr 2001:db8::/32"},
		{hostport.V6, []string{"ip6 daddr != fe80::/10"}, "ip6 daddr != fe80::/10"},
		{hostport.V6, []string{"ip6 daddr { ::1, 2001:db8::/32 }"}, "ip6 daddr { ::1, 2001:db8::/32 }"},
		{hostport.V6, []string{"ip6 saddr ::ffff:192.0.2.1"}, "ip6 saddr ::ffff:192.0.2.1"},
		{hostport.V6, []string{"ip6 saddr 0000:0000:0000:0000:0000:ffff:255.255.255.0-0000:0000:0000:0000:0000:ffff:255.255.255.254"},
			"ip6 saddr { ::ffff:255.255.255.0-::ffff:255.255.255.254 }"},
		{hostport.V4, []string{"iifname eth0"}, `iifname "eth0"`},
		{hostport.V4, []string{`iifname "eth0"`}, `iifname "eth0"`},
		{hostport.V4, []string{`meta iifname == "eth0"`}, `iifname "eth0"`},
		{hostport.V6, []string{`oifname != "veth*"`}, `oifname != "veth*"`},
		{hostport.V6, []string{`oifname "a.b-c_d01234567"`}, `oifname "a.b-c_d01234567"`},
		{hostport.V4, []string{"meta mark 0x10"}, "meta mark 0x00000010"},
		{hostport.V4, []string{"mark 16"}, "meta mark 0x00000010"},
		{hostport.V4, []string{"meta mark != 4294967295"}, "meta mark != 0xffffffff"},
		{hostport.V4, []string{"meta mark & 0xff00 == 0x100"}, "meta mark & 0x0000ff00 == 0x00000100"},
		{hostport.V4, []string{"meta mark and 0xff00 0x100"}, "meta mark & 0x0000ff00 == 0x00000100"},
		{hostport.V4, []string{"meta mark & 0xFF00 != 0x100"}, "meta mark & 0x0000ff00 != 0x00000100"},
		{hostport.V4, []string{"meta mark & 0xffffffff == 7"}, "meta mark 0x00000007"},
		// Several matches: canonical order, duplicates dropped.
		{hostport.V4, []string{"meta mark 1", `iifname "eth0"`, "ip daddr 192.0.2.1", "ip saddr 10.0.0.0/8", "ip saddr 10.0.0.0/8"},
			`ip saddr 10.0.0.0/8 ip daddr 192.0.2.1 iifname "eth0" meta mark 0x00000001`},
		{hostport.V4, nil, ""},
		{hostport.V4, []string{}, ""},
		{hostport.V4, []string{""}, ""},
		{hostport.V6, []string{"", " "}, ""},
	} {
		c, err := Parse("conditionsV4", tc.f, tc.in)
		if err != nil {
			t.Errorf("%q: %v", tc.in, err)
			continue
		}
		if got := c.String(); got != tc.want {
			t.Errorf("%q: got %q, want %q", tc.in, got, tc.want)
		}
		if c.Empty() != (tc.want == "") {
			t.Errorf("%q: Empty() = %v", tc.in, c.Empty())
		}
		again, err := Parse("x", tc.f, []string{c.String()})
		if err != nil || again.String() != c.String() {
			t.Errorf("%q: canonical %q re-parses to %q, %v", tc.in, c.String(), again.String(), err)
		}
	}
}

func TestParseRefuses(t *testing.T) {
	long := make([]string, MaxItems+1)
	for i := range long {
		long[i] = "mark 1"
	}
	// Sets of addresses written tightly: within MaxLen as given, beyond it with the
	// canonical form's ", " separators.
	var canonTooLong []string
	for m := range 4 {
		var vals []string
		for i := range 210 {
			vals = append(vals, fmt.Sprintf("1.%d.%d.%d", m, i/100, (i%100)*2))
		}
		canonTooLong = append(canonTooLong, "ip saddr {"+strings.Join(vals, ",")+"}")
	}
	if n := len(strings.Join(canonTooLong, "")); n > MaxLen {
		t.Fatalf("canonTooLong has %d bytes", n)
	}
	manyMatches := strings.Repeat("mark 1 ", MaxMatches+1)
	bigSet := []string{"ip saddr {"}
	for range 4 {
		bigSet = append(bigSet, strings.Repeat("192.0.2.1,", 70))
	}
	bigSet = append(bigSet, "}")
	for _, tc := range []struct {
		f     hostport.Family
		in    []string
		field string // the item named
		msg   string // part of the message
	}{
		{hostport.V4, []string{"ip saddr 192.0.2.1\nadd table ip evil"}, "conditionsV4[0]", "control characters"},
		{hostport.V4, []string{"ip saddr 192.0.2.1", "accept"}, "conditionsV4[1]", "is an nft statement"},
		{hostport.V4, []string{"ip saddr 192.0.2.1 drop"}, "conditionsV4[0]", `"drop" is an nft statement`},
		{hostport.V4, []string{"jump", "foo"}, "conditionsV4[0]", "nft statement"},
		{hostport.V4, []string{"counter"}, "conditionsV4[0]", "nft statement"},
		{hostport.V4, []string{"meta mark set 1"}, "conditionsV4[0]", "nft statement"},
		{hostport.V4, []string{"ip saddr 192.0.2.1;", "add table ip evil"}, "conditionsV4[0]", "';' ends an nft statement"},
		{hostport.V4, []string{"ip saddr 192.0.2.1 # x"}, "conditionsV4[0]", "comment"},
		{hostport.V4, []string{"ip saddr @allowed"}, "conditionsV4[0]", "named sets"},
		{hostport.V4, []string{"ip saddr $allowed"}, "conditionsV4[0]", "variables"},
		{hostport.V4, []string{"{ ip saddr 192.0.2.1 }"}, "conditionsV4[0]", "outside an address set"},
		{hostport.V4, []string{"ip saddr 192.0.2.1 }"}, "conditionsV4[0]", "outside an address set"},
		{hostport.V4, []string{"ip saddr { 192.0.2.1"}, "conditionsV4[0]", "no closing }"},
		{hostport.V4, []string{"ip saddr { 192.0.2.1 192.0.2.2 }"}, "conditionsV4[0]", "needs , or }"},
		{hostport.V4, []string{"ip saddr { 192.0.2.1", "drop }"}, "conditionsV4[1]", `"drop" is an nft statement`},
		{hostport.V4, []string{"ip saddr { }"}, "conditionsV4[0]", "empty set"},
		{hostport.V4, []string{"ip saddr { { 192.0.2.1 } }"}, "conditionsV4[0]", "not an IPv4 address"},
		{hostport.V4, []string{"ip6 saddr ::1"}, "conditionsV4[0]", "belongs in conditionsV6"},
		{hostport.V6, []string{"iifname eth0", "ip saddr 192.0.2.1"}, "conditionsV6[1]", "belongs in conditionsV4"},
		{hostport.V4, []string{"ip saddr ::1"}, "conditionsV4[0]", "not an IPv4 address"},
		{hostport.V6, []string{"ip6 saddr 192.0.2.1"}, "conditionsV6[0]", "not an IPv6 address"},
		{hostport.V6, []string{"ip6 saddr fe80::1%eth0"}, "conditionsV6[0]", "character '%'"},
		{hostport.V4, []string{"ip saddr localhost"}, "conditionsV4[0]", "host names are not accepted"},
		{hostport.V4, []string{"ip saddr 010.0.0.1"}, "conditionsV4[0]", "not an IPv4 address"},
		{hostport.V4, []string{"ip saddr 10.0.0.0/33"}, "conditionsV4[0]", "not an IPv4 prefix"},
		{hostport.V4, []string{"ip saddr 0.0.0.0/0"}, "conditionsV4[0]", "covers every IPv4 address"},
		{hostport.V4, []string{"ip saddr { 0.0.0.0/1, 128.0.0.0/1 }"}, "conditionsV4[0]", "covers every"},
		{hostport.V6, []string{"ip6 saddr != ::/0"}, "conditionsV6[0]", "covers every"},
		{hostport.V4, []string{"ip saddr 192.0.2.5-192.0.2.1"}, "conditionsV4[0]", "ends before it starts"},
		{hostport.V4, []string{"ip saddr"}, "conditionsV4[0]", "needs an address"},
		{hostport.V4, []string{"ip", "saddr", "!="}, "conditionsV4[2]", "needs an address"},
		{hostport.V4, []string{"ip"}, "conditionsV4[0]", "needs saddr or daddr"},
		{hostport.V4, []string{"ip protocol tcp"}, "conditionsV4[0]", "only saddr and daddr"},
		{hostport.V4, []string{"ip saddr < 192.0.2.1"}, "conditionsV4[0]", "character '<'"},
		{hostport.V4, []string{"tcp dport 80"}, "conditionsV4[0]", `"tcp" is not a match`},
		{hostport.V4, []string{"fib daddr type local"}, "conditionsV4[0]", "is not a match"},
		{hostport.V4, []string{"iif eth0"}, "conditionsV4[0]", "use iifname"},
		{hostport.V4, []string{"meta l4proto tcp"}, "conditionsV4[0]", "only iifname, oifname and mark"},
		{hostport.V4, []string{`"eth0"`}, "conditionsV4[0]", "quoted string"},
		{hostport.V4, []string{"iifname"}, "conditionsV4[0]", "needs an interface name"},
		{hostport.V4, []string{`iifname "*"`}, "conditionsV4[0]", "every interface"},
		{hostport.V4, []string{"iifname eth*"}, "conditionsV4[0]", "in quotes"},
		{hostport.V4, []string{`iifname "eth*0"`}, "conditionsV4[0]", "a name is 1-15"},
		{hostport.V4, []string{`iifname "abcdefghijklmnop"`}, "conditionsV4[0]", "a name is 1-15"},
		{hostport.V4, []string{`iifname ".."`}, "conditionsV4[0]", "a name is 1-15"},
		{hostport.V4, []string{`iifname "a b"`}, "conditionsV4[0]", "a name is 1-15"},
		{hostport.V4, []string{`iifname "eth0`}, "conditionsV4[0]", "unterminated quote"},
		{hostport.V4, []string{"ip saddr " + strings.Repeat("1", maxToken+1)}, "conditionsV4[0]", "a word of 101 bytes"},
		{hostport.V4, []string{`iifname "` + strings.Repeat("a", maxToken+1) + `"`}, "conditionsV4[0]", "a quoted string of 101 bytes"},
		{hostport.V4, []string{`iifname "eth\0"`}, "conditionsV4[0]", "escapes"},
		{hostport.V4, []string{`iifname { "a", "b" }`}, "conditionsV4[0]", "sets of names"},
		{hostport.V4, []string{"iifname accept"}, "conditionsV4[0]", "nft statement"},
		{hostport.V4, []string{"meta mark"}, "conditionsV4[0]", "needs a value"},
		{hostport.V4, []string{"meta mark 0x100000000"}, "conditionsV4[0]", "32-bit"},
		{hostport.V4, []string{"meta mark -1"}, "conditionsV4[0]", "32-bit"},
		{hostport.V4, []string{"meta mark 1_0"}, "conditionsV4[0]", "32-bit"},
		{hostport.V4, []string{"meta mark 0o7"}, "conditionsV4[0]", "32-bit"},
		{hostport.V4, []string{"meta mark & 0 == 0"}, "conditionsV4[0]", "every packet gives 0"},
		{hostport.V4, []string{"meta mark & 0xff == 0x100"}, "conditionsV4[0]", "bits outside the mask"},
		{hostport.V4, []string{"meta", "mark", "&", "0xff", "=="}, "conditionsV4[4]", "needs a value"},
		{hostport.V4, []string{"meta mark | 1"}, "conditionsV4[0]", "character '|'"},
		{hostport.V4, []string{"meta mark 1 accept"}, "conditionsV4[0]", "nft statement"},
		{hostport.V4, []string{"ip saddr 192.0.2.1 \u00e9"}, "conditionsV4[0]", "non-ASCII"},
		{hostport.V4, []string{"ip saddr 192.0.2.1\tmark 1"}, "conditionsV4[0]", "control characters"},
		{hostport.V4, []string{"mark 1", strings.Repeat(" ", MaxLen)}, "conditionsV4", "bytes; at most"},
		{hostport.V4, canonTooLong, "conditionsV4", "bytes in canonical form"},
		{hostport.V4, long, "conditionsV4", "at most"},
		{hostport.V4, []string{manyMatches}, "conditionsV4[0]", "more than"},
		{hostport.V4, bigSet, "conditionsV4[4]", "more than 256 values"},
	} {
		field := "conditionsV4"
		if tc.f == hostport.V6 {
			field = "conditionsV6"
		}
		_, err := Parse(field, tc.f, tc.in)
		var e *Error
		if !errors.As(err, &e) {
			t.Errorf("%.200q: got %v, want a refusal", tc.in, err)
			continue
		}
		if e.Field != tc.field || !strings.Contains(e.Msg, tc.msg) {
			t.Errorf("%.200q: got %.200q, want field %s and %q in the message", tc.in, err, tc.field, tc.msg)
		}
	}
}

// recorder is a SetAdder that keeps the sets, naming them as *nftables.Conn does.
type recorder struct {
	sets  []*nftables.Set
	elems [][]nftables.SetElement
}

func (r *recorder) AddSet(s *nftables.Set, v []nftables.SetElement) error {
	s.ID = uint32(len(r.sets) + 1)
	s.Name = "__set%d"
	r.sets = append(r.sets, s)
	r.elems = append(r.elems, v)
	return nil
}

// TestExprsAsNft compares the expressions with what `nft --debug=netlink add rule inet t
// c ...` (nft 1.0.6) printed for the same text on this machine (register contents as
// bytes in memory order; the mark is host order, little-endian here).
func TestExprsAsNft(t *testing.T) {
	nfp4 := []expr.Any{&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1}, &expr.Cmp{Register: 1, Data: []byte{2}}}
	nfp6 := []expr.Any{&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1}, &expr.Cmp{Register: 1, Data: []byte{10}}}
	pl := func(off, n uint32) *expr.Payload {
		return &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n}
	}
	cat := func(a ...[]expr.Any) []expr.Any {
		var out []expr.Any
		for _, x := range a {
			out = append(out, x...)
		}
		return out
	}
	name16 := func(s string) []byte { b := make([]byte, 16); copy(b, s); return b }
	for _, tc := range []struct {
		f    hostport.Family
		in   string
		want []expr.Any
		sets [][]nftables.SetElement
	}{
		// [ payload load 3b @ network header + 12 => reg 1 ] [ cmp eq reg 1 0x0000000a ]
		{hostport.V4, "ip saddr 10.0.0.0/24", cat(nfp4, []expr.Any{pl(12, 3), &expr.Cmp{Register: 1, Data: []byte{10, 0, 0}}}), nil},
		// [ payload load 4b ] [ bitwise reg 1 = ( reg 1 & 0x00f0ffff ) ^ 0x00000000 ] [ cmp eq reg 1 0x0000000a ]
		{hostport.V4, "ip saddr 10.0.0.0/20", cat(nfp4, []expr.Any{pl(12, 4),
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: []byte{255, 255, 240, 0}, Xor: []byte{0, 0, 0, 0}},
			&expr.Cmp{Register: 1, Data: []byte{10, 0, 0, 0}}}), nil},
		{hostport.V4, "ip saddr != 10.0.0.1", cat(nfp4, []expr.Any{pl(12, 4), &expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{10, 0, 0, 1}}}), nil},
		// element 00000000 : 1 [end] element 0100000a : 0 element 0200000a : 1 [end] element 0000010a : 0 element 0000020a : 1
		{hostport.V4, "ip daddr { 10.0.0.1, 10.1.0.0/16 }", cat(nfp4, []expr.Any{pl(16, 4), &expr.Lookup{SourceRegister: 1, SetName: "__set%d", SetID: 1}}),
			[][]nftables.SetElement{{{Key: []byte{0, 0, 0, 0}, IntervalEnd: true}, {Key: []byte{10, 0, 0, 1}}, {Key: []byte{10, 0, 0, 2}, IntervalEnd: true},
				{Key: []byte{10, 1, 0, 0}}, {Key: []byte{10, 2, 0, 0}, IntervalEnd: true}}}},
		// element 00000000 : 0 element 00000080 : 1 [end] element ffffffff : 0
		{hostport.V4, "ip saddr != { 0.0.0.0/1, 255.255.255.255 }", cat(nfp4, []expr.Any{pl(12, 4), &expr.Lookup{SourceRegister: 1, SetName: "__set%d", SetID: 1, Invert: true}}),
			[][]nftables.SetElement{{{Key: []byte{0, 0, 0, 0}}, {Key: []byte{128, 0, 0, 0}, IntervalEnd: true}, {Key: []byte{255, 255, 255, 255}}}}},
		// [ payload load 8b @ network header + 8 => reg 1 ] [ cmp eq reg 1 0x000080fe 0x00000000 ]
		{hostport.V6, "ip6 saddr fe80::/64", cat(nfp6, []expr.Any{pl(8, 8), &expr.Cmp{Register: 1, Data: []byte{0xfe, 0x80, 0, 0, 0, 0, 0, 0}}}), nil},
		{hostport.V6, "ip6 daddr ::1", cat(nfp6, []expr.Any{pl(24, 16), &expr.Cmp{Register: 1, Data: []byte{15: 1}}}), nil},
		// [ meta load iifname ] [ cmp eq reg 1 0x00687465 ]
		{hostport.V4, `iifname "eth*"`, []expr.Any{&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1}, &expr.Cmp{Register: 1, Data: []byte("eth")}}, nil},
		{hostport.V4, `oifname != "veth0"`, []expr.Any{&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1}, &expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: name16("veth0")}}, nil},
		// [ meta load mark ] [ bitwise reg 1 = ( reg 1 & 0x0000ff00 ) ^ 0x00000000 ] [ cmp eq reg 1 0x00000100 ]
		{hostport.V4, "meta mark & 0xff00 == 0x100", []expr.Any{&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: []byte{0, 0xff, 0, 0}, Xor: []byte{0, 0, 0, 0}},
			&expr.Cmp{Register: 1, Data: []byte{0, 1, 0, 0}}}, nil},
		{hostport.V4, "meta mark 0x10", []expr.Any{&expr.Meta{Key: expr.MetaKeyMARK, Register: 1}, &expr.Cmp{Register: 1, Data: []byte{0x10, 0, 0, 0}}}, nil},
		// One nfproto dependency for two address matches.
		{hostport.V4, "ip saddr 10.0.0.1 ip daddr 10.0.0.2", cat(nfp4, []expr.Any{pl(12, 4), &expr.Cmp{Register: 1, Data: []byte{10, 0, 0, 1}},
			pl(16, 4), &expr.Cmp{Register: 1, Data: []byte{10, 0, 0, 2}}}), nil},
	} {
		c, err := Parse("c", tc.f, []string{tc.in})
		if err != nil {
			t.Fatalf("%q: %v", tc.in, err)
		}
		rec := &recorder{}
		tab := &nftables.Table{Name: "t", Family: nftables.TableFamilyINet}
		got, err := c.Exprs(tab, rec)
		if err != nil {
			t.Fatalf("%q: %v", tc.in, err)
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%q:\n got %s\nwant %s", tc.in, dump(got), dump(tc.want))
		}
		if !reflect.DeepEqual(rec.elems, tc.sets) {
			t.Errorf("%q: set elements\n got %+v\nwant %+v", tc.in, rec.elems, tc.sets)
		}
		for _, s := range rec.sets {
			if !s.Anonymous || !s.Constant || !s.Interval || s.Table != tab {
				t.Errorf("%q: set %+v is not an anonymous constant interval set of the table", tc.in, s)
			}
		}
	}
}

func dump(es []expr.Any) string {
	var b strings.Builder
	for _, e := range es {
		fmt.Fprintf(&b, "%T%+v ", e, e)
	}
	return b.String()
}
