package cri_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/portguard/portguard/pkg/cri"
	"github.com/portguard/portguard/pkg/cri/critest"
)

func sandboxes(t *testing.T, c *cri.Client) (map[string]bool, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return c.Sandboxes(ctx)
}

// Every sandbox is listed, NOTREADY ones too; a runtime that stops or fails is an error,
// and one that comes back on the same socket answers the same client again.
func TestSandboxes(t *testing.T) {
	rt := critest.Start(t)
	rt.Set("ready1", "stopped1")
	rt.NotReady("stopped1")
	c, err := cri.Dial(rt.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got, err := sandboxes(t, c)
	if err != nil || len(got) != 2 || !got["ready1"] || !got["stopped1"] {
		t.Fatalf("sandboxes %v, %v; want ready1 and the NOTREADY stopped1", got, err)
	}
	rt.Fail(true)
	if got, err := sandboxes(t, c); err == nil {
		t.Fatalf("failing runtime: %v, no error", got)
	}
	rt.Fail(false)
	rt.Stop()
	if got, err := sandboxes(t, c); err == nil {
		t.Fatalf("stopped runtime: %v, no error", got)
	}
	rt.Restart(t)
	deadline := time.Now().Add(10 * time.Second)
	for {
		got, err = sandboxes(t, c)
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil || len(got) != 2 {
		t.Fatalf("restarted runtime: %v, %v", got, err)
	}
}

func TestNoSocket(t *testing.T) {
	c, err := cri.Dial("unix://" + filepath.Join(t.TempDir(), "none.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got, err := sandboxes(t, c); err == nil {
		t.Fatalf("no socket: %v, no error", got)
	}
}

func TestEndpoints(t *testing.T) {
	for _, bad := range []string{"", "/run/containerd/containerd.sock", "unix://relative.sock", "tcp://127.0.0.1:1"} {
		if _, err := cri.Dial(bad); err == nil {
			t.Errorf("Dial(%q) accepted", bad)
		}
	}
	if e := cri.DefaultEndpoint(); e != cri.DefaultEndpoints[0] && e != cri.DefaultEndpoints[1] {
		t.Errorf("DefaultEndpoint %q", e)
	}
}

// Without an explicit endpoint, the client follows the first default socket that exists:
// a runtime whose socket appears after the agent started is found on the next call.
func TestDialDefaultFollowsTheSocketThatAppears(t *testing.T) {
	rt := critest.Start(t)
	rt.Set("s1")
	missing := "unix://" + filepath.Join(t.TempDir(), "containerd.sock")
	saved := cri.DefaultEndpoints
	cri.DefaultEndpoints = []string{missing, rt.Endpoint + ".later"}
	t.Cleanup(func() { cri.DefaultEndpoints = saved })
	a, err := cri.DialDefault()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if a.Endpoint() != missing {
		t.Fatalf("endpoint %q with no socket present, want the first default %q", a.Endpoint(), missing)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := a.Sandboxes(ctx); err == nil {
		t.Fatal("no runtime: no error")
	}
	cri.DefaultEndpoints = []string{missing, rt.Endpoint}
	got, err := a.Sandboxes(ctx)
	if err != nil || !got["s1"] || a.Endpoint() != rt.Endpoint {
		t.Fatalf("after the socket appeared: %v, %v, endpoint %q", got, err, a.Endpoint())
	}
}
