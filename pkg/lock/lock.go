// Package lock is the host-wide lock that keeps two portguard processes from interleaving
// their read-plan-write cycles. It is an flock(2) on a file, so the kernel releases it when
// the holder dies, even by SIGKILL.
package lock

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// DefaultPath is where the lock lives unless PORTGUARD_LOCK_FILE says otherwise.
const DefaultPath = "/run/portguard.lock"

// Path returns the lock file to use.
func Path() string {
	if p := os.Getenv("PORTGUARD_LOCK_FILE"); p != "" {
		return p
	}
	return DefaultPath
}

// ErrTimeout is returned when the lock was not free within the timeout.
var ErrTimeout = errors.New("timed out waiting for the portguard lock")

// Lock is a held lock.
type Lock struct{ f *os.File }

// Mode is how a call holds the lock.
type Mode int

const (
	// Exclusive: the call reads, plans and writes; nobody else may write meanwhile.
	Exclusive Mode = iota
	// Shared: the call writes without reading (a DEL of its own rules only), so any
	// number of such calls may run together, but none beside an exclusive holder.
	Shared
)

// Acquire waits up to timeout for the lock at path.
func Acquire(path string, mode Mode, timeout time.Duration) (*Lock, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(timeout)
	delay := time.Millisecond
	for {
		how := syscall.LOCK_EX
		if mode == Shared {
			how = syscall.LOCK_SH
		}
		err := syscall.Flock(int(f.Fd()), how|syscall.LOCK_NB)
		if err == nil {
			return &Lock{f: f}, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("%w %s after %s (another portguard call holds it)", ErrTimeout, path, timeout)
		}
		time.Sleep(delay)
		delay = min(delay*2, 20*time.Millisecond)
	}
}

// File is the locked file. A child process that inherits it keeps the lock held after
// this process dies, until the child ends too.
func (l *Lock) File() *os.File { return l.f }

// Release unlocks (closing the file drops the flock).
func (l *Lock) Release() {
	if l != nil && l.f != nil {
		l.f.Close()
		l.f = nil
	}
}
