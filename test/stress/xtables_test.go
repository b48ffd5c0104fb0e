package stress

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// legacyShim makes the plugin run iptables-legacy under the usual names, with the xtables
// lock at a per-test path (XTABLES_LOCKFILE), so the test can hold it without touching the
// host's /run/xtables.lock.
func (n *node) legacyShim(t *testing.T) (lockPath string) {
	t.Helper()
	n.shimDir = filepath.Join(n.dir, "legacy-shim")
	if err := os.MkdirAll(n.shimDir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, pair := range [][2]string{
		{"iptables", "iptables-legacy"}, {"iptables-save", "iptables-legacy-save"}, {"iptables-restore", "iptables-legacy-restore"},
		{"ip6tables", "ip6tables-legacy"}, {"ip6tables-save", "ip6tables-legacy-save"}, {"ip6tables-restore", "ip6tables-legacy-restore"},
	} {
		real, err := exec.LookPath(pair[1])
		if err != nil {
			skipOrFail(t, pair[1]+" not installed (Debian package iptables)")
		}
		script := fmt.Sprintf("#!/bin/sh\nexec '%s' \"$@\"\n", real)
		if err := os.WriteFile(filepath.Join(n.shimDir, pair[0]), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return filepath.Join(n.dir, "xtables.lock")
}

// TestXtablesLockTimeoutLegacy: with the iptables-legacy backend, a call waiting for the
// xtables lock (held by another program, e.g. kube-proxy restoring a large table) must give
// up after the configured lockTimeout with a clear error, never hang; STATUS must not wait
// for the lock at all.
func TestXtablesLockTimeoutLegacy(t *testing.T) {
	require(t)
	n := newNode(t, false)
	xlock := n.legacyShim(t)
	env := []string{"XTABLES_LOCKFILE=" + xlock}
	first := &attachment{Name: "first", Network: "xnet", ID: "first", IP4: "198.18.70.10/24", Maps: []mapping{{"tcp", 8080, 80}}}
	if r := n.call(callSpec{Verb: "ADD", ID: first.ID, Stdin: first.netConf(1, nil), Env: env}); r.Exit != 0 {
		skipOrFail(t, "iptables-legacy does not work here: ADD: "+r.short())
	}

	f, err := os.OpenFile(xlock, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	second := &attachment{Name: "second", Network: "xnet", ID: "second", IP4: "198.18.70.11/24", Maps: []mapping{{"tcp", 9090, 80}}}
	const bound = 4 * time.Second // the test kills a call that runs longer
	for _, c := range []callSpec{
		{Verb: "ADD", ID: second.ID, Stdin: second.netConf(1, nil)},
		{Verb: "DEL", ID: first.ID, Stdin: first.netConf(1, nil)},
		{Verb: "STATUS", Stdin: gcConf("xnet", nil, 1)},
	} {
		t.Run(c.Verb, func(t *testing.T) {
			c.Env, c.Timeout = env, bound
			r := n.call(c)
			t.Logf("%s while the xtables lock is held (lockTimeout 1 s): %s", c.Verb, r.short())
			switch {
			case r.Err != nil:
				t.Errorf("%s hung on the xtables lock: killed after %s (lockTimeout is 1 s)", c.Verb, bound)
			case c.Verb == "STATUS":
				if r.Exit != 0 || r.Dur > time.Second {
					t.Errorf("STATUS waited for the xtables lock or failed: %s", r.short())
				}
			default:
				_, msg := r.cniError()
				if r.Exit == 0 || !strings.Contains(msg, "xtables lock") || r.Dur > 4*time.Second {
					t.Errorf("%s: want a clear error about the xtables lock after about 1 s, got %s", c.Verb, r.short())
				}
			}
		})
	}
	syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	if r := n.call(callSpec{Verb: "ADD", ID: second.ID, Stdin: second.netConf(1, nil), Env: env}); r.Exit != 0 {
		t.Fatalf("ADD after the xtables lock was released: %s", r)
	}
}
