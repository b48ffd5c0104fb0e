package lock

import (
	"errors"
	"path/filepath"
	"testing"
	"time"
)

// TestLockSitsAboveLowDescriptors: the lock file is moved to a descriptor ≥ HighFD (so a
// dying process closes its nf_tables sockets first), and it still excludes: a second
// exclusive holder times out until the first lets go, shared holders share.
func TestLockSitsAboveLowDescriptors(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	a, err := Acquire(path, Exclusive, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if fd := a.File().Fd(); fd < HighFD {
		t.Fatalf("lock descriptor %d, want ≥ %d", fd, HighFD)
	}
	if _, err := Acquire(path, Exclusive, 50*time.Millisecond); !errors.Is(err, ErrTimeout) {
		t.Fatalf("second exclusive Acquire while held: %v, want ErrTimeout", err)
	}
	a.Release()
	s1, err := Acquire(path, Shared, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer s1.Release()
	s2, err := Acquire(path, Shared, 50*time.Millisecond)
	if err != nil {
		t.Fatalf("second shared Acquire: %v", err)
	}
	s2.Release()
}

// TestUpgradeKeepsPortsAndIsNotBlockedByAWaiter: a shared holder of a port upgrades to the
// exclusive lock while another shared holder waits for that port. The waiter gives way
// (it holds nothing read yet), so the upgrade does not wait for the timeout; the port stays
// the upgrader's throughout, and the waiter gets it only when the upgrader is done.
func TestUpgradeKeepsPortsAndIsNotBlockedByAWaiter(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	p, err := Acquire(path, Shared, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Ports([]int64{8080}, time.Second); err != nil {
		t.Fatal(err)
	}
	q, err := Acquire(path, Shared, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Release()
	got := make(chan time.Time, 1)
	go func() {
		if err := q.Ports([]int64{8080}, 10*time.Second); err != nil {
			t.Error(err)
		}
		got <- time.Now()
	}()
	time.Sleep(50 * time.Millisecond) // q is waiting for the port, holding its share
	start := time.Now()
	if err := p.Upgrade(3 * time.Second); err != nil {
		t.Fatalf("upgrade with a shared holder waiting for its port: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("the upgrade took %s: it waited for the waiter", d)
	}
	if _, err := Acquire(path, Shared, 50*time.Millisecond); !errors.Is(err, ErrTimeout) {
		t.Errorf("a shared Acquire beside the upgraded holder: %v, want ErrTimeout", err)
	}
	time.Sleep(100 * time.Millisecond)
	select {
	case <-got:
		t.Fatal("the waiter got the port while the upgraded holder had it")
	default:
	}
	released := time.Now()
	p.Release()
	select {
	case at := <-got:
		if at.Before(released) {
			t.Fatal("the waiter got the port before the holder let go")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the waiter never got the port")
	}
}
