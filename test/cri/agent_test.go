package cri_test

import (
	"strings"
	"testing"
	"time"

	"github.com/portguard/portguard/pkg/metrics/metricstest"
	"github.com/portguard/portguard/test/cri"
	"github.com/portguard/portguard/test/testbed"
)

// interval is the agent's pass interval here; passWait bounds the wait for one event.
const (
	interval = time.Second
	passWait = 30 * time.Second
)

func startAgent(r *cri.Runtime) *testbed.Agent {
	return r.StartAgent("--interval", interval.String(), "--listen", "127.0.0.1:9617")
}

// claimed reports whether the node's nat table (family f) holds the pod's chain.
func claimed(r *cri.Runtime, p *cri.Pod, f testbed.Family) bool {
	r.T.Helper()
	return strings.Contains(r.Bed.MustSaveNAT(f), p.Chain())
}

func answers(t *testing.T, b *testbed.Bed, port int, want string) {
	t.Helper()
	var got string
	var err error
	for i := 0; i < 3; i++ {
		if got, err = testbed.ConnectTCP(b.Client, b.NodeIP4.String(), port); err == nil {
			break
		}
	}
	if err != nil || got != want {
		t.Errorf("tcp %s:%d: answer %q (%v), want %q", b.NodeIP4, port, got, err, want)
	}
}

func scrape(t *testing.T, a *testbed.Agent) metricstest.Families {
	t.Helper()
	code, body, err := a.Get("/metrics")
	if err != nil || code != 200 {
		t.Fatalf("/metrics: %d %v", code, err)
	}
	fams, err := metricstest.Parse(strings.NewReader(body)) // prometheus/common/expfmt
	if err != nil {
		t.Fatalf("/metrics does not parse: %v\n%s", err, body)
	}
	return fams
}

// forgotten runs a pod with host port 8081, then crashes containerd the way FIELD-NOTES
// describes ("after a runtime crash whose records are lost, no DEL ever comes for the dead
// sandbox"): containerd, the shim and the pod are SIGKILLed, containerd's root and state
// (metadata, CRI's sandbox store, the pod's netns mount) are wiped. The bridge's and
// portguard's rules, portguard's records and the libcni cache stay, so the claim forwards
// the host port to an address nobody holds.
func forgotten(t *testing.T, r *cri.Runtime) *cri.Pod {
	t.Helper()
	gone := r.RunPod("gone", cri.HostPort(8081, 80))
	answers(t, r.Bed, 8081, "gone")
	r.Crash(true)
	return gone
}

// Item (b), (c), (e) of issue 12 against a real containerd: the claim of a sandbox containerd
// forgot in a crash is removed on the agent's second pass, never its first; a pod running
// under containerd keeps its port through every pass; /metrics says so.
func TestAgentRemovesTheClaimOfASandboxContainerdForgot(t *testing.T) {
	t.Parallel()
	r := cri.Start(t)
	gone := forgotten(t, r)
	r.Restart()
	if ids, err := r.Sandboxes(); err != nil || len(ids) != 0 {
		t.Fatalf("containerd after the crash lists %v (%v), want no sandbox", ids, err)
	}
	live := r.RunPod("live", cri.HostPort(8082, 80))
	if !claimed(r, gone, testbed.V4) || !claimed(r, gone, testbed.V6) {
		t.Fatal("the forgotten pod's claims are gone before the agent ran: the crash was not a crash")
	}

	a := startAgent(r)
	first := a.Next(passWait, "pass", "removed")
	if first.Event != "pass" {
		t.Fatalf("the first pass removed something: %s", first.Fields)
	}
	if !claimed(r, gone, testbed.V4) {
		t.Fatal("the forgotten pod's claim is gone after the first pass")
	}
	rm := a.Next(passWait, "removed")
	if rm.Str("reason") != "sandbox-gone" || !strings.Contains(string(rm.Fields["owner"]), gone.ID) ||
		rm.Str("backend") != "iptables" || !strings.Contains(string(rm.Fields["evidence"]), `"stale"`) {
		t.Fatalf("removed event %s", rm.Fields)
	}
	// Both families go (one event per owner and backend, family "ipv4,ipv6").
	if rm.Str("family") != "ipv4,ipv6" {
		t.Errorf("removed families %q, want ipv4,ipv6", rm.Str("family"))
	}
	if claimed(r, gone, testbed.V4) || claimed(r, gone, testbed.V6) {
		t.Fatal("the forgotten pod's claims are still there after its removed event")
	}
	for i := 0; i < 3; i++ {
		if ev := a.Next(passWait, "pass", "removed"); ev.Event == "removed" {
			t.Fatalf("removed again: %s", ev.Fields)
		}
	}
	if !claimed(r, live, testbed.V4) || !claimed(r, live, testbed.V6) {
		t.Fatal("the running pod's claims were removed")
	}
	answers(t, r.Bed, 8082, "live")

	fams := scrape(t, a)
	l4 := metricstest.L("family", "ipv4", "backend", "iptables")
	for _, w := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"portguard_agent_removals_total", metricstest.L("reason", "sandbox-gone"), 1},
		{"portguard_agent_removals_total", metricstest.L("reason", "address-reused"), 0},
		{"portguard_agent_runtime_up", nil, 1},
		{"portguard_agent_runtime_sandboxes", nil, 1},
		{"portguard_audit_up", l4, 1},
		{"portguard_claims", l4, 1},
		{"portguard_claims", metricstest.L("family", "ipv6", "backend", "iptables"), 1},
		{"portguard_alive_owner_claims", l4, 1},
		{"portguard_stale_owner_claims", l4, 0},
	} {
		if got, ok := fams.Value(w.name, w.labels); !ok || got != w.want {
			t.Errorf("%s%v = %v (present %v), want %v", w.name, w.labels, got, ok, w.want)
		}
	}
	if ts, ok := fams.Value("portguard_agent_last_success_timestamp_seconds", nil); !ok || time.Since(time.Unix(int64(ts), 0)) > time.Minute {
		t.Errorf("last success %v (present %v)", ts, ok)
	}
	if code, body, err := a.Get("/healthz"); err != nil || code != 200 {
		t.Errorf("/healthz: %d %q %v, want 200", code, body, err)
	}
	if code := a.Stop(); code != 0 {
		t.Errorf("agent exit on SIGTERM: %d, want 0", code)
	}
}

// Item (d): with containerd down (crashed, not restarted: its socket does not answer) the
// agent removes nothing however many passes run, and stays healthy; once containerd is
// back (without the sandbox) the forgotten claim goes after two more passes. Meanwhile a
// running pod's claim is kept throughout: containerd stopped cleanly leaves its pods running.
func TestAgentRemovesNothingWhileContainerdIsDown(t *testing.T) {
	t.Parallel()
	r := cri.Start(t)
	gone := forgotten(t, r)
	r.Restart()
	live := r.RunPod("live", cri.HostPort(8082, 80))
	r.Stop()

	a := startAgent(r)
	for i := 0; i < 3; i++ {
		ev := a.Next(passWait, "pass", "removed")
		if ev.Event == "removed" {
			t.Fatalf("removed with containerd down: %s", ev.Fields)
		}
		if string(ev.Fields["runtimeUp"]) != "false" {
			t.Fatalf("pass with containerd down: %s, want runtimeUp false", ev.Fields)
		}
	}
	if !claimed(r, gone, testbed.V4) || !claimed(r, live, testbed.V4) {
		t.Fatal("a claim was removed with containerd down")
	}
	answers(t, r.Bed, 8082, "live")
	fams := scrape(t, a)
	if v, ok := fams.Value("portguard_agent_runtime_up", nil); !ok || v != 0 {
		t.Errorf("portguard_agent_runtime_up %v (present %v), want 0", v, ok)
	}
	if v, _ := fams.Value("portguard_agent_errors_total", metricstest.L("kind", "runtime")); v < 3 {
		t.Errorf("runtime errors %v, want >= 3", v)
	}
	if v, _ := fams.Value("portguard_agent_removals_total", metricstest.L("reason", "sandbox-gone")); v != 0 {
		t.Errorf("removals %v with containerd down, want 0", v)
	}
	// A pass that could not reach the runtime is still a completed pass.
	if code, _, err := a.Get("/healthz"); err != nil || code != 200 {
		t.Errorf("/healthz with containerd down: %d %v, want 200", code, err)
	}

	r.Restart()
	rm := a.Next(passWait, "removed")
	if !strings.Contains(string(rm.Fields["owner"]), gone.ID) {
		t.Fatalf("removed %s, want the forgotten pod %s", rm.Fields, gone.ID)
	}
	if claimed(r, gone, testbed.V4) {
		t.Fatal("the forgotten claim is still there after containerd came back")
	}
	if !claimed(r, live, testbed.V4) {
		t.Fatal("the running pod lost its claim after containerd came back")
	}
	answers(t, r.Bed, 8082, "live")
}
