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
	f    *os.File
	path string
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
//
// flock gives a waiting exclusive caller no priority: during a drain, overlapping shared
// holders could keep it out forever. So byte 0 of the file is a turnstile (an OFD lock): an
// exclusive caller holds it while it waits, and a shared caller passes through it before
// taking its share, so no new shared holder gets in while an exclusive one waits.
func Acquire(path string, mode Mode, timeout time.Duration) (*Lock, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, err
	}
	f = highFD(f)
	deadline := time.Now().Add(timeout)
	fail := func(err error) (*Lock, error) {
		f.Close()
		if errors.Is(err, errBusy) {
			return nil, fmt.Errorf("%w %s after %s (another portguard call holds it)", ErrTimeout, path, timeout)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	if err := poll(deadline, func() error { return ofdLock(f, 0, unix.F_WRLCK) }); err != nil {
		return fail(err)
	}
	how := syscall.LOCK_EX
	if mode == Shared {
		how = syscall.LOCK_SH
		ofdLock(f, 0, unix.F_UNLCK)
	}
	err = poll(deadline, func() error { return flockNB(f, how) })
	if err != nil {
		return fail(err)
	}
	ofdLock(f, 0, unix.F_UNLCK)
	return &Lock{f: f, path: path}, nil
}

// HighFD is the lowest descriptor number the lock file gets, in the plugin and in the
// iptables children that inherit it. A killed process closes its descriptors in ascending
// order, and closing an nf_tables netlink socket can block for an RCU grace period after a
// transaction that deleted rules; with the lock above every such socket, a dying process
// lets go of the lock only once it is done with nf_tables.
const HighFD = 100

// highFD moves f to a descriptor number of at least HighFD (keeping f if that fails).
func highFD(f *os.File) *os.File {
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, HighFD)
	if err != nil {
		return f
	}
	g := os.NewFile(uintptr(fd), f.Name())
	f.Close()
	return g
}

// errBusy: somebody else holds what we asked for; poll tries again.
var errBusy = errors.New("busy")

// poll retries try until it succeeds, fails otherwise than busy, or the deadline passes.
func poll(deadline time.Time, try func() error) error {
	delay := time.Millisecond
	for {
		err := try()
		if !errors.Is(err, errBusy) && !errors.Is(err, syscall.EINTR) {
			return err
		}
		if time.Now().After(deadline) {
			return errBusy
		}
		time.Sleep(delay)
		delay = min(delay*2, 20*time.Millisecond)
	}
}

// ofdLock sets (F_WRLCK) or clears (F_UNLCK) an open-file-description lock on one byte.
func ofdLock(f *os.File, offset int64, typ int16) error {
	fl := unix.Flock_t{Type: typ, Whence: 0, Start: offset, Len: 1}
	err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &fl)
	if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
		return errBusy
	}
	return err
}

// Ports takes exclusive locks on host ports, on top of a shared lock: ADDs of different
// ports run together, ADDs of the same port one after the other. A port is one byte of the
// lock file (after the turnstile byte), locked with an open-file-description lock, which,
// like flock, belongs to the open file and so is kept by children that inherit it and
// released when the last of them closes it. Keys are taken in ascending order, so two
// callers never wait for each other in a circle.
func (l *Lock) Ports(keys []int64, timeout time.Duration) error {
	keys = append([]int64(nil), keys...)
	sort.Slice(keys, func(i, j int) bool { return keys[i] < keys[j] })
	deadline := time.Now().Add(timeout)
	for i, k := range keys {
		if i > 0 && k == keys[i-1] {
			continue
		}
		try := func() error {
			err := ofdLock(l.f, 1+k, unix.F_WRLCK)
			if errors.Is(err, errBusy) {
				if yerr := l.yield(deadline); yerr != nil {
					return yerr
				}
			}
			return err
		}
		if err := poll(deadline, try); err != nil {
			if errors.Is(err, errBusy) {
				return fmt.Errorf("%w %s after %s (another portguard call is changing the same host port)", ErrTimeout, l.path, timeout)
			}
			return fmt.Errorf("lock %s (port key %d): %w", l.path, k, err)
		}
	}
	return nil
}

// yield lets an exclusive caller waiting at the turnstile go first while this shared
// holder waits for a port: the port's holder may be upgrading (Upgrade) and waits for every
// shared holder to leave, so waiting for the port with the share held would deadlock
// until the timeout. Nothing was read yet, so giving the share up costs nothing; the ports
// already taken stay held.
func (l *Lock) yield(deadline time.Time) error {
	fl := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 0, Len: 1}
	if err := unix.FcntlFlock(l.f.Fd(), unix.F_OFD_GETLK, &fl); err != nil || fl.Type == unix.F_UNLCK {
		return nil
	}
	syscall.Flock(int(l.f.Fd()), syscall.LOCK_UN)
	if err := poll(deadline, func() error { return ofdLock(l.f, 0, unix.F_WRLCK) }); err != nil {
		return err
	}
	ofdLock(l.f, 0, unix.F_UNLCK)
	return poll(deadline, func() error { return flockNB(l.f, syscall.LOCK_SH) })
}

// Upgrade turns a shared hold into an exclusive one and keeps its port locks, waiting up
// to timeout (ErrTimeout). It is not atomic: other exclusive callers may run in between,
// but no ADD of a port this holder locked can, so another ADD never sees, and takes over,
// half of what this one applied before it needed the whole node. On error the lock holds
// nothing but its ports; Release it.
func (l *Lock) Upgrade(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	// Give the share up first: an exclusive caller already at the turnstile waits for it.
	syscall.Flock(int(l.f.Fd()), syscall.LOCK_UN)
	err := poll(deadline, func() error { return ofdLock(l.f, 0, unix.F_WRLCK) })
	if err == nil {
		err = poll(deadline, func() error { return flockNB(l.f, syscall.LOCK_EX) })
		ofdLock(l.f, 0, unix.F_UNLCK)
	}
	if errors.Is(err, errBusy) {
		return fmt.Errorf("%w %s after %s (another portguard call holds it)", ErrTimeout, l.path, timeout)
	}
	if err != nil {
		return fmt.Errorf("lock %s: %w", l.path, err)
	}
	return nil
}

// flockNB tries flock(2) without blocking; errBusy when another holder is in the way.
func flockNB(f *os.File, how int) error {
	err := syscall.Flock(int(f.Fd()), how|syscall.LOCK_NB)
	if errors.Is(err, syscall.EWOULDBLOCK) {
		return errBusy
	}
	return err
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
