// Package iptbackend is the iptables backend: under the lock the engine holds it observes
// what a verb needs (pkg/state), plans (pkg/plan), and applies one iptables-restore payload
// per family, reading more and planning again when the table turned out different from
// what it assumed. On iptables-nft the hot paths read and delete over nf_tables netlink
// in-process (pkg/nft); iptables stays the only writer of rules.
//
// The package lives in pkg/backend/iptables but is named iptbackend: it works with
// pkg/iptables (rules, transactions, the runner) on nearly every line, and a second
// package named iptables would force an alias on both it and its importers.
package iptbackend

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/portguard/portguard/pkg/backend"
	"github.com/portguard/portguard/pkg/config"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/lock"
	"github.com/portguard/portguard/pkg/nft"
	"github.com/portguard/portguard/pkg/plan"
	"github.com/portguard/portguard/pkg/state"
)

// Backend runs the verbs with iptables (backend.Backend). It serves one verb at a time.
type Backend struct {
	Runner iptables.Runner
	// Netlink lets the hot paths read and delete over nf_tables netlink in-process where
	// the node's iptables is the nf_tables backend (see pkg/nft); iptables stays the
	// only writer of rules.
	Netlink bool
	nl      *nft.Conn // opened on first use, closed by Close
	// delUsable counts the families Del and DelRest found iptables usable in.
	delUsable int
}

var _ backend.Backend = (*Backend)(nil)

// New returns a backend over runner r, using netlink unless PORTGUARD_NETLINK=off.
func New(r iptables.Runner) *Backend {
	return &Backend{Runner: r, Netlink: os.Getenv("PORTGUARD_NETLINK") != "off"}
}

// NewExec returns a backend that runs the real iptables binaries, waiting up to
// lockTimeout (whole seconds) for the xtables lock.
func NewExec(lockTimeout time.Duration) *Backend {
	return New(&iptables.Exec{WaitSeconds: int(lockTimeout / time.Second)})
}

// conn returns the backend's netlink socket for family f, or nil when f must use iptables.
func (b *Backend) conn(f hostport.Family) *nft.Conn {
	if !b.netlinkFor(f) {
		return nil
	}
	if b.nl == nil {
		b.nl, _ = nft.Open()
	}
	return b.nl
}

// Close closes the netlink socket. The engine calls it before releasing the lock: after a
// commit that deleted rules the kernel holds the close for an RCU grace period, and a call
// must not look finished (its lock free) while it is still at work in nf_tables.
func (b *Backend) Close() {
	if b.nl != nil {
		b.nl.Close()
		b.nl = nil
	}
}

// reader is the runner for reads of family f: CNI-HOSTPORT-DNAT over netlink where
// possible (nft.Reader), everything else by iptables.
func (b *Backend) reader(f hostport.Family) iptables.Runner {
	if c := b.conn(f); c != nil {
		return &nft.Reader{Runner: b.Runner, Conn: c}
	}
	return b.Runner
}

// netlinkFor tells whether family f may take the in-process nf_tables paths: only with
// the real iptables runner working in this process's own network namespace, on nft.
func (b *Backend) netlinkFor(f hostport.Family) bool {
	x, ok := b.Runner.(*iptables.Exec)
	if !b.Netlink || !ok || len(x.Prefix) > 0 {
		return false
	}
	list, err1 := x.Path(f, "tables")
	restore, err2 := x.Path(f, "tables-restore")
	return err1 == nil && err2 == nil && nft.Usable(f, list, restore)
}

// HandOver hands the lock to every iptables child the runner starts (Hold).
func (b *Backend) HandOver(l *lock.Lock) { handOver(b.Runner, l) }

// Hold takes the host-wide lock at path in mode, waiting up to timeout (errors as
// lock.Acquire), and hands it to every iptables child r starts (when r runs the real
// binaries), so that a child outliving a killed caller keeps the lock until its payload
// has landed. portguardctl repair takes the lock through here; the engine takes it itself
// and hands it to the backend (HandOver), which hands it on the same way.
func Hold(r iptables.Runner, path string, mode lock.Mode, timeout time.Duration) (*lock.Lock, error) {
	l, err := lock.Acquire(path, mode, timeout)
	if err != nil {
		return nil, err
	}
	handOver(r, l)
	return l, nil
}

func handOver(r iptables.Runner, l *lock.Lock) {
	if x, ok := r.(*iptables.Exec); ok {
		x.Inherit = []*os.File{l.File()}
	}
}

// maxReplans bounds the read-more-and-plan-again loop (each round reads new chains only).
const maxReplans = 4

// planWith runs a planner until it needs nothing more.
func planWith(r iptables.Runner, s *state.State, planner func(*state.State) plan.Result) (plan.Result, error) {
	for i := 0; ; i++ {
		res := planner(s)
		if len(res.Need) == 0 {
			return res, nil
		}
		if i == maxReplans {
			return res, fmt.Errorf("planning did not settle after reading %v", res.Need)
		}
		if err := s.Read(r, res.Need...); err != nil {
			return res, err
		}
	}
}

// Apply renders and applies a transaction; a refused payload is explained by the failing
// line's purpose.
func Apply(r iptables.Runner, f hostport.Family, tx *iptables.Tx) error {
	if tx.Empty() {
		return nil
	}
	payload, err := tx.Render()
	if err != nil {
		return err
	}
	err = r.Restore(f, payload)
	var re *iptables.RestoreError
	if errors.As(err, &re) {
		if why := tx.Explain(re.Line); why != "" {
			return fmt.Errorf("%w (%s)", re, why)
		}
	}
	return err
}

// podDesired is what the attachment wants in each family the pod has an address in and
// some mapping applies to; ADD installs it and CHECK validates it.
func podDesired(c *config.Config, owner hostport.Owner) []plan.Desired {
	var out []plan.Desired
	for _, f := range hostport.Families {
		ip, ok := c.PodIPs[f]
		if !ok {
			continue
		}
		if d := plan.DesiredFor(c, owner, f, ip); len(d.Mappings) > 0 {
			out = append(out, d)
		}
	}
	return out
}

// busy marks an error of a lock iptables did not get in time as backend.ErrBusy.
func busy(err error) error {
	if errors.Is(err, iptables.ErrXtablesLock) && !errors.Is(err, backend.ErrBusy) {
		return backend.Busy(err)
	}
	return err
}
