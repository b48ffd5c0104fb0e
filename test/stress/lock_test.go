package stress

import (
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/portguard/portguard/pkg/hostport"
)

// withoutComments drops iptables-save's "# Generated/Completed" lines (they carry a time).
func withoutComments(raw string) string {
	var keep []string
	for _, l := range strings.Split(raw, "\n") {
		if !strings.HasPrefix(l, "#") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

func (n *node) dumpBoth() string {
	n.t.Helper()
	return withoutComments(n.mustObserve(hostport.V4).raw) + "\n" + withoutComments(n.mustObserve(hostport.V6).raw)
}

// waitMark waits until the shim log of a call shows a restore started.
func waitMark(t *testing.T, path string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if b, _ := os.ReadFile(path); strings.Contains(string(b), "s") {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("no iptables-restore started within %s", timeout)
}

// TestLockTimeout: a call that waits for the host-wide lock gives up after lockTimeout with
// CNI error 11 ("try again later") saying it timed out, and changes nothing. Every verb that
// writes takes the lock: ADD, DEL and GC.
func TestLockTimeout(t *testing.T) {
	require(t)
	n := newNode(t, false)
	n.loadForeign()
	held := &attachment{Name: "held", Network: "locknet", ID: "held", IP4: "198.18.50.10/24", IP6: "fd00:50::10/64",
		Maps: []mapping{{"tcp", 8080, 80}}}
	if r := n.call(callSpec{Verb: "ADD", ID: held.ID, Stdin: held.netConf(5, nil)}); r.Exit != 0 {
		t.Fatalf("ADD: %s", r)
	}
	before := n.dumpBoth()

	// Hold the lock ourselves with flock(2), as another portguard process would.
	f, err := os.OpenFile(n.lockFile, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}

	waiting := &attachment{Name: "waiting", Network: "locknet", ID: "waiting", IP4: "198.18.50.11/24", IP6: "fd00:50::11/64",
		Maps: []mapping{{"tcp", 8080, 80}, {"udp", 5353, 53}}}
	for _, c := range []callSpec{
		{Verb: "ADD", ID: waiting.ID, Stdin: waiting.netConf(1, nil)},
		{Verb: "DEL", ID: held.ID, Stdin: held.netConf(1, nil)},
		{Verb: "GC", Stdin: gcConf("locknet", nil, 1)},
	} {
		t.Run(c.Verb, func(t *testing.T) {
			c.Timeout = 20 * time.Second
			r := n.call(c)
			code, msg := r.cniError()
			t.Logf("%s while the lock is held: %s", c.Verb, r)
			if r.Exit == 0 || code != types.ErrTryAgainLater || !strings.Contains(msg, "timed out") {
				t.Errorf("%s: want CNI error %d (try again later) saying it timed out, got code %d: %s", c.Verb, types.ErrTryAgainLater, code, msg)
			}
			if r.Dur < 900*time.Millisecond || r.Dur > 5*time.Second {
				t.Errorf("%s gave up after %s, want about the 1 s lockTimeout", c.Verb, r.Dur)
			}
		})
	}
	if after := n.dumpBoth(); after != before {
		t.Errorf("calls that timed out on the lock changed the tables:\nbefore\n%s\nafter\n%s", before, after)
	}

	// Released: the same ADD now succeeds.
	syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	if r := n.call(callSpec{Verb: "ADD", ID: waiting.ID, Stdin: waiting.netConf(1, nil)}); r.Exit != 0 {
		t.Fatalf("ADD after the lock was released: %s", r)
	}
}

// TestLockReleasedWhenHolderKilled: a portguard call holding the lock (stuck in a slow
// iptables-restore) makes the next call time out; once the holder is SIGKILLed (with the
// processes it started), the next call gets the lock at once and succeeds, and the killed
// call left nothing behind.
func TestLockReleasedWhenHolderKilled(t *testing.T) {
	require(t)
	n := newNode(t, true)
	n.loadForeign()
	stuck := &attachment{Name: "stuck", Network: "locknet", ID: "stuck", IP4: "198.18.50.20/24",
		Maps: []mapping{{"tcp", 8080, 80}}}
	next := &attachment{Name: "next", Network: "locknet", ID: "next", IP4: "198.18.50.21/24",
		Maps: []mapping{{"tcp", 8080, 80}}}
	before := n.dumpBoth()

	mark := n.dir + "/stuck.mark"
	holder := make(chan callResult, 1)
	started := make(chan int, 1)
	go func() {
		holder <- n.call(callSpec{Verb: "ADD", ID: stuck.ID, Stdin: stuck.netConf(5, nil), Started: started,
			Env: []string{"PGS_RESTORE_DELAY=30", "PGS_MARK=" + mark}, Timeout: 40 * time.Second})
	}()
	pg := <-started
	waitMark(t, mark, 10*time.Second) // the holder has the lock and runs iptables-restore

	r := n.call(callSpec{Verb: "ADD", ID: next.ID, Stdin: next.netConf(1, nil), Timeout: 20 * time.Second})
	if code, msg := r.cniError(); r.Exit == 0 || code != types.ErrTryAgainLater || !strings.Contains(msg, "timed out") {
		t.Fatalf("ADD while another portguard call holds the lock: want CNI error 11 (timed out), got %s", r)
	}
	t.Logf("ADD behind a stuck portguard call: %s", r)

	// SIGKILL the holder and everything it started.
	syscall.Kill(-pg, syscall.SIGKILL)
	hr := <-holder
	if !hr.Killed {
		t.Fatalf("holder was not killed: %s", hr)
	}
	if after := n.dumpBoth(); after != before {
		t.Errorf("the killed call changed the tables:\nbefore\n%s\nafter\n%s", before, after)
	}
	r = n.call(callSpec{Verb: "ADD", ID: next.ID, Stdin: next.netConf(1, nil), Timeout: 20 * time.Second})
	if r.Exit != 0 {
		t.Fatalf("ADD after the holder was SIGKILLed: %s", r)
	}
	if r.Dur > 900*time.Millisecond {
		t.Errorf("ADD after the holder died took %s: the lock was not free at once", r.Dur)
	}
	o := n.mustObserve(hostport.V4)
	if a := o.s.Attachments[next.chain()]; a == nil || len(a.Jumps) != 1 || !a.Exists {
		t.Errorf("next's attachment not installed:\n%s", o.raw)
	}
	if _, ok := o.s.Attachments[stuck.chain()]; ok {
		t.Errorf("the killed call's attachment appeared:\n%s", o.raw)
	}
}
