// Package e2e drives the portguard plugin binary end to end: a conflist of bridge +
// host-local + portguard run by cnitool inside a throwaway node namespace, pods answering with
// their name via socat, and real packets from a client namespace and from the node itself.
// See test/testbed for the bed. Everything needs root; without it the tests skip (set
// PORTGUARD_E2E_REQUIRED=1 to make that a failure).
package e2e

import (
	"os"
	"strings"
	"testing"

	tb "github.com/portguard/portguard/test/testbed"
)

func TestMain(m *testing.M) { os.Exit(tb.Main(m)) }

// pgBed is a bed with one dual-stack portguard network.
func pgBed(t *testing.T, conf ...tb.NetConfig) (*tb.Bed, *tb.Network) {
	t.Helper()
	b := tb.New(t)
	c := tb.NetConfig{}
	if len(conf) > 0 {
		c = conf[0]
	}
	if c.PortPlugin == "" {
		c.PortPlugin = "portguard"
	}
	return b, b.Network(c)
}

// expectAnswer asserts that proto traffic from ns to addr:port is answered by want.
func expectAnswer(t *testing.T, proto, ns, addr string, port int, want string) {
	t.Helper()
	got, err := tb.Dial(proto, ns, addr, port)
	if err != nil || got != want {
		t.Errorf("%s %s -> %s port %d: answer %q (err %v), want %q", proto, ns, addr, port, got, err, want)
	}
}

// expectNoAnswer asserts that nobody answers proto traffic from ns to addr:port.
func expectNoAnswer(t *testing.T, proto, ns, addr string, port int) {
	t.Helper()
	if got, err := tb.Dial(proto, ns, addr, port); err == nil {
		t.Errorf("%s %s -> %s port %d: answered %q, want no answer", proto, ns, addr, port, got)
	}
}

// expectClean asserts that no CNI-DN chain is left and CNI-HOSTPORT-DNAT has no jump rule,
// in both families.
func expectClean(t *testing.T, b *tb.Bed) {
	t.Helper()
	for _, f := range []tb.Family{tb.V4, tb.V6} {
		st := b.NAT(f)
		if d := st.DNChains(); len(d) != 0 {
			t.Errorf("%s: CNI-DN chains left: %v", f, d)
		}
		for _, r := range st.Rules["CNI-HOSTPORT-DNAT"] {
			if strings.Contains(r, "CNI-DN-") {
				t.Errorf("%s: jump left in CNI-HOSTPORT-DNAT: %s", f, r)
			}
		}
	}
}

// jumpsTo returns the CNI-HOSTPORT-DNAT rules jumping to chain.
func jumpsTo(b *tb.Bed, f tb.Family, chain string) []string {
	return b.NAT(f).JumpsTo("CNI-HOSTPORT-DNAT", chain)
}

// families lists both families with the node address to reach.
var families = []tb.Family{tb.V4, tb.V6}

func protos() []string { return []string{"tcp", "udp"} }
