// Package demo runs `make demo`'s script (demo.sh) as a test, once per backend: the story
// must be told to the end and every portguard step must behave as promised (exit 0).
package demo

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// skipOrFail skips (or, with PORTGUARD_E2E_REQUIRED=1 as in CI, fails) a test this machine
// cannot run.
func skipOrFail(t *testing.T, reason string) {
	t.Helper()
	if os.Getenv("PORTGUARD_E2E_REQUIRED") == "1" {
		t.Fatal(reason)
	}
	t.Skip(reason)
}

// portguardDir is $PORTGUARD_BIN_DIR (the Makefile's bin/ after `make build`), or the
// plugin built from the working tree into a temporary directory.
func portguardDir(t *testing.T) string {
	if d := os.Getenv("PORTGUARD_BIN_DIR"); d != "" {
		if _, err := os.Stat(filepath.Join(d, "portguard")); err == nil {
			return d
		}
	}
	d := t.TempDir()
	cmd := exec.Command("go", "build", "-o", filepath.Join(d, "portguard"), "./plugins/portguard")
	cmd.Dir = "../.."
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ./plugins/portguard: %v\n%s", err, out)
	}
	return d
}

// TestDemo runs demo.sh with DEMO_BACKEND=iptables and =nftables, one after the other (each
// run's namespaces are its own, but both remove /var/lib/cni when they made it).
func TestDemo(t *testing.T) {
	if os.Geteuid() != 0 {
		skipOrFail(t, "the demo needs root (network namespaces)")
	}
	for _, c := range []string{"bash", "ip", "iptables", "nft", "socat", "timeout", "sha512sum", "ss"} {
		if _, err := exec.LookPath(c); err != nil {
			skipOrFail(t, c+" not found (make deps installs it)")
		}
	}
	up := os.Getenv("PORTGUARD_UPSTREAM_DIR")
	if up == "" {
		out, err := exec.Command("go", "env", "GOPATH").Output()
		if err != nil {
			t.Fatal(err)
		}
		up = filepath.Join(strings.TrimSpace(string(out)), "bin")
	}
	for _, b := range []string{"cnitool", "bridge", "host-local", "portmap"} {
		if _, err := os.Stat(filepath.Join(up, b)); err != nil {
			skipOrFail(t, filepath.Join(up, b)+" missing (make deps installs it)")
		}
	}
	bin := portguardDir(t)
	for _, backend := range []string{"iptables", "nftables"} {
		t.Run(backend, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, "bash", "demo.sh")
			cmd.Env = append(os.Environ(), "DEMO_BACKEND="+backend, "PORTGUARD_BIN_DIR="+bin, "PORTGUARD_UPSTREAM_DIR="+up)
			var out bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &out
			err := cmd.Run()
			text := out.String()
			if err != nil || !strings.Contains(text, "RESULT: portguard behaved as promised.") {
				t.Fatalf("DEMO_BACKEND=%s bash test/demo/demo.sh: %v\n%s", backend, err, text)
			}
			for _, want := range []string{"== Part 1 — upstream portmap", "== Part 2 — the same story with portguard", "== Part 3 — repair"} {
				if !strings.Contains(text, want) {
					t.Errorf("the %s story lacks %q:\n%s", backend, want, text)
				}
			}
			if backend == "nftables" && !strings.Contains(text, `"backend": "nftables"`) {
				t.Errorf("the nftables story does not say it runs the nftables backend:\n%s", text)
			}
		})
	}
}
