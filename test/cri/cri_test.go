package cri_test

import (
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/portguard/portguard/test/cri"
	"github.com/portguard/portguard/test/testbed"
)

func TestMain(m *testing.M) { os.Exit(cri.Main(m)) }

// A pod created through CRI with a hostPort answers through it from a client namespace (CNI
// ADD by containerd: bridge + host-local + portguard), for both families, and after
// StopPodSandbox and RemovePodSandbox (two DELs) the port answers no more and its chain is gone.
func TestPodAnswersThroughItsHostPort(t *testing.T) {
	t.Parallel()
	r := cri.Start(t)
	b := r.Bed
	p := r.RunPod("web", cri.HostPort(8080, 80))
	for _, ip := range []string{b.NodeIP4.String(), b.NodeIP6.String()} {
		ans, err := testbed.ConnectTCP(b.Client, ip, 8080)
		if err != nil || ans != "web" {
			t.Fatalf("client -> %s:8080 = %q, %v; want the pod's answer \"web\"", ip, ans, err)
		}
	}
	for _, f := range []testbed.Family{testbed.V4, testbed.V6} {
		if got := b.DNChains(f); !slices.Contains(got, p.Chain()) {
			t.Fatalf("%s: chains %v, want the pod's %s", f, got, p.Chain())
		}
	}
	// containerd ran the plugins in the bed's node namespace, never in the machine's.
	for _, save := range []string{"iptables-save", "ip6tables-save"} {
		out, err := exec.Command(save, "-t", "nat").Output()
		if err == nil && strings.Contains(string(out), p.Chain()) {
			t.Fatalf("the pod's chain %s is in the machine's own nat table (%s)", p.Chain(), save)
		}
	}
	if err := p.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := p.Remove(); err != nil {
		t.Fatal(err)
	}
	if ans, err := testbed.ConnectTCP(b.Client, b.NodeIP4.String(), 8080); err == nil {
		t.Errorf("host port still answers %q after the pod was removed", ans)
	}
	for _, f := range []testbed.Family{testbed.V4, testbed.V6} {
		if got := b.DNChains(f); len(got) != 0 {
			t.Errorf("%s: chains %v left after the pod was removed", f, got)
		}
	}
}
