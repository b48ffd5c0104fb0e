package iptbackend

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/backend"
	"github.com/portguard/portguard/pkg/backend/backendtest"
	"github.com/portguard/portguard/pkg/config"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
)

// The namespace and configuration helpers are shared with the other kernel tests.
var (
	netns = backendtest.NetNS
	inNS  = backendtest.InNS
	conf  = backendtest.Conf
)

// These tests run the real iptables in a throwaway network namespace and drive the
// backend's planning and applying directly, interleaved as parallel ADDs would be.

func owner(id string) hostport.Owner { return hostport.Owner{Network: "knet", ContainerID: id} }

const (
	m8080 = `{"hostPort":8080,"containerPort":80,"protocol":"tcp"}`
	m9090 = `{"hostPort":9090,"containerPort":90,"protocol":"tcp"}`
)

// newBackend is a backend running iptables inside namespace ns (no netlink: the runner
// has a prefix).
func newBackend(ns string) *Backend {
	return &Backend{Runner: &iptables.Exec{WaitSeconds: 5, Prefix: []string{"ip", "netns", "exec", ns}}}
}

// mustAdd installs the attachment as the engine would under the exclusive lock, with no
// decision hooks (no judge, no records).
func mustAdd(t *testing.T, b *Backend, c *config.Config, o hostport.Owner) {
	t.Helper()
	if _, err := b.Add(c, o, false, backend.Hooks{}); err != nil {
		t.Fatalf("ADD %s: %v", o, err)
	}
}

// Two ADDs of different ports that each take part of one victim (they run in parallel)
// must not leave the victim's chain behind empty: the later payload fails whole, and the
// replan removes the chain.
func TestKernelInterleavedPartialTakeoversLeaveNoEmptyChain(t *testing.T) {
	ns := netns(t)
	b := newBackend(ns)
	victim := hostport.Owner{Network: "knet", ContainerID: "victim"}
	both := conf(t, "", `{"hostPort":53,"containerPort":53,"protocol":"tcp"},{"hostPort":53,"containerPort":53,"protocol":"udp"}`, "10.99.0.5/16")
	mustAdd(t, b, both, victim)
	ca := conf(t, "", `{"hostPort":53,"containerPort":53,"protocol":"tcp"}`, "10.99.0.6/16")
	cb := conf(t, "", `{"hostPort":53,"containerPort":53,"protocol":"udp"}`, "10.99.0.7/16")
	oa, ob := hostport.Owner{Network: "knet", ContainerID: "a"}, hostport.Owner{Network: "knet", ContainerID: "b"}
	// Plan both from the same table, as two parallel ADDs would.
	pa, err := b.planAdd(podDesired(ca, oa)[0], config.PolicyTakeover)
	if err != nil {
		t.Fatal(err)
	}
	pb, err := b.planAdd(podDesired(cb, ob)[0], config.PolicyTakeover)
	if err != nil {
		t.Fatal(err)
	}
	if err := Apply(b.Runner, hostport.V4, pa.res.Tx); err != nil {
		t.Fatal(err)
	}
	var re *iptables.RestoreError
	if err := Apply(b.Runner, hostport.V4, pb.res.Tx); !errors.As(err, &re) {
		t.Fatalf("the second partial takeover applied on a stale plan: %v", err)
	}
	if _, err := b.applyAdd(pb, config.PolicyTakeover, true, backend.Hooks{}); err != nil {
		t.Fatalf("replan after the refused payload: %v", err)
	}
	if out := inNS(t, ns, "iptables", "-t", "nat", "-S"); strings.Contains(out, hostport.ChainName(victim)) {
		t.Fatalf("the victim's chain survived both takeovers:\n%s", out)
	}
}

// Three ADDs that together take all of one victim, each a different jump of it (31 ports:
// three multiport jumps), planned from the same table: one asserted kept rule per payload
// is enough to leave no empty chain. The first lands; the two others find their asserted
// rule gone and are planned again, the last as the chain's removal.
func TestKernelThreePartialTakeoversLeaveNoEmptyChain(t *testing.T) {
	ns := netns(t)
	b := newBackend(ns)
	mappings := func(lo, hi int) string {
		var ms []string
		for p := lo; p <= hi; p++ {
			ms = append(ms, fmt.Sprintf(`{"hostPort":%d,"containerPort":80,"protocol":"tcp"}`, p))
		}
		return strings.Join(ms, ",")
	}
	victim := hostport.Owner{Network: "knet", ContainerID: "victim"}
	mustAdd(t, b, conf(t, "", mappings(1000, 1030), "10.99.0.5/16"), victim)
	var plans []addPlan
	for i, r := range [][2]int{{1000, 1014}, {1015, 1029}, {1030, 1030}} {
		o := hostport.Owner{Network: "knet", ContainerID: fmt.Sprintf("taker%d", i)}
		p, err := b.planAdd(podDesired(conf(t, "", mappings(r[0], r[1]), fmt.Sprintf("10.99.0.%d/16", 10+i)), o)[0], config.PolicyTakeover)
		if err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(renderTx(t, p.res.Tx), "-C "+hostport.ChainName(victim)); r[0] != 1030 && n != 1 {
			t.Fatalf("taker %d asserts %d rules of the victim, want 1", i, n)
		}
		plans = append(plans, p)
	}
	if err := Apply(b.Runner, hostport.V4, plans[0].res.Tx); err != nil {
		t.Fatal(err)
	}
	var re *iptables.RestoreError
	for i, p := range plans[1:] {
		if err := Apply(b.Runner, hostport.V4, p.res.Tx); !errors.As(err, &re) {
			t.Fatalf("taker %d applied on a stale plan: %v", i+1, err)
		}
	}
	for i, p := range plans[1:] {
		if _, err := b.applyAdd(p, config.PolicyTakeover, true, backend.Hooks{}); err != nil {
			t.Fatalf("taker %d planned again: %v", i+1, err)
		}
	}
	if out := inNS(t, ns, "iptables", "-t", "nat", "-S"); strings.Contains(out, hostport.ChainName(victim)) {
		t.Fatalf("the victim's chain survived three takeovers that took all of it:\n%s", out)
	}
}

func renderTx(t *testing.T, tx *iptables.Tx) string {
	t.Helper()
	s, err := tx.Render()
	if err != nil {
		t.Fatal(err)
	}
	return s
}
