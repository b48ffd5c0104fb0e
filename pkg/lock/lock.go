// Package lock is the host-wide lock that keeps two portguard processes from interleaving
// their read-plan-write cycles. It is an flock(2) on a file, so the kernel releases it when
// the holder dies, even by SIGKILL.
package lock

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
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
type Lock struct {
	f       *os.File
	path    string
	timeout time.Duration
}

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
	return acquire(path, mode, time.Now().Add(timeout), timeout)
}

func acquire(path string, mode Mode, deadline time.Time, timeout time.Duration) (*Lock, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, err
	}
	delay := time.Millisecond
	for {
		how := syscall.LOCK_EX
		if mode == Shared {
			how = syscall.LOCK_SH
		}
		err := syscall.Flock(int(f.Fd()), how|syscall.LOCK_NB)
		if err == nil {
			return &Lock{f: f, path: path, timeout: timeout}, nil
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

// Ports takes exclusive locks on host ports, on top of a shared lock: ADDs of different
// ports run together, ADDs of the same port one after the other. A port is one byte of the
// lock file, locked with an open-file-description lock (F_OFD_SETLK), which, like flock,
// belongs to the open file and so is kept by children that inherit it and released when
// the last of them closes it. Keys are taken in ascending order, so two callers never
// wait for each other in a circle.
func (l *Lock) Ports(keys []int64, timeout time.Duration) error {
	keys = append([]int64(nil), keys...)
	sort.Slice(keys, func(i, j int) bool { return keys[i] < keys[j] })
	deadline := time.Now().Add(timeout)
	for i, k := range keys {
		if i > 0 && k == keys[i-1] {
			continue
		}
		fl := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 1 + k, Len: 1}
		delay := time.Millisecond
		for {
			err := unix.FcntlFlock(l.f.Fd(), unix.F_OFD_SETLK, &fl)
			if err == nil {
				break
			}
			if !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EACCES) && !errors.Is(err, unix.EINTR) {
				return fmt.Errorf("lock %s (port key %d): %w", l.path, k, err)
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%w %s after %s (another portguard call is changing the same host port)", ErrTimeout, l.path, timeout)
			}
			time.Sleep(delay)
			delay = min(delay*2, 20*time.Millisecond)
		}
	}
	return nil
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
