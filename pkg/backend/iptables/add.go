package iptbackend

import (
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/portguard/portguard/pkg/backend"
	"github.com/portguard/portguard/pkg/config"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/nft"
	"github.com/portguard/portguard/pkg/plan"
	"github.com/portguard/portguard/pkg/state"
)

// Add installs the attachment in every family the pod has an address in and some mapping
// applies to (backend.Backend). Every family is planned and decided before any is applied,
// so a refused conflict in one family leaves the other untouched too.
//
// Under the shared lock (parallel) the reads, plans and writes of two ADDs on one port
// never interleave (the engine holds the port's lock), and ADDs on other ports only meet
// in the few jumps of a victim that held both ports, where the later payload fails whole
// and is planned again. The writes that need the node to themselves (creating or restoring
// the shared layout, a jump rewritten at a position a concurrent writer would shift) end
// the call with backend.ErrNeedExclusive, also when it has already applied one family.
func (b *Backend) Add(c *config.Config, owner hostport.Owner, parallel bool, h backend.Hooks) (_ []backend.Takeover, err error) {
	defer func() { err = busy(err) }()
	ds := podDesired(c, owner)
	if len(ds) == 0 {
		return nil, nil
	}
	var pending []addPlan
	for _, d := range ds {
		p, err := b.planAdd(d, c.Policy)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", d.Family, err)
		}
		if parallel && needsExclusive(p.res) {
			return nil, backend.ErrNeedExclusive
		}
		// A live owner (or, under conflictPolicy reject, any owner) in one family leaves
		// the other untouched too.
		if err := h.CallDecide(p.res.Takeovers, p.res.Conflicts); err != nil {
			return nil, err
		}
		pending = append(pending, p)
	}
	if err := h.CallRecord(); err != nil {
		return nil, err
	}
	var all []backend.Takeover
	for _, p := range pending {
		t, err := b.applyAdd(p, c.Policy, parallel, h)
		all = append(all, t...)
		if err != nil {
			return all, err
		}
	}
	return all, nil
}

// needsExclusive tells a plan that only an exclusive holder may apply.
func needsExclusive(r plan.Result) bool { return r.SharedChanges || r.Positioned }

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
func (b *Backend) planAdd(d plan.Desired, policy string) (addPlan, error) {
	r := b.reader(d.Family)
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
		s.SharedShown, _ = b.sharedShown(d)
	}
	p := addPlan{d: d, s: s, taken: map[string]nft.Taken{}}
	tried := map[string]bool{}
	p.res, err = planWith(r, s, func(s *state.State) plan.Result {
		for {
			res := plan.Add(s, d, policy)
			if len(res.Need) == 0 || !b.readTaken(&p, res.Need, tried) {
				return res
			}
		}
	})
	return p, err
}

// readTaken reads in part, over netlink, the big victims among the chains a plan needs:
// only their rules for the ports d claims (nft.TakenRules). It reports whether it read
// any; the others are left to a full read.
func (b *Backend) readTaken(p *addPlan, need []string, tried map[string]bool) bool {
	nl := b.conn(p.d.Family)
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
func (b *Backend) sharedShown(d plan.Desired) (bool, error) {
	nl := b.conn(d.Family)
	if nl == nil {
		return false, nil
	}
	return nl.SharedLayout(d.Family, d.SNAT && !d.ExternalMark, d.MarkBit)
}

// applyAdd applies a plan; if iptables-restore refuses it (a failed assertion, or another
// writer changed the table), it reads the shared chains too, plans again and retries: once
// under the exclusive lock, a few times beside parallel ADDs of other ports.
//
// h.Decide judges every replan; h.Applied hears of every takeover applied.
func (b *Backend) applyAdd(p addPlan, policy string, parallel bool, h backend.Hooks) ([]backend.Takeover, error) {
	attempts := 2
	if parallel {
		attempts = 5
	}
	var done []backend.Takeover
	for attempt := 1; ; attempt++ {
		if parallel && needsExclusive(p.res) {
			return done, backend.ErrNeedExclusive
		}
		tx, taken := splitTaken(p.res.Tx, p.taken)
		err := Apply(b.Runner, p.d.Family, tx)
		if err == nil && len(taken) > 0 {
			for chain, w := range taken {
				if err = b.conn(p.d.Family).TakeFrom(p.d.Family, chain, w.drop, w.handles); err != nil {
					// The new claim is in and wins; what is left of the victim is
					// unreachable (audit reports it, repair removes it).
					return done, fmt.Errorf("%s: %w", p.d.Family, err)
				}
			}
		}
		if err == nil {
			for _, t := range p.res.Takeovers {
				h.CallApplied(t)
			}
			done = append(done, p.res.Takeovers...)
			if !p.s.SharedShown || attempt == attempts {
				return done, nil
			}
			if still, err := b.sharedShown(p.d); still || err != nil {
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
		if p.s, err = state.Observe(b.Runner, p.d.Family, append([]string{state.DNATChain}, state.SharedChains...)...); err != nil {
			return done, err
		}
		if p.res, err = planWith(b.Runner, p.s, func(s *state.State) plan.Result { return plan.Add(s, p.d, policy) }); err != nil {
			return done, err
		}
		if err := h.CallDecide(p.res.Takeovers, p.res.Conflicts); err != nil {
			return done, err
		}
	}
}
