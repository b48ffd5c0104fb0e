package hostport

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/utils"
)

func TestChainNameIsUpstreams(t *testing.T) {
	for _, o := range []Owner{{"net", "abc"}, {"cbr0", strings.Repeat("f", 64)}, {"a", "b"}} {
		want := utils.MustFormatChainNameWithPrefix(o.Network, o.ContainerID, "DN-")
		if got := ChainName(o); got != want || len(got) != 28 {
			t.Errorf("ChainName(%v) = %s, upstream names it %s", o, got, want)
		}
	}
}

func TestCommentRoundTrip(t *testing.T) {
	o := Owner{"net-1", "0123abcdef"}
	got, ok := ParseComment(Comment(o))
	if !ok || got != o {
		t.Fatalf("ParseComment(Comment(%v)) = %v %v", o, got, ok)
	}
	long := Owner{strings.Repeat("n", 200), strings.Repeat("c", 64)}
	if c := Comment(long); len(c) != 255 || !strings.HasSuffix(c, "...") {
		t.Fatalf("long comment not trimmed like upstream: %d", len(c))
	}
	if _, ok := ParseComment(Comment(long)); ok {
		t.Fatal("a trimmed comment must not name an owner (its ID is incomplete)")
	}
	if _, ok := ParseComment("kubernetes service portals"); ok {
		t.Fatal("foreign comment parsed as an owner")
	}
}

func TestConflicts(t *testing.T) {
	ip := netip.MustParseAddr
	c := func(f Family, proto, host string, port int) Claim {
		cl := Claim{Family: f, Proto: proto, HostPort: port}
		if host != "" {
			cl.HostIP = ip(host)
		}
		return cl
	}
	cases := []struct {
		a, b Claim
		want bool
	}{
		{c(V4, "tcp", "", 80), c(V4, "tcp", "", 80), true},
		{c(V4, "tcp", "", 80), c(V4, "tcp", "192.0.2.1", 80), true},
		{c(V4, "tcp", "0.0.0.0", 80), c(V4, "tcp", "192.0.2.1", 80), true},
		{c(V4, "tcp", "192.0.2.1", 80), c(V4, "tcp", "192.0.2.1", 80), true},
		{c(V4, "tcp", "192.0.2.1", 80), c(V4, "tcp", "192.0.2.2", 80), false},
		{c(V4, "tcp", "", 80), c(V4, "udp", "", 80), false},
		{c(V4, "tcp", "", 80), c(V4, "tcp", "", 81), false},
		{c(V4, "tcp", "", 80), c(V6, "tcp", "", 80), false},
	}
	for _, tc := range cases {
		if got := tc.a.Conflicts(tc.b); got != tc.want {
			t.Errorf("%v vs %v: %v, want %v", tc.a, tc.b, got, tc.want)
		}
		if got := tc.b.Conflicts(tc.a); got != tc.want {
			t.Errorf("%v vs %v (reversed): %v", tc.b, tc.a, got)
		}
	}
}
