package agent

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/portguard/portguard/pkg/cri"
	"github.com/portguard/portguard/pkg/cri/critest"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/metrics"
	"github.com/portguard/portguard/pkg/plan"
)

// fakeSource holds claims in memory; Collect removes an owner's claims and records the call.
type fakeSource struct {
	claims    []Claim
	collected [][]hostport.Owner
	failRead  bool
}

func (f *fakeSource) Name() string { return metrics.BackendIPTables }

func (f *fakeSource) Observe(*liveness.Judge, []plan.FamilyAudit) ([]Claim, []plan.FamilyAudit, error) {
	if f.failRead {
		return nil, nil, errors.New("cannot read")
	}
	return append([]Claim(nil), f.claims...), nil, nil
}

func (f *fakeSource) Collect(owners []hostport.Owner) ([]hostport.Owner, error) {
	f.collected = append(f.collected, owners)
	gone := map[hostport.Owner]bool{}
	for _, o := range owners {
		gone[o] = true
	}
	var keep []Claim
	for _, c := range f.claims {
		if !gone[c.Owner] {
			keep = append(keep, c)
		}
	}
	f.claims = keep
	return owners, nil
}

func (f *fakeSource) has(o hostport.Owner) bool {
	for _, c := range f.claims {
		if c.Owner == o {
			return true
		}
	}
	return false
}

func claim(o hostport.Owner, port int, state liveness.State) Claim {
	return Claim{Backend: metrics.BackendIPTables, Owner: o,
		Claim:    hostport.Claim{Family: hostport.V4, Proto: "tcp", HostPort: port},
		Dest:     netip.MustParseAddrPort("10.88.0.2:80"),
		Evidence: liveness.Evidence{State: state, Reason: "test"}}
}

var (
	dead    = hostport.Owner{Network: "cbr0", ContainerID: "dead0123456789"}
	living  = hostport.Owner{Network: "cbr0", ContainerID: "live0123456789"}
	unknown = hostport.Owner{Network: "cbr0", ContainerID: "unkn0123456789"}
	known   = hostport.Owner{Network: "cbr0", ContainerID: "known123456789"}
)

const interval = time.Minute

// newAgent returns an agent over src asking an in-process gRPC CRI runtime (critest), with
// judges over empty private evidence dirs.
func newAgent(t *testing.T, src Source) (*Agent, *critest.Runtime) {
	t.Helper()
	rt := critest.Start(t)
	c, err := cri.Dial(rt.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	state, cache := t.TempDir(), t.TempDir()
	return &Agent{Sources: []Source{src}, Runtime: c, Interval: interval, RuntimeTimeout: 5 * time.Second,
		NewJudge: func() *liveness.Judge {
			return &liveness.Judge{Records: liveness.Store{Dir: state}, CacheDirs: []string{cache}}
		},
		Metrics: NewMetrics()}, rt
}

func pass(t *testing.T, a *Agent, at time.Time) Result {
	t.Helper()
	res, err := a.Pass(context.Background(), at)
	if err != nil {
		t.Fatalf("pass at %v: %v", at, err)
	}
	return res
}

// A stale claim of a sandbox the runtime does not know is removed on the first pass at least
// one interval after the first sighting, not before; alive and unknown owners never are,
// nor is the owner of a sandbox the runtime knows.
func TestTwoPassDecision(t *testing.T) {
	src := &fakeSource{claims: []Claim{claim(dead, 8080, liveness.Stale), claim(living, 8081, liveness.Alive),
		claim(unknown, 8082, liveness.Unknown), claim(known, 8083, liveness.Stale)}}
	a, rt := newAgent(t, src)
	rt.Set(known.ContainerID)
	t0 := time.Unix(1_800_000_000, 0)

	if res := pass(t, a, t0); len(src.collected) != 0 || res.Suspects != 3 || !res.RuntimeUp {
		t.Fatalf("first pass removed %v (result %+v); want nothing, 3 owners unknown to the runtime", src.collected, res)
	}
	pass(t, a, t0.Add(interval-time.Second))
	if len(src.collected) != 0 {
		t.Fatalf("a pass less than an interval after the first sighting removed %v", src.collected)
	}
	res := pass(t, a, t0.Add(interval))
	if len(src.collected) != 1 || len(src.collected[0]) != 1 || src.collected[0][0] != dead {
		t.Fatalf("second pass one interval later removed %v, want only %s", src.collected, dead)
	}
	if res.Removed[ReasonSandboxGone] != 1 || testutil.ToFloat64(a.Metrics.Removals.WithLabelValues(ReasonSandboxGone)) != 1 {
		t.Errorf("result %+v / counter: want one sandbox-gone removal", res)
	}
	for i := 2; i < 5; i++ {
		pass(t, a, t0.Add(time.Duration(i)*interval))
	}
	if len(src.collected) != 1 || !src.has(living) || !src.has(unknown) || !src.has(known) {
		t.Fatalf("later passes removed %v; alive, unknown and runtime-known owners must stay", src.collected)
	}
	if v := testutil.ToFloat64(a.Metrics.RuntimeUp); v != 1 {
		t.Errorf("portguard_agent_runtime_up %v, want 1", v)
	}
}

// The runtime down or failing: nothing is removed in that pass, and the pass does not count
// as a sighting: after a first sighting at t0, a failed pass at t0+interval removes nothing,
// the next answered pass does; a first pass that failed starts no memory at all.
func TestRuntimeDownRemovesNothing(t *testing.T) {
	src := &fakeSource{claims: []Claim{claim(dead, 8080, liveness.Stale)}}
	a, rt := newAgent(t, src)
	t0 := time.Unix(1_800_000_000, 0)

	rt.Fail(true)
	if res, err := a.Pass(context.Background(), t0); err != nil || res.RuntimeUp {
		t.Fatalf("failing runtime: result %+v err %v; want a completed pass with the runtime down", res, err)
	}
	rt.Fail(false)
	pass(t, a, t0.Add(interval))
	if len(src.collected) != 0 {
		t.Fatalf("removed %v: the pass with the runtime failing must not count as a sighting", src.collected)
	}
	rt.Stop()
	pass(t, a, t0.Add(2*interval))
	if len(src.collected) != 0 {
		t.Fatalf("removed %v with the runtime down", src.collected)
	}
	if v := testutil.ToFloat64(a.Metrics.RuntimeUp); v != 0 {
		t.Errorf("portguard_agent_runtime_up %v, want 0", v)
	}
	if v := testutil.ToFloat64(a.Metrics.Errors.WithLabelValues("runtime")); v != 2 {
		t.Errorf("runtime errors counted %v, want 2", v)
	}
	rt.Restart(t)
	deadline := time.Now().Add(10 * time.Second)
	for i := 3; len(src.collected) == 0 && time.Now().Before(deadline); i++ {
		pass(t, a, t0.Add(time.Duration(i)*interval))
	}
	if len(src.collected) != 1 {
		t.Fatalf("runtime back: removed %v, want the dead owner", src.collected)
	}
}

// A sandbox the runtime lists again resets the memory: absent, known, absent again needs a
// new interval.
func TestKnownAgainResetsMemory(t *testing.T) {
	src := &fakeSource{claims: []Claim{claim(dead, 8080, liveness.Stale)}}
	a, rt := newAgent(t, src)
	t0 := time.Unix(1_800_000_000, 0)
	pass(t, a, t0)
	rt.Set(dead.ContainerID)
	pass(t, a, t0.Add(interval))
	rt.Set()
	pass(t, a, t0.Add(2*interval))
	if len(src.collected) != 0 {
		t.Fatalf("removed %v after the runtime listed the sandbox in between", src.collected)
	}
	pass(t, a, t0.Add(3*interval))
	if len(src.collected) != 1 {
		t.Fatalf("removed %v, want the owner after two sightings an interval apart", src.collected)
	}
}

// --dry-run reports and removes nothing; a backend that cannot be read does not advance the
// memory and fails the pass.
func TestDryRunAndUnreadBackend(t *testing.T) {
	src := &fakeSource{claims: []Claim{claim(dead, 8080, liveness.Stale)}}
	a, _ := newAgent(t, src)
	a.DryRun = true
	t0 := time.Unix(1_800_000_000, 0)
	pass(t, a, t0)
	res := pass(t, a, t0.Add(interval))
	if len(src.collected) != 0 || res.WouldRemove[ReasonSandboxGone] != 1 {
		t.Fatalf("dry run: collected %v, result %+v", src.collected, res)
	}

	src2 := &fakeSource{claims: []Claim{claim(dead, 8080, liveness.Stale)}, failRead: true}
	b, _ := newAgent(t, src2)
	if _, err := b.Pass(context.Background(), t0); err == nil {
		t.Fatal("a pass whose backend could not be read completed")
	}
	src2.failRead = false
	pass(t, b, t0.Add(interval))
	if len(src2.collected) != 0 {
		t.Fatalf("removed %v: the unread pass must not count as a sighting", src2.collected)
	}
	if v := testutil.ToFloat64(b.Metrics.Errors.WithLabelValues("observe")); v != 1 {
		t.Errorf("observe errors %v, want 1", v)
	}
}

// Every owner a pass removes from one backend goes in one removal (one exclusive lock, one
// read of the backend), and each is reported with its reason.
func TestRemovalsOfAPassAreOneCollect(t *testing.T) {
	dead2 := hostport.Owner{Network: "other", ContainerID: "dead2345678901"}
	src := &fakeSource{claims: []Claim{claim(dead, 8080, liveness.Stale), claim(dead2, 8081, liveness.Stale), claim(living, 8082, liveness.Alive)}}
	a, _ := newAgent(t, src)
	t0 := time.Unix(1_800_000_000, 0)
	pass(t, a, t0)
	res := pass(t, a, t0.Add(interval))
	if len(src.collected) != 1 || len(src.collected[0]) != 2 || res.Removed[ReasonSandboxGone] != 2 {
		t.Fatalf("collect calls %v, result %+v; want one call removing both dead owners", src.collected, res)
	}
	if !src.has(living) {
		t.Fatal("the live owner was removed")
	}
}
