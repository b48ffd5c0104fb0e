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
