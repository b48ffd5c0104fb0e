package takeover

import (
	"strings"
	"testing"

	"github.com/portguard/portguard/test/testbed"
)

// The nftables backend's DEL finds an attachment by the keys of its portMappings, and reads
// the whole table only when the DEL carries no portMappings or finds nothing at its keys.
// Every way removes all of the attachment (both families, masquerade entries) and nothing of
// another pod: DEL with ADD's mappings, DEL with other mappings than ADD's, DEL without a
// portMappings key.
func TestNFTablesDelByKeyAndFallback(t *testing.T) {
	b := newBed(t)
	n := nftNet(b, testbed.NetConfig{})
	a, o := b.NewPod("A"), b.NewPod("B")
	a.Serve(80)
	o.Serve(80)
	n.MustAdd(o, testbed.TCP(8092, 80))
	others := strings.Count(nftTable(t, b), o.ContainerID) // B's claims and masquerade entries
	if others < 2 {
		t.Fatalf("B has %d elements, want its claims in both families", others)
	}
	gone := func(how string) {
		t.Helper()
		tbl := nftTable(t, b)
		if strings.Contains(tbl, a.ContainerID) {
			t.Errorf("DEL %s left elements of A:\n%s", how, tbl)
		}
		if strings.Count(tbl, o.ContainerID) != others {
			t.Errorf("DEL %s of A changed B's elements:\n%s", how, tbl)
		}
		for _, f := range families {
			wantNoAnswerFrom(t, b, "tcp", b.NodeIP(f), 8090, "A")
			wantAnswer(t, b, "tcp", b.NodeIP(f), 8092, "B")
		}
	}
	for _, tc := range []struct {
		how string
		opt testbed.CallOptions
	}{
		{"with ADD's mappings", testbed.CallOptions{}},
		{"with other mappings", testbed.CallOptions{Mappings: []testbed.PortMapping{testbed.TCP(9999, 80)}}},
		{"without portMappings", testbed.CallOptions{NoMappings: true}},
	} {
		n.MustAdd(a, testbed.TCP(8090, 80), testbed.UDP(8091, 80))
		for _, f := range families {
			wantAnswer(t, b, "tcp", b.NodeIP(f), 8090, "A")
		}
		if _, err := n.Call("del", a, tc.opt); err != nil {
			t.Fatalf("DEL %s: %v", tc.how, err)
		}
		gone(tc.how)
	}
}

// A re-ADD of the same attachment with other mappings frees the ports it no longer maps
// (in both families, in the same batch that claims the new ones), keeps the ports still
// mapped, and another pod can then claim a freed port while the first one lives.
func TestNFTablesReAddWithOtherMappingsFreesOldPorts(t *testing.T) {
	b := newBed(t)
	n := nftNet(b, testbed.NetConfig{})
	a, o := b.NewPod("A"), b.NewPod("B")
	a.Serve(80)
	o.Serve(80)
	prev := n.MustAdd(a, testbed.TCP(8093, 80), testbed.TCP(8094, 80))
	if res, err := reAdd(t, b, n, a, prev.Stdout, testbed.TCP(8094, 80), testbed.TCP(8095, 80)); err != nil {
		t.Fatalf("re-ADD: %v\n%s", err, res.Stderr)
	}
	for _, f := range families {
		wantNoAnswerFrom(t, b, "tcp", b.NodeIP(f), 8093, "A")
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8094, "A")
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8095, "A")
	}
	if tbl := nftTable(t, b); strings.Contains(tbl, "tcp . 8093") {
		t.Errorf("the re-ADD left a claim on 8093:\n%s", tbl)
	}
	n.MustAdd(o, testbed.TCP(8093, 80)) // refused with code 100 if A still held it
	for _, f := range families {
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8093, "B")
	}
}
