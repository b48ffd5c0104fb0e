package takeover

import (
	"net"
	"regexp"
	"strings"
	"testing"

	"github.com/portguard/portguard/test/testbed"
)

// masqEntries are the addresses in portguard's masquerade sets (snat, masqall) whose
// element comment names container id: set elements are `<address> comment "<owner>"`,
// claims (map elements) are followed by " : <destination>".
func masqEntries(tbl, id string) (v4, v6 []string) {
	re := regexp.MustCompile(`(?m)([0-9a-f:.]+) comment "[^"]*/` + regexp.QuoteMeta(id) + `"\s*([,}]|$)`)
	for _, m := range re.FindAllStringSubmatch(tbl, -1) {
		ip := net.ParseIP(m[1])
		switch {
		case ip == nil:
		case ip.To4() != nil:
			v4 = append(v4, m[1])
		default:
			v6 = append(v6, m[1])
		}
	}
	return v4, v6
}

// A dual-stack pod dies without DEL; its IPv4 claim is taken over by an IPv4-only mapping
// (hostIP 0.0.0.0), its IPv6 claim later by an IPv6-only one (hostIP ::). Each takeover
// removes the dead pod's masquerade entry of the family it lost all claims in, so nothing
// of it stays once both are gone, and the new owners answer. Before the fix its IPv4 entry
// stayed after the first takeover (the pod still held an IPv6 claim) and was never removed.
func TestNFTablesTakeoverPerFamilyMasquerade(t *testing.T) {
	b := newBed(t)
	n := nftNet(b, testbed.NetConfig{})
	a := b.NewPod("A")
	a.Serve(80)
	n.MustAdd(a, testbed.TCP(8090, 80))
	for _, f := range families {
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8090, "A")
	}
	if v4, v6 := masqEntries(nftTable(t, b), a.ContainerID); len(v4) != 1 || len(v6) != 1 {
		t.Fatalf("A's masquerade entries after its ADD: %q %q, want one per family", v4, v6)
	}
	a.Kill()

	c := b.NewPod("C")
	c.Serve(80)
	n.MustAdd(c, testbed.TCP(8090, 80).On("0.0.0.0"))
	wantAnswer(t, b, "tcp", b.NodeIP4, 8090, "C")
	tbl := nftTable(t, b)
	if v4, v6 := masqEntries(tbl, a.ContainerID); len(v4) != 0 || len(v6) != 1 {
		t.Errorf("after A lost its IPv4 claim: A's masquerade entries %q (IPv4) %q (IPv6), want none and one:\n%s", v4, v6, tbl)
	}

	d := b.NewPod("D")
	d.Serve(80)
	n.MustAdd(d, testbed.TCP(8090, 80).On("::"))
	wantAnswer(t, b, "tcp", b.NodeIP6, 8090, "D")
	wantAnswer(t, b, "tcp", b.NodeIP4, 8090, "C")
	if tbl := nftTable(t, b); strings.Contains(tbl, a.ContainerID) {
		t.Errorf("A lost every claim, yet the table names it:\n%s", tbl)
	}
	for _, p := range []*testbed.Pod{c, d} {
		if err := n.Check(p); err != nil {
			t.Errorf("CHECK of %s: %v", p.Name, err)
		}
	}
}
