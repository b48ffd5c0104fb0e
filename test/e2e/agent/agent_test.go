// Package agent tests portguard-agent on the test bed: claims made by the real plugin
// (cnitool, bridge, host-local, portguard) in a node namespace, the evidence (portguard's
// records, the libcni cache) private to the bed, the runtime an in-process CRI server
// (pkg/cri/critest) whose sandboxes the test sets. Packets show who gets a host port.
package agent

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/portguard/portguard/pkg/cri/critest"
	"github.com/portguard/portguard/pkg/metrics/metricstest"
	tb "github.com/portguard/portguard/test/testbed"
)

func TestMain(m *testing.M) { os.Exit(tb.Main(m)) }

// interval is the agent's pass interval in these tests.
const interval = time.Second

// passWait bounds the wait for one pass event.
const passWait = 30 * time.Second

// node is a bed with a portguard network (backend as given) whose plugin logs to logFile.
type node struct {
	b       *tb.Bed
	n       *tb.Network
	logFile string
	backend string
}

func newNode(t *testing.T, backend string) *node {
	t.Helper()
	t.Parallel()
	b := tb.New(t)
	logFile := filepath.Join(b.Dir, "portguard.log")
	conf := map[string]any{"logFile": logFile}
	if backend == "nftables" {
		conf["backend"] = "nftables"
	}
	n := b.Network(tb.NetConfig{IPv4Only: true, PortPlugin: "portguard", PortConf: conf})
	return &node{b: b, n: n, logFile: logFile, backend: backend}
}

// pod adds a serving pod with host port hostPort -> 80.
func (nd *node) pod(name string, hostPort int) *tb.Pod {
	p := nd.b.NewPod(name)
	p.Serve(80)
	nd.n.MustAdd(p, tb.TCP(hostPort, 80))
	return p
}

// claimed reports whether the backend still holds a claim of p.
func (nd *node) claimed(t *testing.T, p *tb.Pod) bool {
	t.Helper()
	if nd.backend == "nftables" {
		out, err := nd.b.Exec(nd.b.Node, "nft", "list", "table", "inet", "portguard")
		if err != nil {
			t.Fatalf("nft list table: %v", err)
		}
		return strings.Contains(out, p.ContainerID)
	}
	return strings.Contains(nd.b.MustSaveNAT(tb.V4), p.Chain(nd.n))
}

func (nd *node) agent(rt *critest.Runtime, extra ...string) *tb.Agent {
	args := append([]string{"--interval", interval.String(), "--runtime-endpoint", rt.Endpoint, "--plugin-log", nd.logFile}, extra...)
	return nd.b.StartAgent(nil, args...)
}

func answers(t *testing.T, b *tb.Bed, port int, want string) {
	t.Helper()
	var got string
	var err error
	for i := 0; i < 3; i++ {
		if got, err = tb.Dial("tcp", b.Client, b.NodeIP4.String(), port); err == nil {
			break
		}
	}
	if err != nil || got != want {
		t.Errorf("tcp %s:%d: answer %q (%v), want %q", b.NodeIP4, port, got, err, want)
	}
}

// A pod that died without DEL (netns gone: stale) and whose sandbox the runtime does not
// know loses its claims on the agent's second pass, not its first; a live pod the runtime
// does not know either keeps its port through every pass. The metrics say so, and count
// the plugin's takeover.
func TestAgentRemovesGoneSandboxOnSecondPass(t *testing.T) {
	for _, backend := range []string{"iptables", "nftables"} {
		t.Run(backend, func(t *testing.T) {
			nd := newNode(t, backend)
			dead := nd.pod("dead", 9050)
			live := nd.pod("live", 9051)
			dead.Kill()
			rt := critest.Start(t) // knows neither sandbox

			a := nd.agent(rt)
			first := a.Next(passWait, "pass", "removed")
			if first.Event != "pass" {
				t.Fatalf("first pass removed something: %v", first.Fields)
			}
			if !nd.claimed(t, dead) {
				t.Fatal("the dead pod's claim is gone after the first pass")
			}
			rm := a.Next(passWait, "removed")
			if rm.Str("reason") != "sandbox-gone" || !strings.Contains(string(rm.Fields["owner"]), dead.ContainerID) ||
				rm.Str("backend") != backend || rm.Fields["evidence"] == nil || rm.Str("family") != "ipv4" {
				t.Fatalf("removed event %v", rm.Fields)
			}
			if nd.claimed(t, dead) {
				t.Fatal("the dead pod's claim is still there after its removed event")
			}
			for i := 0; i < 3; i++ {
				if ev := a.Next(passWait, "pass", "removed"); ev.Event == "removed" {
					t.Fatalf("removed again: %v", ev.Fields)
				}
			}
			if !nd.claimed(t, live) {
				t.Fatal("the live pod's claim was removed although its owner is alive")
			}
			answers(t, nd.b, 9051, "live")

			// A takeover by the plugin after the agent started is counted. The runtime still
			// lists the victim, so the agent leaves it to the plugin.
			victim := nd.b.NewPod("victim")
			rt.Set(victim.ContainerID)
			victim.Serve(80)
			nd.n.MustAdd(victim, tb.TCP(9052, 80))
			victim.Kill()
			nd.pod("taker", 9052)
			scrapeUntil(t, a, func(f metricstest.Families) error {
				if v, _ := f.Value("portguard_plugin_events_total", metricstest.L("event", "takeover")); v != 1 {
					return fmt.Errorf("plugin takeover events %v, want 1", v)
				}
				return nil
			})
			fams := scrape(t, a)
			l := metricstest.L("family", "ipv4", "backend", backend)
			for _, w := range []struct {
				name   string
				labels map[string]string
				want   float64
			}{
				{"portguard_agent_removals_total", metricstest.L("reason", "sandbox-gone"), 1},
				{"portguard_agent_removals_total", metricstest.L("reason", "address-reused"), 0},
				{"portguard_agent_runtime_up", nil, 1},
				{"portguard_audit_up", l, 1},
			} {
				if got, ok := fams.Value(w.name, w.labels); !ok || got != w.want {
					t.Errorf("%s%v = %v (present %v), want %v", w.name, w.labels, got, ok, w.want)
				}
			}
			if got, ok := fams.Value("portguard_claims", l); !ok || got < 1 {
				t.Errorf("portguard_claims%v = %v (present %v), want the live pods' claims", l, got, ok)
			}
			if got, ok := fams.Value("portguard_alive_owner_claims", l); !ok || got < 1 {
				t.Errorf("portguard_alive_owner_claims%v = %v, want >= 1", l, got)
			}
			if n, ok := fams.Value("portguard_agent_pass_duration_seconds", nil); !ok || n < 3 || fams.Type("portguard_agent_pass_duration_seconds") != "HISTOGRAM" {
				t.Errorf("pass duration: %v samples (present %v, type %s)", n, ok, fams.Type("portguard_agent_pass_duration_seconds"))
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
		})
	}
}

// With the runtime down (no socket) or failing, nothing is removed however many passes run;
// once it answers again, the dead pod goes after two more passes.
func TestAgentRuntimeDownRemovesNothing(t *testing.T) {
	nd := newNode(t, "iptables")
	dead := nd.pod("dead", 9060)
	dead.Kill()
	rt := critest.Start(t)
	rt.Stop()
	a := nd.agent(rt)
	for i := 0; i < 3; i++ {
		a.Next(passWait, "runtime-unavailable")
		if ev := a.Next(passWait, "pass", "removed"); ev.Event == "removed" {
			t.Fatalf("removed with the runtime down: %v", ev.Fields)
		}
	}
	if !nd.claimed(t, dead) {
		t.Fatal("claim removed with the runtime down")
	}
	fams := scrape(t, a)
	if v, _ := fams.Value("portguard_agent_runtime_up", nil); v != 0 {
		t.Errorf("portguard_agent_runtime_up %v, want 0", v)
	}
	if v, _ := fams.Value("portguard_agent_errors_total", metricstest.L("kind", "runtime")); v < 3 {
		t.Errorf("runtime errors %v, want >= 3", v)
	}
	// A pass that could not reach the runtime is still a completed pass.
	if code, _, err := a.Get("/healthz"); err != nil || code != 200 {
		t.Errorf("/healthz with the runtime down: %d %v, want 200", code, err)
	}
	rt.Restart(t)
	a.Next(passWait, "removed")
	if nd.claimed(t, dead) {
		t.Fatal("claim still there after the runtime came back")
	}
}

// A dead pod's address handed to a new live pod: its host port reaches the new pod. The
// agent removes the stale claim as address-reused even while the runtime still lists the
// dead pod's sandbox (sandbox-gone cannot apply), on its first pass; the new pod keeps its
// own port.
func TestAgentRemovesAddressReused(t *testing.T) {
	nd := newNode(t, "iptables")
	b := nd.b
	old := nd.pod("old", 9070)
	old.Kill()
	if err := os.Remove(filepath.Join(b.IPAMDir, nd.n.Name, old.IP4.String())); err != nil {
		t.Fatalf("release the old pod's address: %v", err)
	}
	p := b.NewPod("new")
	p.Serve(80)
	ones, _ := nd.n.Subnet4.Mask.Size()
	if _, err := nd.n.Call("add", p, tb.CallOptions{IPs: []string{fmt.Sprintf("%s/%d", old.IP4, ones)},
		Mappings: []tb.PortMapping{tb.TCP(9071, 80)}}); err != nil {
		t.Fatal(err)
	}
	answers(t, b, 9070, "new") // the harm
	rt := critest.Start(t)
	rt.Set(old.ContainerID, p.ContainerID)

	a := nd.agent(rt)
	rm := a.Next(passWait, "removed")
	if rm.Str("reason") != "address-reused" || !strings.Contains(string(rm.Fields["owner"]), old.ContainerID) ||
		!strings.Contains(string(rm.Fields["reusedBy"]), p.ContainerID) {
		t.Fatalf("removed event %v", rm.Fields)
	}
	var pass struct {
		Removed map[string]int `json:"removed"`
	}
	ev := a.Next(passWait, "pass")
	if err := json.Unmarshal(ev.Fields["removed"], &pass.Removed); err != nil || pass.Removed["address-reused"] != 1 {
		t.Errorf("the pass that removed it counts %v (%v)", pass.Removed, err)
	}
	if nd.claimed(t, old) || !nd.claimed(t, p) {
		t.Fatalf("after the removal: old claimed %v, new claimed %v", nd.claimed(t, old), nd.claimed(t, p))
	}
	if got, err := tb.Dial("tcp", b.Client, b.NodeIP4.String(), 9070); err == nil {
		t.Errorf("the removed port still answers: %q", got)
	}
	answers(t, b, 9071, "new")
}

// --dry-run reports what it would remove (would-remove) and removes nothing; --once runs
// one pass and exits 0.
func TestAgentDryRunAndOnce(t *testing.T) {
	nd := newNode(t, "iptables")
	dead := nd.pod("dead", 9080)
	dead.Kill()
	rt := critest.Start(t)
	a := nd.agent(rt, "--dry-run")
	a.Next(passWait, "pass")
	ev := a.Next(passWait, "would-remove", "removed")
	if ev.Event != "would-remove" || ev.Str("reason") != "sandbox-gone" {
		t.Fatalf("dry run: %s %v", ev.Event, ev.Fields)
	}
	a.Next(passWait, "pass")
	if !nd.claimed(t, dead) {
		t.Fatal("--dry-run removed the claim")
	}
	a.Stop()

	once := nd.b.StartAgent(nil, "--once", "--runtime-endpoint", rt.Endpoint)
	once.Next(passWait, "pass")
	if code := once.Wait(passWait); code != 0 {
		t.Errorf("--once exit %d, want 0", code)
	}
	if rt.Calls() < 3 {
		t.Errorf("the runtime was asked %d times", rt.Calls())
	}
}

// /healthz answers 503 once no pass has completed for 3 intervals: here every read of the
// nat table fails (an iptables-save that exits 1 first in PATH).
func TestAgentHealthz(t *testing.T) {
	nd := newNode(t, "iptables")
	shim := t.TempDir()
	for _, name := range []string{"iptables-save", "ip6tables-save"} {
		if err := os.WriteFile(filepath.Join(shim, name), []byte("#!/bin/sh\necho 'broken on purpose' >&2\nexit 1\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	rt := critest.Start(t)
	a := nd.b.StartAgent([]string{"PATH=" + shim + ":" + os.Getenv("PATH")},
		"--interval", interval.String(), "--runtime-endpoint", rt.Endpoint)
	ev := a.Next(passWait, "error")
	if ev.Str("kind") != "observe" {
		t.Fatalf("error event %v, want kind observe", ev.Fields)
	}
	deadline := time.Now().Add(passWait)
	for {
		code, body, err := a.Get("/healthz")
		if err == nil && code == 503 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/healthz: %d %q %v; want 503 after 3 intervals without a completed pass", code, body, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if fams := scrape(t, a); fams != nil {
		if v, _ := fams.Value("portguard_agent_errors_total", metricstest.L("kind", "observe")); v < 3 {
			t.Errorf("observe errors %v, want >= 3", v)
		}
	}
}

func scrape(t *testing.T, a *tb.Agent) metricstest.Families {
	t.Helper()
	code, body, err := a.Get("/metrics")
	if err != nil || code != 200 {
		t.Fatalf("/metrics: %d %v", code, err)
	}
	fams, err := metricstest.Parse(strings.NewReader(body))
	if err != nil {
		t.Fatalf("/metrics does not parse: %v\n%s", err, body)
	}
	return fams
}

func scrapeUntil(t *testing.T, a *tb.Agent, ok func(metricstest.Families) error) {
	t.Helper()
	deadline := time.Now().Add(passWait)
	for {
		err := ok(scrape(t, a))
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}
