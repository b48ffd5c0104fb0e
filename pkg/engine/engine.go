// Package engine runs the verbs over a firewall backend (pkg/backend): it holds the
// host-wide lock (shared plus a lock per host port for ADD and the blind DEL, exclusive
// for the rest), applies the conflict policy and judges whether a conflicting owner is
// alive (policy.go), keeps portguard's records of its attachments, and gives errors their
// CNI codes at the edge.
package engine

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/portguard/portguard/pkg/backend"
	iptbackend "github.com/portguard/portguard/pkg/backend/iptables"
	"github.com/portguard/portguard/pkg/config"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/lock"
)

// Engine carries what every verb needs. It serves one verb at a time (the plugin makes one
// call per process).
type Engine struct {
	Backend     backend.Backend
	LockPath    string
	LockTimeout time.Duration
	// OnTakeover is told about every claim removed for a new attachment.
	OnTakeover func(backend.Takeover)
	// Judge gathers the evidence that decides whether a conflicting owner is alive
	// (conflictPolicy takeover) and keeps portguard's records of its attachments
	// (Judge.Records). nil judges nobody: every conflicting owner counts as stale and no
	// record is kept (portguardctl, tests of the planner's mechanics).
	Judge *liveness.Judge
	// Sandbox is where the attachment ADD installs lives (CNI_NETNS, CNI_IFNAME); ADD
	// records it, with the pod addresses, before its rules go in.
	Sandbox liveness.Record
}

// New returns an engine over the iptables backend running the real iptables binaries.
func New(lockTimeout time.Duration) *Engine {
	return NewWith(iptbackend.NewExec(lockTimeout), lockTimeout)
}

// NewWith returns an engine over backend b, with the host-wide lock at its default path
// (lock.Path) waited for up to lockTimeout.
func NewWith(b backend.Backend, lockTimeout time.Duration) *Engine {
	return &Engine{Backend: b, LockPath: lock.Path(), LockTimeout: lockTimeout}
}

// lock takes the host-wide lock in mode and hands it to the backend; a lock not had in
// time is CNI error 11, which a runtime may retry.
func (e *Engine) lock(mode lock.Mode) (*lock.Lock, error) {
	l, err := lock.Acquire(e.LockPath, mode, e.LockTimeout)
	if err != nil {
		return nil, types.NewError(types.ErrTryAgainLater, err.Error(), "")
	}
	e.Backend.HandOver(l)
	return l, nil
}

// cniError gives the errors a runtime may retry their CNI code (a lock held too long), and
// a port held by a claim the backend cannot take over the code of a port in use.
func cniError(err error) error {
	var ce *types.Error
	if err == nil || errors.As(err, &ce) {
		return err
	}
	if errors.Is(err, backend.ErrBusy) {
		return types.NewError(types.ErrTryAgainLater, err.Error(), "")
	}
	if errors.Is(err, backend.ErrInUse) {
		return types.NewError(ErrHostPortInUse, err.Error(), "remove the other claim with the tool that wrote it")
	}
	return err
}

// claimed lists the families the attachment claims host ports in (those the pod has an
// address in and some mapping applies to) and numbers its claims, one lock byte each: the
// family, protocol and port; not the host IP, so overlapping claims always share a key.
func claimed(c *config.Config) (fams []hostport.Family, keys []int64) {
	proto := map[string]int64{"tcp": 0, "udp": 1, "sctp": 2}
	for _, f := range hostport.Families {
		if _, ok := c.PodIPs[f]; !ok {
			continue
		}
		cs := c.Claims(f)
		if len(cs) == 0 {
			continue
		}
		fams = append(fams, f)
		fam := int64(0)
		if f == hostport.V6 {
			fam = 1
		}
		for _, cl := range cs {
			keys = append(keys, (fam*3+proto[cl.Proto])*65536+int64(cl.HostPort))
		}
	}
	return fams, keys
}

// Add installs the attachment in every family the pod has an address in (Backend.Add). A
// conflict is decided by the policy before anything is applied (decide), in every family
// the backend plans, so a refused conflict in one family leaves the other untouched too.
//
// ADDs of different host ports run in parallel: each holds the shared lock plus an
// exclusive lock on each host port it claims, so the reads, plans and writes of two ADDs
// on one port never interleave. The writes that need the node to themselves are done under
// the exclusive lock, as are GC and repair. An ADD whose backend finds it needs the
// exclusive lock upgrades to it and keeps its port locks meanwhile, also when it has
// already applied one family: no other ADD of its ports sees half of it.
func (e *Engine) Add(c *config.Config, owner hostport.Owner) (_ []backend.Takeover, err error) {
	defer func() { err = cniError(err) }()
	fams, keys := claimed(c)
	if len(fams) == 0 {
		return nil, nil
	}
	l, err := e.lock(lock.Shared)
	if err != nil {
		return nil, err
	}
	defer l.Release()
	defer e.Backend.Close() // before the lock goes
	if err := l.Ports(keys, e.LockTimeout); err != nil {
		return nil, types.NewError(types.ErrTryAgainLater, err.Error(), "")
	}
	h := backend.Hooks{
		Decide:  func(ts []backend.Takeover, cs []backend.Conflict) error { return e.decide(ts, cs, c.Policy) },
		Record:  func() error { return e.record(c, owner, fams) },
		Applied: e.applied,
	}
	t, err := e.Backend.Add(c, owner, true, h)
	if !errors.Is(err, backend.ErrNeedExclusive) {
		return t, err
	}
	e.Backend.Close() // nothing of this call may still be at work in the kernel meanwhile
	if err := l.Upgrade(e.LockTimeout); err != nil {
		return t, types.NewError(types.ErrTryAgainLater, err.Error(), "")
	}
	more, err := e.Backend.Add(c, owner, false, h)
	return append(t, more...), err
}

// Del removes the attachment (Backend.Del): what needs no read under the shared lock, so
// a node drain's DELs go in parallel, the rest under the exclusive lock. Its record goes
// once its rules are gone.
func (e *Engine) Del(c *config.Config, owner hostport.Owner) (err error) {
	defer func() { err = cniError(err) }()
	l, err := e.lock(lock.Shared)
	if err != nil {
		return err
	}
	defer e.Backend.Close()
	rest, err := e.Backend.Del(c, owner)
	e.Backend.Close()
	if len(rest) == 0 && (err == nil || errors.Is(err, backend.ErrUnusable)) {
		e.forget(owner)
	}
	l.Release()
	if len(rest) == 0 {
		return err
	}
	l, lerr := e.lock(lock.Exclusive)
	if lerr != nil {
		return lerr
	}
	defer l.Release()
	err2 := e.Backend.DelRest(owner, rest)
	if err == nil && err2 == nil {
		e.forget(owner) // still under the exclusive lock
	}
	return errors.Join(err, err2)
}

// Check validates the attachment (Backend.Check), without a lock: it changes nothing.
func (e *Engine) Check(c *config.Config, owner hostport.Owner) (err error) {
	defer func() { err = cniError(err) }()
	defer e.Backend.Close()
	problems, err := e.Backend.Check(c, owner)
	if err != nil {
		return err
	}
	if len(problems) > 0 {
		return fmt.Errorf("CHECK of %s failed: %s", owner, strings.Join(problems, "; "))
	}
	return nil
}

// GC removes, under the exclusive lock, this network's attachments whose container IDs
// are not in valid (Backend.GC), and the records of such attachments, claims or not; cached
// are owners known from elsewhere (the runtime's cache, portguard's records). It goes on
// past errors and reports them all, with the owners removed.
func (e *Engine) GC(network string, valid map[string]bool, cached []hostport.Owner) (_ []hostport.Owner, err error) {
	defer func() { err = cniError(err) }()
	l, err := e.lock(lock.Exclusive)
	if err != nil {
		return nil, err
	}
	defer l.Release()
	defer e.Backend.Close()
	removed, err := e.Backend.GC(network, valid, cached)
	for _, o := range removed {
		e.forget(o)
	}
	for _, o := range cached {
		if o.Network == network && !valid[o.ContainerID] {
			e.forget(o)
		}
	}
	return removed, err
}

// Collect removes the attachments of owners through the backend's GC (the same code path
// as the CNI GC verb), under the exclusive lock, for a caller that has decided they are
// dead (the node agent). Backend.GC removes a network's attachments whose container IDs
// are not valid; present(network) lists, read under that lock, the container IDs the
// backend holds claims of in network, and every one of them but the owners' is valid: an
// attachment added since the caller decided stays. The records of the owners go with
// their rules. It returns the owners removed; err joins every network's error.
func (e *Engine) Collect(owners []hostport.Owner, present func(network string) (map[string]bool, error)) (_ []hostport.Owner, err error) {
	defer func() { err = cniError(err) }()
	if len(owners) == 0 {
		return nil, nil
	}
	l, err := e.lock(lock.Exclusive)
	if err != nil {
		return nil, err
	}
	defer l.Release()
	defer e.Backend.Close()
	byNet := map[string][]hostport.Owner{}
	var nets []string
	for _, o := range owners {
		if byNet[o.Network] == nil {
			nets = append(nets, o.Network)
		}
		byNet[o.Network] = append(byNet[o.Network], o)
	}
	var removed []hostport.Owner
	var errs []error
	for _, n := range nets {
		valid, err := present(n)
		if err != nil {
			errs = append(errs, fmt.Errorf("network %s: %w", n, err))
			continue
		}
		for _, o := range byNet[n] {
			delete(valid, o.ContainerID)
		}
		gone, err := e.Backend.GC(n, valid, byNet[n])
		removed = append(removed, gone...)
		if err != nil {
			errs = append(errs, fmt.Errorf("network %s: %w", n, err))
			continue
		}
		for _, o := range byNet[n] {
			e.forget(o)
		}
	}
	for _, o := range removed {
		e.forget(o)
	}
	return removed, errors.Join(errs...)
}

// Status reports whether the backend can work on this node (CNI code 50 when it cannot),
// without taking any lock.
func (e *Engine) Status() error {
	if err := e.Backend.Status(); err != nil {
		return types.NewError(types.ErrPluginNotAvailable, err.Error(), "")
	}
	return nil
}
