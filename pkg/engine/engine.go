// Package engine runs the verbs against the kernel: under the host-wide lock it observes
// what a verb needs, plans, and applies one iptables-restore payload per family, reading
// more and planning again when the table turned out different from what it assumed.
package engine

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/portguard/portguard/pkg/config"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/lock"
	"github.com/portguard/portguard/pkg/nft"
	"github.com/portguard/portguard/pkg/plan"
	"github.com/portguard/portguard/pkg/state"
)

// Engine carries what every verb needs. It serves one verb at a time (the plugin makes one
// call per process).
type Engine struct {
	Runner      iptables.Runner
	LockPath    string
	LockTimeout time.Duration
	// OnTakeover is told about every claim removed for a new attachment.
	OnTakeover func(plan.Takeover)
	// Netlink lets the hot paths read and delete over nf_tables netlink in-process where
	// the node's iptables is the nf_tables backend (see pkg/nft); iptables stays the
	// only writer of rules.
	Netlink bool
	nl      *nft.Conn // opened on first use, closed by closeNetlink
	// Judge gathers the evidence that decides whether a conflicting owner is alive
	// (conflictPolicy takeover) and keeps portguard's records of its attachments
	// (Judge.Records). nil judges nobody: every conflicting owner counts as stale and no
	// record is kept (portguardctl, tests of the planner's mechanics).
	Judge *liveness.Judge
	// Sandbox is where the attachment ADD installs lives (CNI_NETNS, CNI_IFNAME); ADD
	// records it, with the pod addresses, before its rules go in.
	Sandbox liveness.Record
}

// New returns an engine that runs the real iptables binaries.
func New(lockTimeout time.Duration) *Engine {
	return &Engine{
		Runner:      &iptables.Exec{WaitSeconds: int(lockTimeout / time.Second)},
		LockPath:    lock.Path(),
		LockTimeout: lockTimeout,
		Netlink:     os.Getenv("PORTGUARD_NETLINK") != "off",
	}
}

// conn returns the engine's netlink socket for family f, or nil when f must use iptables.
func (e *Engine) conn(f hostport.Family) *nft.Conn {
	if !e.netlinkFor(f) {
		return nil
	}
	if e.nl == nil {
		e.nl, _ = nft.Open()
	}
	return e.nl
}

// closeNetlink closes the socket. Call it before releasing the lock: after a commit that
// deleted rules the kernel holds the close for an RCU grace period, and a call must not
// look finished (its lock free) while it is still at work in nf_tables.
func (e *Engine) closeNetlink() {
	if e.nl != nil {
		e.nl.Close()
		e.nl = nil
	}
}

// reader is the runner for reads of family f: CNI-HOSTPORT-DNAT over netlink where
// possible (nft.Reader), everything else by iptables.
func (e *Engine) reader(f hostport.Family) iptables.Runner {
	if c := e.conn(f); c != nil {
		return &nft.Reader{Runner: e.Runner, Conn: c}
	}
	return e.Runner
}

// netlinkFor tells whether family f may take the in-process nf_tables paths: only with
// the real iptables runner working in this process's own network namespace, on nft.
func (e *Engine) netlinkFor(f hostport.Family) bool {
	x, ok := e.Runner.(*iptables.Exec)
	if !e.Netlink || !ok || len(x.Prefix) > 0 {
		return false
	}
	list, err1 := x.Path(f, "tables")
	restore, err2 := x.Path(f, "tables-restore")
	return err1 == nil && err2 == nil && nft.Usable(f, list, restore)
}

// lock takes the host-wide lock for the engine's runner (Hold); a lock not had in time is
// CNI error 11, which a runtime may retry.
func (e *Engine) lock(mode ...lock.Mode) (*lock.Lock, error) {
	m := lock.Exclusive
	if len(mode) > 0 {
		m = mode[0]
	}
	l, err := Hold(e.Runner, e.LockPath, m, e.LockTimeout)
	if err != nil {
		return nil, types.NewError(types.ErrTryAgainLater, err.Error(), "")
	}
	return l, nil
}

// Hold takes the host-wide lock at path in mode, waiting up to timeout (errors as
// lock.Acquire), and hands it to every iptables child r starts (when r runs the real
// binaries), so that a child outliving a killed caller keeps the lock until its payload
// has landed. Every writer of the nat table (plugin verbs, portguardctl repair) takes the
// lock through here.
func Hold(r iptables.Runner, path string, mode lock.Mode, timeout time.Duration) (*lock.Lock, error) {
	l, err := lock.Acquire(path, mode, timeout)
	if err != nil {
		return nil, err
	}
	if x, ok := r.(*iptables.Exec); ok {
		x.Inherit = []*os.File{l.File()}
	}
	return l, nil
}

// cniError gives the errors a runtime may retry their CNI code: a lock held too long.
func cniError(err error) error {
	var ce *types.Error
	if err == nil || errors.As(err, &ce) {
		return err
	}
	if errors.Is(err, iptables.ErrXtablesLock) {
		return types.NewError(types.ErrTryAgainLater, err.Error(), "")
	}
	return err
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

// Add installs the attachment in every family the pod has an address in. Every family
// is planned before any is applied, so a rejected conflict in one family leaves the other
// untouched too.
//
// ADDs of different host ports run in parallel: each holds the shared lock plus an
// exclusive lock on each host port it claims, so the reads, plans and writes of two ADDs
// on one port never interleave, and ADDs on other ports only meet in the few jumps of a
// victim that held both ports, where the later payload fails whole and is planned again.
// The writes that need the node to themselves (creating or restoring the shared layout, a
// jump rewritten at a position a concurrent writer would shift) are done under the
// exclusive lock, as are GC and repair. An ADD that finds it needs the exclusive lock
// upgrades to it and keeps its port locks meanwhile, also when it has already applied one
// family: no other ADD of its ports sees half of it.
func (e *Engine) Add(c *config.Config, owner hostport.Owner) (_ []plan.Takeover, err error) {
	defer func() { err = cniError(err) }()
	ds := podDesired(c, owner)
	if len(ds) == 0 {
		return nil, nil
	}
	l, err := e.lock(lock.Shared)
	if err != nil {
		return nil, err
	}
	defer l.Release()
	defer e.closeNetlink() // before the lock goes
	if err := l.Ports(portKeys(ds), e.LockTimeout); err != nil {
		return nil, types.NewError(types.ErrTryAgainLater, err.Error(), "")
	}
	t, err := e.add(ds, c.Policy, true)
	if !errors.Is(err, errNeedExclusive) {
		return t, err
	}
	e.closeNetlink() // nothing of this call may still be at work in nf_tables meanwhile
	if err := l.Upgrade(e.LockTimeout); err != nil {
		return t, types.NewError(types.ErrTryAgainLater, err.Error(), "")
	}
	more, err := e.add(ds, c.Policy, false)
	return append(t, more...), err
}

// errNeedExclusive: the plan must write what only an exclusive holder may (see Add).
var errNeedExclusive = errors.New("the plan must be applied under the exclusive lock")

// add plans every family, then applies them, with the lock Add holds: parallel says it is
// the shared one (plus the ports), and then a plan that needs the exclusive lock ends the
// call with errNeedExclusive (after the families already applied, whose takeovers are
// returned).
func (e *Engine) add(ds []plan.Desired, policy string, parallel bool) ([]plan.Takeover, error) {
	var pending []addPlan
	for _, d := range ds {
		p, err := e.planAdd(d, policy)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", d.Family, err)
		}
		if parallel && needsExclusive(p.res) {
			return nil, errNeedExclusive
		}
		if policy == config.PolicyReject && len(p.res.Conflicts) > 0 {
			return nil, rejectError(d, p.res.Conflicts)
		}
		pending = append(pending, p)
	}
	// Every family is judged before any is applied: a live owner in one family leaves the
	// other untouched too.
	for i := range pending {
		if err := e.judgeVictims(&pending[i], policy); err != nil {
			return nil, err
		}
	}
	if err := e.record(ds); err != nil {
		return nil, err
	}
	var all []plan.Takeover
	for _, p := range pending {
		t, err := e.applyAdd(p, policy, parallel)
		all = append(all, t...)
		if err != nil {
			return all, err
		}
	}
	return all, nil
}

// needsExclusive tells a plan that only an exclusive holder may apply.
func needsExclusive(r plan.Result) bool { return r.SharedChanges || r.Positioned }

// portKeys numbers the host ports the attachment claims, one lock byte each: the family,
// protocol and port; not the host IP, so overlapping claims always share a key.
func portKeys(ds []plan.Desired) []int64 {
	proto := map[string]int64{"tcp": 0, "udp": 1, "sctp": 2}
	var keys []int64
	for _, d := range ds {
		fam := int64(0)
		if d.Family == hostport.V6 {
			fam = 1
		}
		for _, c := range d.Claims {
			keys = append(keys, (fam*3+proto[c.Proto])*65536+int64(c.HostPort))
		}
	}
	return keys
}

type addPlan struct {
	d   plan.Desired
	s   *state.State
	res plan.Result
	// taken holds the victims read in part (nft.TakenRules), by chain: the payload leaves
	// their chains alone and RemoveTaken deletes the taken rules by handle after it.
	taken map[string]nft.Taken
}

// planAdd is the hot path's read: CNI-HOSTPORT-DNAT only (plus the chains of claims that
// may conflict); the shared chains are not read but shown over netlink (nft) or asserted
// with -C in the payload. A node without CNI-HOSTPORT-DNAT is new, and then the shared
// chains are read so they can be created.
func (e *Engine) planAdd(d plan.Desired, policy string) (addPlan, error) {
	r := e.reader(d.Family)
	s, err := state.Observe(r, d.Family, state.DNATChain)
	if err != nil {
		return addPlan{}, err
	}
	if !s.DNATExists() {
		if err := s.Read(r, state.SharedChains...); err != nil {
			return addPlan{}, err
		}
	} else {
		// Shown intact, the shared rules need no -C in the payload; those assertions would
		// make iptables-restore fetch all of CNI-HOSTPORT-DNAT again.
		s.SharedShown, _ = e.sharedShown(d)
	}
	p := addPlan{d: d, s: s, taken: map[string]nft.Taken{}}
	tried := map[string]bool{}
	p.res, err = planWith(r, s, func(s *state.State) plan.Result {
		for {
			res := plan.Add(s, d, policy)
			if len(res.Need) == 0 || !e.readTaken(&p, res.Need, tried) {
				return res
			}
		}
	})
	return p, err
}

// readTaken reads in part, over netlink, the big victims among the chains a plan needs:
// only their rules for the ports d claims (nft.TakenRules). It reports whether it read
// any; the others are left to a full read.
func (e *Engine) readTaken(p *addPlan, need []string, tried map[string]bool) bool {
	nl := e.conn(p.d.Family)
	if nl == nil {
		return false
	}
	read := false
	for _, chain := range need {
		a := p.s.Attachments[chain]
		if tried[chain] || a == nil || len(a.Jumps) == 0 {
			continue
		}
		tried[chain] = true
		byProto := map[string][]int{}
		for _, c := range p.d.Claims {
			for _, j := range a.Jumps {
				if j.Proto == c.Proto && j.HasPort(c.HostPort) && !slices.Contains(byProto[c.Proto], c.HostPort) {
					byProto[c.Proto] = append(byProto[c.Proto], c.HostPort)
				}
			}
		}
		var all nft.Taken
		ok := len(byProto) > 0
		for proto, ports := range byProto {
			t, found, err := nl.TakenRules(p.d.Family, chain, proto, ports)
			if err != nil || !found {
				ok = false
				break
			}
			all.Rules = append(all.Rules, t.Rules...)
			if all.Handles == nil {
				all.Handles = map[string]uint64{}
			}
			maps.Copy(all.Handles, t.Handles)
		}
		if ok {
			p.s.ReadPart(chain, all.Rules)
			p.taken[chain] = all
			read = true
		}
	}
	return read
}

// splitTaken takes the operations on victims read in part out of tx, jumps into their
// chains included (iptables-nft would fetch the whole chain for any line naming it), and
// returns them as what nft.TakeFrom does after the payload: the ports to drop from each
// victim's jumps and the handles of its rules to delete.
func splitTaken(tx *iptables.Tx, taken map[string]nft.Taken) (*iptables.Tx, map[string]takeWork) {
	if len(taken) == 0 || tx == nil {
		return tx, nil
	}
	rest := &iptables.Tx{}
	work := map[string]takeWork{}
	type portSet map[string]map[int]bool
	before, after := map[string]portSet{}, map[string]portSet{}
	add := func(m map[string]portSet, chain string, r iptables.Rule) {
		j := state.ParseJump(r)
		if m[chain] == nil {
			m[chain] = portSet{}
		}
		if m[chain][j.Proto] == nil {
			m[chain][j.Proto] = map[int]bool{}
		}
		for _, p := range j.Ports {
			m[chain][j.Proto][p] = true
		}
	}
	for _, op := range tx.Ops {
		r := iptables.Rule{Chain: op.Chain, Args: op.Args}
		chain := op.Chain
		if op.Chain == state.DNATChain {
			chain = r.Target()
		}
		t, ok := taken[chain]
		if !ok {
			rest.Ops = append(rest.Ops, op)
			continue
		}
		w := work[chain]
		switch {
		case op.Chain == state.DNATChain && op.Kind == iptables.Delete:
			add(before, chain, r)
		case op.Chain == state.DNATChain:
			add(after, chain, r)
		case op.Kind == iptables.Delete:
			if h, ok := t.Handles[r.Spec()]; ok {
				w.handles = append(w.handles, h)
			}
		}
		work[chain] = w
	}
	for chain, w := range work {
		w.drop = map[string][]int{}
		for proto, ports := range before[chain] {
			for p := range ports {
				if !after[chain][proto][p] {
					w.drop[proto] = append(w.drop[proto], p)
				}
			}
		}
		work[chain] = w
	}
	return rest, work
}

// takeWork is what nft.TakeFrom does to one victim read in part.
type takeWork struct {
	drop    map[string][]int
	handles []uint64
}

// sharedShown asks the kernel over netlink whether d's shared layout is in place; false
// with a nil error when netlink is not usable for d's family.
func (e *Engine) sharedShown(d plan.Desired) (bool, error) {
	nl := e.conn(d.Family)
	if nl == nil {
		return false, nil
	}
	return nl.SharedLayout(d.Family, d.SNAT && !d.ExternalMark, d.MarkBit)
}

// applyAdd applies a plan; if iptables-restore refuses it (a failed assertion, or another
// writer changed the table), it reads the shared chains too, plans again and retries: once
// under the exclusive lock, a few times beside parallel ADDs of other ports.
func (e *Engine) applyAdd(p addPlan, policy string, parallel bool) ([]plan.Takeover, error) {
	attempts := 2
	if parallel {
		attempts = 5
	}
	var done []plan.Takeover
	for attempt := 1; ; attempt++ {
		if policy == config.PolicyReject && len(p.res.Conflicts) > 0 {
			return done, rejectError(p.d, p.res.Conflicts)
		}
		if parallel && needsExclusive(p.res) {
			return done, errNeedExclusive
		}
		tx, taken := splitTaken(p.res.Tx, p.taken)
		err := Apply(e.Runner, p.d.Family, tx)
		if err == nil && len(taken) > 0 {
			for chain, w := range taken {
				if err = e.conn(p.d.Family).TakeFrom(p.d.Family, chain, w.drop, w.handles); err != nil {
					// The new claim is in and wins; what is left of the victim is
					// unreachable (audit reports it, repair removes it).
					return done, fmt.Errorf("%s: %w", p.d.Family, err)
				}
			}
		}
		if err == nil {
			for _, t := range p.res.Takeovers {
				if e.OnTakeover != nil {
					e.OnTakeover(t)
				}
				e.forgetVictim(t)
			}
			done = append(done, p.res.Takeovers...)
			if !p.s.SharedShown || attempt == attempts {
				return done, nil
			}
			if still, err := e.sharedShown(p.d); still || err != nil {
				return done, nil
			}
			// The shared layout was shown before the payload, in another transaction, and
			// a writer outside portguard's lock removed part of it in between: plan again
			// from a full read, which restores it (under the exclusive lock).
		}
		var re *iptables.RestoreError
		if err != nil && (attempt == attempts || !errors.As(err, &re)) {
			return done, fmt.Errorf("%s: %w", p.d.Family, err)
		}
		p.taken = nil // the replan reads whole chains
		if p.s, err = state.Observe(e.Runner, p.d.Family, append([]string{state.DNATChain}, state.SharedChains...)...); err != nil {
			return done, err
		}
		if p.res, err = planWith(e.Runner, p.s, func(s *state.State) plan.Result { return plan.Add(s, p.d, policy) }); err != nil {
			return done, err
		}
		if err := e.judgeVictims(&p, policy); err != nil {
			return done, err
		}
	}
}

func rejectError(d plan.Desired, cs []plan.Conflict) error {
	var parts []string
	for _, c := range cs {
		parts = append(parts, c.String())
	}
	return types.NewError(ErrHostPortInUse,
		fmt.Sprintf("conflictPolicy reject: host port already claimed: %s", strings.Join(parts, "; ")),
		"remove the other attachment (CNI DEL or portguardctl repair) or use conflictPolicy takeover")
}

// Del removes the attachment from every family; it succeeds when there is nothing to
// remove and when only some families' iptables work.
//
// The common DEL reads nothing: the runtime passes the mappings of the ADD, so the jumps
// and the chain to delete are known, and one payload removes them or fails whole. Such
// payloads only touch the attachment's own rules, so they run under the shared lock: a
// node drain's DELs go in parallel, while ADD, GC and repair (exclusive) never interleave
// with them. Whatever the blind payload could not remove is read and planned under the
// exclusive lock.
func (e *Engine) Del(c *config.Config, owner hostport.Owner) (err error) {
	defer func() { err = cniError(err) }()
	var errs []error
	var slow []hostport.Family
	tried, usable := 0, 0
	l, err := e.lock(lock.Shared)
	if err != nil {
		return err
	}
	defer e.closeNetlink()
	for _, f := range hostport.Families {
		_, hasIP := c.PodIPs[f]
		if c.PrevResult != nil && !hasIP {
			continue // prevResult is the ADD's result: ADD wrote nothing in this family
		}
		tried++
		if nl := e.conn(f); nl != nil {
			if done, _ := nl.RemoveAttachment(f, hostport.ChainName(owner)); done {
				usable++
				continue
			}
		}
		d := plan.DesiredFor(c, owner, f, c.PodIPs[f])
		if len(d.Jumps) == 0 {
			slow = append(slow, f)
			continue
		}
		err := Apply(e.Runner, f, plan.DelBlind(d))
		var re *iptables.RestoreError
		switch {
		case errors.Is(err, iptables.ErrUnavailable):
		case errors.As(err, &re):
			slow = append(slow, f)
		case err != nil:
			usable++
			errs = append(errs, fmt.Errorf("%s: %w", f, err))
		default:
			usable++
		}
	}
	e.closeNetlink()
	if len(slow) == 0 && len(errs) == 0 {
		e.forget(owner)
	}
	l.Release()
	if len(slow) > 0 {
		if l, err = e.lock(); err != nil {
			return err
		}
		defer l.Release()
		for _, f := range slow {
			err := e.delFamily(owner, f)
			if errors.Is(err, iptables.ErrUnavailable) {
				continue
			}
			usable++
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", f, err))
			}
		}
	}
	if tried > 0 && usable == 0 {
		return fmt.Errorf("neither iptables nor ip6tables is usable")
	}
	if len(slow) > 0 && len(errs) == 0 {
		e.forget(owner) // still under the exclusive lock
	}
	return errors.Join(errs...)
}

// delFamily removes what the table shows of the attachment: every jump to its chain, and
// the chain.
func (e *Engine) delFamily(owner hostport.Owner, f hostport.Family) error {
	chain := hostport.ChainName(owner)
	s, err := state.Observe(e.Runner, f, state.DNATChain)
	if err != nil {
		return err
	}
	if !s.DNATExists() {
		return nil
	}
	for attempt := 0; ; attempt++ {
		res, err := planWith(e.Runner, s, func(s *state.State) plan.Result { return plan.Del(s, chain) })
		if err != nil {
			return err
		}
		err = Apply(e.Runner, f, res.Tx)
		var re *iptables.RestoreError
		if err == nil || attempt > 0 || !errors.As(err, &re) {
			return err
		}
		if s, err = state.Observe(e.Runner, f, state.DNATChain, chain); err != nil {
			return err
		}
	}
}

// Check validates the attachment in the families the pod has addresses in.
//
// On iptables-nft a CHECK that finds all in order starts no process: the rules of
// CNI-HOSTPORT-DNAT that can matter (nft.Conn.Excerpt), the attachment's chain and the
// shared layout are read over netlink, and the planner's -C assertions that this read
// answers are dropped. What it does not answer (a rule not found as written, a shape the
// decoder does not know, a shared layout not shown) is asserted by iptables-restore as
// before, and the kernel decides.
func (e *Engine) Check(c *config.Config, owner hostport.Owner) (err error) {
	defer func() { err = cniError(err) }()
	defer e.closeNetlink()
	var problems []string
	for _, d := range podDesired(c, owner) {
		f := d.Family
		s, r, err := e.observeCheck(d)
		if err != nil {
			return err
		}
		res, err := planWith(r, s, func(s *state.State) plan.Result { return plan.Check(s, d) })
		if err != nil {
			return err
		}
		problems = append(problems, res.Problems...)
		tx := unanswered(res.Tx, s, d)
		if tx.Empty() {
			continue
		}
		// The assertions change nothing; the first one that fails names the problem.
		if err := Apply(e.Runner, f, tx); err != nil {
			if errors.Is(err, iptables.ErrXtablesLock) {
				return err
			}
			var re *iptables.RestoreError
			if errors.As(err, &re) && tx.Explain(re.Line) != "" {
				problems = append(problems, tx.Explain(re.Line))
			} else {
				problems = append(problems, fmt.Sprintf("%s: %v", f, err))
			}
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("CHECK of %s failed: %s", owner, strings.Join(problems, "; "))
	}
	return nil
}

// observeCheck reads what CHECK of d decides on, and returns the runner for further
// reads. Over netlink: the excerpt of CNI-HOSTPORT-DNAT (or, when some rule there has a
// shape the decoder does not know, the whole chain through nft.Reader), the attachment's
// chain when the decoder knows its rules, and whether the shared layout is shown.
func (e *Engine) observeCheck(d plan.Desired) (*state.State, iptables.Runner, error) {
	nl := e.conn(d.Family)
	if nl == nil {
		s, err := state.Observe(e.Runner, d.Family, state.DNATChain)
		return s, e.Runner, err
	}
	r := &nft.Reader{Runner: e.Runner, Conn: nl, Attachments: true}
	var s *state.State
	if ex, exists, ok := nl.Excerpt(d.Family, state.DNATChain, d.Chain, d.Claims); ok {
		t := iptables.NewTable()
		if exists {
			t.Add(state.DNATChain, ex.Rules...)
		} else {
			t.Missing[state.DNATChain] = true
		}
		s = state.NewExcerpt(d.Family, t, ex.Pos)
	} else {
		var err error
		if s, err = state.Observe(r, d.Family, state.DNATChain); err != nil {
			return nil, nil, err
		}
	}
	if !s.DNATExists() {
		return s, r, nil
	}
	// Not through the reader: a chain it cannot decode is left to -C, not to a second process.
	if rules, exists, ok := nl.ReadChain(d.Family, d.Chain); ok {
		if exists {
			s.Table.Add(d.Chain, rules...)
		} else {
			s.Table.Missing[d.Chain] = true
		}
		s.Refresh()
	}
	s.SharedShown, _ = e.sharedShown(d)
	return s, r, nil
}

// unanswered returns tx without the -C assertions the observation answers: a rule found,
// equal in meaning, in a chain that was read, and a rule of the shared layout when the
// kernel was shown to hold that layout (State.SharedShown).
func unanswered(tx *iptables.Tx, s *state.State, d plan.Desired) *iptables.Tx {
	if tx.Empty() {
		return tx
	}
	shown := map[string]bool{}
	if s.SharedShown {
		for _, r := range state.Layout(d.SNAT && !d.ExternalMark, d.MarkBit) {
			shown[state.Normalize(r)] = true
		}
	}
	out := &iptables.Tx{}
	for _, op := range tx.Ops {
		r := iptables.Rule{Chain: op.Chain, Args: op.Args}
		if op.Kind == iptables.Check && (shown[state.Normalize(r)] || s.Table.Has(op.Chain) && s.HasRule(r)) {
			continue
		}
		out.Ops = append(out.Ops, op)
	}
	return out
}

// GC removes this network's attachments whose container IDs are not in valid, and the
// chains of such attachments that no jump enters any more. It goes on past errors and
// reports them all.
func (e *Engine) GC(network string, valid map[string]bool, cached []hostport.Owner) (_ []hostport.Owner, err error) {
	defer func() { err = cniError(err) }()
	l, err := e.lock()
	if err != nil {
		return nil, err
	}
	defer l.Release()
	var errs []error
	// Ownership lives in the jump comments of CNI-HOSTPORT-DNAT: one read per family.
	states := map[hostport.Family]*state.State{}
	suspects := append([]hostport.Owner(nil), cached...)
	for _, f := range hostport.Families {
		s, err := state.Observe(e.Runner, f, state.DNATChain)
		if errors.Is(err, iptables.ErrUnavailable) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", f, err))
			continue
		}
		states[f] = s
		for _, a := range s.Attachments {
			if len(a.Jumps) > 0 && a.Owner.Network == network {
				suspects = append(suspects, a.Owner)
			}
		}
	}
	if len(states) == 0 && len(errs) == 0 {
		errs = append(errs, fmt.Errorf("neither iptables nor ip6tables is usable"))
	}
	var removed []hostport.Owner
	seen := map[hostport.Owner]bool{}
	for _, f := range hostport.Families {
		s := states[f]
		if s == nil {
			continue
		}
		var gone []hostport.Owner
		res, err := planWith(e.Runner, s, func(s *state.State) plan.Result {
			r, g := plan.GC(s, network, valid, suspects)
			gone = g
			return r
		})
		if err == nil {
			err = Apply(e.Runner, f, res.Tx)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", f, err))
			continue
		}
		for _, o := range gone {
			if !seen[o] {
				seen[o] = true
				removed = append(removed, o)
				e.forget(o)
			}
		}
	}
	// Records of this network's attachments that are not valid go too, claims or not.
	for _, o := range suspects {
		if o.Network == network && !valid[o.ContainerID] {
			e.forget(o)
		}
	}
	return removed, errors.Join(errs...)
}

// Status reports whether iptables works for the families that have it, without taking
// any lock or reading a table.
func (e *Engine) Status() error {
	var errs []string
	usable := 0
	for _, f := range hostport.Families {
		err := e.Runner.Probe(f)
		switch {
		case err == nil:
			usable++
		case errors.Is(err, iptables.ErrUnavailable) && f == hostport.V6:
			// An IPv4-only host: fine as long as IPv4 works.
		default:
			errs = append(errs, fmt.Sprintf("%s: %v", f, err))
		}
	}
	if usable == 0 || len(errs) > 0 {
		return types.NewError(types.ErrPluginNotAvailable, "iptables is not usable: "+strings.Join(errs, "; "), "")
	}
	return nil
}

// ErrHostPortInUse is the CNI error code of an ADD refused because another attachment holds
// one of its host ports: its owner is alive (conflictPolicy takeover) or any owner
// (conflictPolicy reject). The spec's codes 1-99 have none for a busy resource: 7 (invalid
// network config) would send the operator to a config that is fine, and 11 (try again
// later) invites retries that fail for as long as the owner lives; codes from 100 are the
// plugin's own.
const ErrHostPortInUse = 100

// judgeVictims gathers evidence on every owner p takes claims from and attaches it to the
// takeover. Under conflictPolicy takeover an owner that is alive, or cannot be judged,
// refuses the whole ADD before anything is applied.
func (e *Engine) judgeVictims(p *addPlan, policy string) error {
	if e.Judge == nil || (policy != config.PolicyTakeover && policy != config.PolicyForce) {
		return nil
	}
	var live []string
	for i := range p.res.Takeovers {
		t := &p.res.Takeovers[i]
		var dest netip.Addr
		if len(t.Destinations) > 0 {
			if ap, err := netip.ParseAddrPort(t.Destinations[0]); err == nil {
				dest = ap.Addr()
			}
		}
		ev := e.Judge.Owner(t.From, dest)
		t.Evidence = &ev
		if ev.State == liveness.Stale || policy == config.PolicyForce {
			continue
		}
		for _, c := range p.res.Conflicts {
			if c.Owner == t.From && c.Chain == t.Chain {
				live = append(live, fmt.Sprintf("%s is held by %s (-> %s), judged %s: %s", c.Claim, ownerName(c), c.Dest, ev.State, evidenceText(ev)))
			}
		}
	}
	if len(live) == 0 {
		return nil
	}
	return types.NewError(ErrHostPortInUse,
		"host port in use by a live attachment: "+strings.Join(live, "; "),
		"stop or DEL the other container first; conflictPolicy force takes the port even from a live owner")
}

func ownerName(c plan.Conflict) string {
	if c.Owner.IsZero() {
		return "chain " + c.Chain
	}
	return c.Owner.String()
}

func evidenceText(ev liveness.Evidence) string {
	s := ev.Reason
	if ev.Source != "" {
		s += " (record: " + ev.Source + ")"
	}
	return s
}

// forgetVictim drops the record of an owner whose claims a takeover removed after judging
// it stale: nothing of it lives, and its record would only be read again.
func (e *Engine) forgetVictim(t plan.Takeover) {
	if e.Judge != nil && t.ChainRemoved && t.Evidence != nil && t.Evidence.State == liveness.Stale {
		_ = e.Judge.Records.Remove(t.From)
	}
}

// record writes portguard's record of the attachment ADD installs, under the lock and
// before its rules, so that a claim never exists without the evidence that its owner lives.
func (e *Engine) record(ds []plan.Desired) error {
	if e.Judge == nil || e.Sandbox.Netns == "" || len(ds) == 0 {
		return nil
	}
	r := e.Sandbox
	r.Owner, r.Addrs = ds[0].Owner, nil
	for _, d := range ds {
		r.Addrs = append(r.Addrs, d.PodIP.Addr())
	}
	return e.Judge.Records.Put(r)
}

// forget removes the attachment's record once its rules are gone.
func (e *Engine) forget(o hostport.Owner) {
	if e.Judge != nil {
		_ = e.Judge.Records.Remove(o)
	}
}
