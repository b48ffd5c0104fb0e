// Package agent is the node agent's pass: audit every backend's claims, judge their owners
// (pkg/liveness), ask the container runtime which pod sandboxes exist (pkg/cri), and remove
// through the plugin's own GC code path (engine.Collect → Backend.GC, under the host-wide
// lock) the claims nobody will ever remove otherwise:
//
//   - sandbox-gone: the claim's container ID is not a sandbox the runtime knows, in two
//     passes at least one interval apart, and its owner is stale by the liveness evidence
//     (unknown counts as alive, as it does for ADD's takeover);
//   - address-reused: the claim's owner is not alive and the address it forwards to now
//     belongs to another, live attachment (plan.ReusedBy, the audit's decision).
//
// A runtime that does not answer means no removal at all in that pass, and the two-pass
// memory is left as it was. The package decides and reports; cmd/portguard-agent runs the
// loop, serves /metrics and /healthz, and tails the plugin's log.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sort"
	"strings"
	"time"

	"github.com/portguard/portguard/pkg/eventlog"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/metrics"
	"github.com/portguard/portguard/pkg/plan"
)

// Removal reasons: the values of the removed event's reason and of the removals counter's
// reason label.
const (
	ReasonSandboxGone   = "sandbox-gone"
	ReasonAddressReused = "address-reused"
)

// Claim is one host-port claim as a backend holds it, with its owner's verdict.
type Claim struct {
	Backend  string // metrics.BackendIPTables or metrics.BackendNFTables
	Claim    hostport.Claim
	Owner    hostport.Owner // zero: no owner known (a foreign chain): never removed
	Dest     netip.AddrPort // invalid when the claim forwards nowhere
	Evidence liveness.Evidence
}

func (c Claim) String() string { return fmt.Sprintf("%s -> %s", c.Claim, c.Dest) }

// Source is one backend's view of the node.
type Source interface {
	// Name is the backend's name (the backend label).
	Name() string
	// Observe reads every claim the backend holds and judges its owner with j, and
	// returns the backend's family audits (the metrics' gauges); earlier are the audits of
	// the sources observed before it in this pass (the nftables audit reports ports split
	// with iptables). A backend not usable on this node returns no claim and unavailable
	// audits (or none), not an error. Only claims the backend's GC can remove are returned.
	Observe(j *liveness.Judge, earlier []plan.FamilyAudit) ([]Claim, []plan.FamilyAudit, error)
	// Collect removes the owners' attachments from this backend through the plugin's GC
	// code path under the host-wide lock (engine.Collect), returning those removed.
	Collect(owners []hostport.Owner) ([]hostport.Owner, error)
}

// Runtime lists the pod sandboxes the container runtime knows (pkg/cri.Client).
type Runtime interface {
	Sandboxes(ctx context.Context) (map[string]bool, error)
}

// Agent holds what lasts between passes. Its fields are set before the first Pass; Pass
// must not be called concurrently.
type Agent struct {
	Sources  []Source
	Runtime  Runtime
	Interval time.Duration // the pass interval: the least time between the two sightings
	DryRun   bool          // report what would be removed, remove nothing
	// RuntimeTimeout bounds one ListPodSandbox call (default 10 s).
	RuntimeTimeout time.Duration
	// NewJudge makes the judge of one pass (liveness.New with the extra cache dir).
	NewJudge func() *liveness.Judge
	Log      *slog.Logger
	Metrics  *Metrics // nil: no metrics

	// absent is the two-pass memory: each owner whose container ID the runtime did not
	// list, with when it was first seen so (the start of that pass).
	absent map[hostport.Owner]time.Time
}

// Result is what one pass saw and did.
type Result struct {
	Claims      int
	Owners      int
	RuntimeUp   bool
	Sandboxes   int
	Suspects    int // owners with claims whose container ID the runtime does not list (the two-pass memory)
	Removed     map[string]int
	WouldRemove map[string]int // dry run: what would have been removed, by reason
	Errors      int
}

// candidate is one owner in one backend the pass decided to remove.
type candidate struct {
	src      Source
	owner    hostport.Owner
	reason   string
	claims   []Claim
	reusedBy *hostport.Owner
	holderEv *liveness.Evidence
}

func (a *Agent) logger() *slog.Logger {
	if a.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return a.Log
}

func (a *Agent) event(level slog.Level, name string, attrs ...slog.Attr) {
	eventlog.Event(a.logger(), level, name, attrs...)
}

func (a *Agent) fail(kind string, err error) {
	a.event(slog.LevelError, "error", slog.String("kind", kind), slog.String("error", err.Error()))
	if a.Metrics != nil {
		a.Metrics.Errors.WithLabelValues(kind).Inc()
	}
}

// Pass runs one pass started at now; it returns an error when the pass did not complete
// (a backend could not be read, a removal failed). A runtime that does not answer is no
// error: the pass completes and removes nothing.
func (a *Agent) Pass(ctx context.Context, now time.Time) (Result, error) {
	start := time.Now()
	res := Result{Removed: map[string]int{}, WouldRemove: map[string]int{}}
	var errs []error
	defer func() {
		res.Errors = len(errs)
		if a.Metrics != nil {
			a.Metrics.PassDuration.Observe(time.Since(start).Seconds())
		}
	}()

	newJudge := a.NewJudge
	if newJudge == nil {
		newJudge = func() *liveness.Judge { return liveness.New() }
	}
	j := newJudge()
	type observed struct {
		src    Source
		claims []Claim
	}
	var obs []observed
	var audits []plan.FamilyAudit
	for _, s := range a.Sources {
		cs, as, err := s.Observe(j, audits)
		audits = append(audits, as...)
		if err != nil {
			err = fmt.Errorf("%s: %w", s.Name(), err)
			a.fail("observe", err)
			errs = append(errs, err)
			continue
		}
		obs = append(obs, observed{s, cs})
		res.Claims += len(cs)
	}
	if a.Metrics != nil {
		a.Metrics.Audit.Set(metrics.FromFamilies(audits), now)
	}

	owners := map[hostport.Owner]bool{}
	for _, o := range obs {
		for _, c := range o.claims {
			if !c.Owner.IsZero() {
				owners[c.Owner] = true
			}
		}
	}
	res.Owners = len(owners)

	timeout := a.RuntimeTimeout
	if timeout == 0 {
		timeout = 10 * time.Second
	}
	rctx, cancel := context.WithTimeout(ctx, timeout)
	sandboxes, rerr := a.Runtime.Sandboxes(rctx)
	cancel()
	if a.Metrics != nil {
		a.Metrics.RuntimeUp.Set(b2f(rerr == nil))
	}
	if rerr != nil {
		// No removal at all, and the memory stays as it was: a runtime that lists nothing
		// because it is restarting must not count as a sighting of every pod gone.
		a.event(slog.LevelWarn, "runtime-unavailable", slog.String("error", rerr.Error()))
		if a.Metrics != nil {
			a.Metrics.Errors.WithLabelValues("runtime").Inc()
		}
		a.passEvent(res, now, start)
		return res, errors.Join(errs...)
	}
	res.RuntimeUp, res.Sandboxes = true, len(sandboxes)

	// The two-pass memory, only when every backend was read: an owner missing from an
	// unread backend is not gone from the node.
	if len(errs) == 0 {
		if a.absent == nil {
			a.absent = map[hostport.Owner]time.Time{}
		}
		for o := range a.absent {
			if !owners[o] || sandboxes[o.ContainerID] {
				delete(a.absent, o)
			}
		}
		for o := range owners {
			if _, ok := a.absent[o]; !ok && !sandboxes[o.ContainerID] {
				a.absent[o] = now
			}
		}
	}

	var cands []candidate
	for _, o := range obs {
		cands = append(cands, a.decide(o.src, o.claims, j, sandboxes, now)...)
	}
	res.Suspects = len(a.absent)
	if a.Metrics != nil {
		a.Metrics.Sandboxes.Set(float64(len(sandboxes)))
		a.Metrics.Suspects.Set(float64(res.Suspects))
	}

	// One removal per backend for all its candidates: one exclusive lock and one read of the
	// backend per network, not one per owner (a node after a crash may have hundreds).
	bySource := map[Source][]candidate{}
	var srcs []Source
	for _, c := range cands {
		if a.DryRun {
			res.WouldRemove[c.reason]++
			a.event(slog.LevelInfo, "would-remove", removalAttrs(c)...)
			continue
		}
		if bySource[c.src] == nil {
			srcs = append(srcs, c.src)
		}
		bySource[c.src] = append(bySource[c.src], c)
	}
	for _, src := range srcs {
		cs := bySource[src]
		owners := make([]hostport.Owner, len(cs))
		for i, c := range cs {
			owners[i] = c.owner
		}
		gone, err := src.Collect(owners)
		if err != nil {
			err = fmt.Errorf("%s: remove: %w", src.Name(), err)
			a.fail("remove", err)
			errs = append(errs, err)
		}
		removed := map[hostport.Owner]bool{}
		for _, g := range gone {
			removed[g] = true
		}
		for _, c := range cs {
			if !removed[c.owner] {
				continue
			}
			res.Removed[c.reason]++
			if a.Metrics != nil {
				a.Metrics.Removals.WithLabelValues(c.reason).Inc()
			}
			a.event(slog.LevelInfo, "removed", removalAttrs(c)...)
			delete(a.absent, c.owner)
		}
	}
	a.passEvent(res, now, start)
	return res, errors.Join(errs...)
}

// decide picks, among one backend's claims, the owners to remove (one candidate per owner).
func (a *Agent) decide(src Source, claims []Claim, j *liveness.Judge, sandboxes map[string]bool, now time.Time) []candidate {
	byOwner := map[hostport.Owner]*candidate{}
	var order []hostport.Owner
	for _, c := range claims {
		if c.Owner.IsZero() {
			continue
		}
		cd := byOwner[c.Owner]
		if cd == nil {
			cd = &candidate{src: src, owner: c.Owner}
			byOwner[c.Owner] = cd
			order = append(order, c.Owner)
		}
		cd.claims = append(cd.claims, c)
		if cd.reason == ReasonAddressReused || c.Evidence.State == liveness.Alive {
			continue
		}
		if h, hev, ok := plan.ReusedBy(j, c.Owner, c.Dest.Addr(), c.Evidence); ok {
			cd.reason, cd.reusedBy, cd.holderEv = ReasonAddressReused, &h, &hev
		}
	}
	var out []candidate
	for _, o := range order {
		cd := byOwner[o]
		// Collect removes every claim of the owner in this backend, so one claim judged
		// alive or unjudgeable (the verdict is per destination) vetoes either reason.
		if !allStale(cd.claims) {
			continue
		}
		if cd.reason == "" && a.sandboxGone(o, sandboxes, now) {
			cd.reason = ReasonSandboxGone
		}
		if cd.reason != "" {
			out = append(out, *cd)
		}
	}
	return out
}

// sandboxGone: the runtime did not list o's container ID now, nor in a pass at least one
// interval earlier.
func (a *Agent) sandboxGone(o hostport.Owner, sandboxes map[string]bool, now time.Time) bool {
	if sandboxes[o.ContainerID] {
		return false
	}
	first, ok := a.absent[o]
	return ok && now.Sub(first) >= a.Interval
}

// allStale: every claim's owner verdict is stale (the verdict may differ per destination).
func allStale(cs []Claim) bool {
	for _, c := range cs {
		if c.Evidence.State != liveness.Stale {
			return false
		}
	}
	return len(cs) > 0
}

func removalAttrs(c candidate) []slog.Attr {
	fams := map[string]bool{}
	var claims []string
	for _, cl := range c.claims {
		fams[cl.Claim.Family.String()] = true
		claims = append(claims, cl.String())
	}
	var fl []string
	for f := range fams {
		fl = append(fl, f)
	}
	sort.Strings(fl)
	attrs := []slog.Attr{
		slog.Any("owner", c.owner),
		slog.String("backend", c.src.Name()),
		slog.String("family", strings.Join(fl, ",")),
		slog.Any("claims", claims),
		slog.String("reason", c.reason),
		slog.Any("evidence", c.claims[0].Evidence),
	}
	if c.reusedBy != nil {
		attrs = append(attrs, slog.Any("reusedBy", *c.reusedBy), slog.Any("holderEvidence", *c.holderEv))
	}
	return attrs
}

func (a *Agent) passEvent(res Result, now, start time.Time) {
	a.event(slog.LevelInfo, "pass",
		slog.Int("claims", res.Claims), slog.Int("owners", res.Owners),
		slog.Bool("runtimeUp", res.RuntimeUp), slog.Int("sandboxes", res.Sandboxes),
		slog.Int("suspects", res.Suspects), slog.Any("removed", res.Removed),
		slog.Bool("dryRun", a.DryRun), slog.Any("wouldRemove", res.WouldRemove),
		slog.Int("errors", res.Errors), slog.Float64("seconds", time.Since(start).Seconds()))
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
