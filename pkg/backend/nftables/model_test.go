package nftables

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/nft"
)

func TestOwnerComment(t *testing.T) {
	o := hostport.Owner{Network: "net1", ContainerID: "abc"}
	if c := OwnerComment(o); c != "net1/abc" {
		t.Errorf("comment %q", c)
	}
	if p, ok := ParseOwner("net1/abc"); !ok || p != o {
		t.Errorf("parse: %v %v", p, ok)
	}
	long := hostport.Owner{Network: "n", ContainerID: strings.Repeat("x", 200)}
	c := OwnerComment(long)
	if len(c) > nft.MaxComment || !strings.HasPrefix(c, hashPrefix) || c == OwnerComment(o) {
		t.Errorf("long owner comment %q", c)
	}
	if _, ok := ParseOwner(c); ok {
		t.Error("a hash parsed as an owner")
	}
	e := Element{Comment: c}
	if !e.OwnedBy(long) || e.OwnedBy(o) {
		t.Error("OwnedBy does not match hashes")
	}
	for _, bad := range []string{"", "noslash", "a/b/c", "/x", "x/"} {
		if _, ok := ParseOwner(bad); ok {
			t.Errorf("%q parsed", bad)
		}
	}
}

func TestElementRoundTrip(t *testing.T) {
	for _, e := range []Element{
		{Claim: hostport.Claim{Family: hostport.V4, Proto: "tcp", HostPort: 8080}, Dest: netip.MustParseAddrPort("10.0.0.5:80")},
		{Claim: hostport.Claim{Family: hostport.V4, Proto: "sctp", HostIP: netip.MustParseAddr("192.0.2.1"), HostPort: 65535}, Dest: netip.MustParseAddrPort("10.0.0.5:1")},
		{Claim: hostport.Claim{Family: hostport.V6, Proto: "udp", HostPort: 53}, Dest: netip.MustParseAddrPort("[fd00::5]:5353")},
		{Claim: hostport.Claim{Family: hostport.V6, Proto: "tcp", HostIP: netip.MustParseAddr("fd00::1"), HostPort: 443}, Dest: netip.MustParseAddrPort("[fd00::5]:8443")},
	} {
		e.Comment = "net/id"
		e.Owner = hostport.Owner{Network: "net", ContainerID: "id"}
		got, err := decodeElement(e.Claim.Family, !e.Claim.AnyHostIP(), e.elem())
		if err != nil || got != e {
			t.Errorf("round trip of %v: %v, %v", e, got, err)
		}
	}
	// A value of the wrong width is an error, not a panic.
	if _, err := decodeElement(hostport.V6, false, nft.Elem{Key: make([]byte, 8), Data: make([]byte, 8)}); err == nil {
		t.Error("short IPv6 value decoded")
	}
}

func TestSubnetRoundTrip(t *testing.T) {
	for _, s := range []string{"198.19.0.64/26", "10.0.0.0/8", "0.0.0.0/0", "fd00:71:1:2::/64", "2001:db8::1/128"} {
		p := netip.MustParsePrefix(s)
		got, ok := decodeSubnet(hostport.Of(p.Addr()), subnetElem(p, "x"))
		if !ok || got != p {
			t.Errorf("%s: %v %v", s, got, ok)
		}
	}
	e := subnetElem(netip.MustParsePrefix("10.0.0.0/24"), "x")
	e.KeyEnd[7] = 0x7f // 10.0.0.0-10.0.0.127 on one side only
	if _, ok := decodeSubnet(hostport.V4, e); ok {
		t.Error("mismatched ranges decoded")
	}
}
