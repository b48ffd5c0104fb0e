package cri_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	"sigs.k8s.io/yaml"

	"github.com/portguard/portguard/pkg/metrics/metricstest"
	"github.com/portguard/portguard/test/cri"
	"github.com/portguard/portguard/test/testbed"
)

// manifestCaps returns the capabilities deploy/daemonset.yaml gives the agent container.
func manifestCaps(t *testing.T) []string {
	t.Helper()
	root, err := testbed.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(root, "deploy", "daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var ds appsv1.DaemonSet
	if err := yaml.Unmarshal(data, &ds); err != nil {
		t.Fatal(err)
	}
	for _, c := range ds.Spec.Template.Spec.Containers {
		if c.Name == "agent" && c.SecurityContext != nil && c.SecurityContext.Capabilities != nil {
			var caps []string
			for _, k := range c.SecurityContext.Capabilities.Add {
				caps = append(caps, string(k))
			}
			return caps
		}
	}
	t.Fatal("deploy/daemonset.yaml: no agent container with capabilities")
	return nil
}

// The agent works with exactly the capabilities of deploy/daemonset.yaml (as a root container
// with `drop: [ALL]` gets them): it judges a running pod alive and removes the claim of a pod
// containerd forgot. Without NET_ADMIN it cannot read the nat table; without SYS_PTRACE
// (read another container's /proc/<pid>/ns/net) or SYS_ADMIN (setns into the pod's netns to
// read its address) it can judge no owner alive. NET_RAW is for iptables-legacy nodes only
// (its raw socket); this machine's iptables is nft, so it is not exercised here.
func TestAgentCapabilities(t *testing.T) {
	t.Parallel()
	caps := manifestCaps(t)
	r := cri.Start(t)
	gone := forgotten(t, r)
	r.Restart()
	live := r.RunPod("live", cri.HostPort(8082, 80))
	l4 := metricstest.L("family", "ipv4", "backend", "iptables")

	for _, c := range []struct {
		drop, metric string
		labels       map[string]string
		want         float64 // exactly, or at least with atLeast
		atLeast      bool
	}{
		// iptables-save fails ("Could not fetch rule set generation id: Permission denied").
		{"NET_ADMIN", "portguard_agent_errors_total", metricstest.L("kind", "observe"), 1, true},
		{"SYS_PTRACE", "portguard_alive_owner_claims", l4, 0, false},
		{"SYS_ADMIN", "portguard_alive_owner_claims", l4, 0, false},
	} {
		if !slices.Contains(caps, c.drop) {
			t.Errorf("deploy/daemonset.yaml does not give the agent %s", c.drop)
			continue
		}
		less := slices.DeleteFunc(slices.Clone(caps), func(s string) bool { return s == c.drop })
		a := r.StartAgentWithCaps(less, "--interval", interval.String(), "--listen", "127.0.0.1:9617", "--dry-run")
		a.Next(passWait, "pass")
		got, ok := scrape(t, a).Value(c.metric, c.labels)
		if !ok || got != c.want && !(c.atLeast && got > c.want) {
			t.Errorf("without %s: %s = %v (present %v), want %v", c.drop, c.metric, got, ok, c.want)
		}
		a.Stop()
	}

	a := r.StartAgentWithCaps(caps, "--interval", interval.String(), "--listen", "127.0.0.1:9617")
	a.Next(passWait, "pass")
	if got, ok := scrape(t, a).Value("portguard_alive_owner_claims", l4); !ok || got != 1 {
		t.Errorf("with %v: portguard_alive_owner_claims = %v (present %v), want 1 (the running pod)", caps, got, ok)
	}
	rm := a.Next(passWait, "removed")
	if !strings.Contains(string(rm.Fields["owner"]), gone.ID) {
		t.Fatalf("with %v: removed %s, want the forgotten pod", caps, rm.Fields)
	}
	if claimed(r, gone, testbed.V4) || !claimed(r, live, testbed.V4) {
		t.Errorf("with %v: forgotten pod claimed %v, running pod claimed %v; want false, true", caps,
			claimed(r, gone, testbed.V4), claimed(r, live, testbed.V4))
	}
	answers(t, r.Bed, 8082, "live")
}
