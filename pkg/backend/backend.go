// Package backend is the seam between the engine and the firewall backends: the verbs a
// backend runs, the hooks through which the engine's decisions reach a backend's ADD, and
// the event vocabulary (Takeover, Conflict) both sides share.
//
// The engine holds the host-wide lock, applies the conflict policy, judges whether an
// owner is alive, keeps portguard's records and turns errors into CNI codes; a backend
// observes, plans and applies in its own terms and reports claims in this vocabulary.
package backend

import (
	"errors"
	"fmt"

	"github.com/portguard/portguard/pkg/config"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/lock"
)

// Backend runs the verbs against one firewall. A Backend serves one verb at a time (the
// plugin makes one call per process) and is called with the lock the engine holds for
// that verb (see each method).
type Backend interface {
	// Add installs the attachment in every family c gives the pod an address in and some
	// mapping applies to, or in none: every family is planned, and decided through
	// h.Decide, before any is applied. parallel says the engine holds the shared lock plus
	// an exclusive lock on each claimed port; a plan that needs the node to itself then
	// ends the call with ErrNeedExclusive (after the families already applied, whose
	// takeovers are returned), and the engine calls Add again under the exclusive lock.
	// It returns the takeovers applied, in order.
	Add(c *config.Config, owner hostport.Owner, parallel bool, h Hooks) ([]Takeover, error)
	// Del removes what it can of the attachment under the shared lock, touching only the
	// attachment's own rules, and returns the families whose removal needs the exclusive
	// lock (to read and plan); err joins the families' errors.
	Del(c *config.Config, owner hostport.Owner) (rest []hostport.Family, err error)
	// DelRest finishes Del under the exclusive lock for the families Del returned.
	DelRest(owner hostport.Owner, rest []hostport.Family) error
	// Check validates the attachment (shared lock or none; it changes nothing): problems
	// names what is wrong, err says the check itself could not be made.
	Check(c *config.Config, owner hostport.Owner) (problems []string, err error)
	// GC removes network's attachments whose container IDs are not in valid, plus those
	// of suspects (owners known from elsewhere, e.g. the runtime's cache) that the
	// firewall still holds something of; under the exclusive lock. It goes on past errors
	// and returns the owners removed and every error.
	GC(network string, valid map[string]bool, suspects []hostport.Owner) (removed []hostport.Owner, err error)
	// Status says whether the backend can work on this node, without a lock or a read of
	// the rules.
	Status() error
	// Close releases what the verb opened (netlink sockets). The engine calls it before
	// it releases or upgrades the lock: a call must not look finished while the kernel is
	// still at work for it.
	Close()
	// HandOver gives the backend the lock the engine took, for backends whose child
	// processes must hold it until their work has landed even if the caller is killed.
	HandOver(l *lock.Lock)
}

// Hooks carry the engine's decisions into a backend's Add at fixed points. A nil hook does
// nothing (tests of a backend's mechanics).
type Hooks struct {
	// Decide is called with a family's takeovers and conflicts before anything is applied,
	// and again after every replan. It fills in each takeover's Evidence; an error refuses
	// the ADD and is returned by Add as it is.
	Decide func(takeovers []Takeover, conflicts []Conflict) error
	// Record is called once before the first write of the call; an error ends the call.
	Record func() error
	// Applied is told about every takeover once it is applied.
	Applied func(Takeover)
}

// CallDecide runs h.Decide, if set.
func (h Hooks) CallDecide(ts []Takeover, cs []Conflict) error {
	if h.Decide == nil {
		return nil
	}
	return h.Decide(ts, cs)
}

// CallRecord runs h.Record, if set.
func (h Hooks) CallRecord() error {
	if h.Record == nil {
		return nil
	}
	return h.Record()
}

// CallApplied runs h.Applied, if set.
func (h Hooks) CallApplied(t Takeover) {
	if h.Applied != nil {
		h.Applied(t)
	}
}

// ErrNeedExclusive is Add's answer when its plan must be applied under the exclusive lock.
var ErrNeedExclusive = errors.New("the plan must be applied under the exclusive lock")

// ErrBusy marks an error a runtime may retry: another process held the firewall (e.g. the
// xtables lock) too long. The engine maps it to CNI code 11 (try again later).
var ErrBusy = errors.New("the firewall is busy")

// ErrInUse marks an ADD refused because a claim on one of its ports cannot be taken over
// by this backend whatever its owner's state (e.g. an iptables-legacy rule seen by the
// nftables backend, which can only delete nf_tables rules). The engine maps it to the
// code of a port in use.
var ErrInUse = errors.New("host port held by a claim this backend cannot take over")

// ErrUnusable marks Del's and DelRest's error when no family of the backend is usable on
// this node.
var ErrUnusable = errors.New("no family of the backend is usable")

// Busy wraps err, keeping its text, so that it is also ErrBusy; nil stays nil.
func Busy(err error) error { return Mark(err, ErrBusy) }

// Mark wraps err, keeping its text and its chain, so that errors.Is(result, kind) holds
// too; nil stays nil.
func Mark(err, kind error) error {
	if err == nil {
		return nil
	}
	return marked{err, kind}
}

type marked struct{ err, kind error }

func (m marked) Error() string        { return m.err.Error() }
func (m marked) Unwrap() error        { return m.err }
func (m marked) Is(target error) bool { return target == m.kind }

// Takeover records one other owner's claims removed so a new attachment can have its port.
type Takeover struct {
	Family       string           `json:"family"`
	From         hostport.Owner   `json:"from"`
	Chain        string           `json:"chain"`
	Claims       []hostport.Claim `json:"claims"`
	Destinations []string         `json:"destinations"`
	ChainRemoved bool             `json:"chainRemoved"`
	For          hostport.Owner   `json:"for"`
	// Evidence is why the victim was judged stale (or, under conflictPolicy force, what
	// was known of it); nil when nobody judged it.
	Evidence *liveness.Evidence `json:"evidence,omitempty"`
}

// Conflict is another owner's mapping that overlaps a wanted claim.
type Conflict struct {
	Owner hostport.Owner
	Chain string
	Claim hostport.Claim
	Dest  string
}

func (c Conflict) String() string {
	return fmt.Sprintf("%s held by %s (-> %s)", c.Claim, c.OwnerName(), c.Dest)
}

// OwnerName names the holder: its owner, or its chain when the owner is unknown.
func (c Conflict) OwnerName() string {
	if c.Owner.IsZero() {
		return "chain " + c.Chain
	}
	return c.Owner.String()
}
