package plan

import (
	"fmt"
	"net/netip"
	"sort"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/state"
)

// RepairResult is repair's plan for one family: one transaction and what it does.
type RepairResult struct {
	Tx          *iptables.Tx
	Actions     []string         // what the transaction changes, in order, for humans
	Skipped     []string         // problems repair leaves alone, and why
	UnknownKeep []hostport.Owner // --keep owners with no claim in this family
	// Removals records what Tx removes, one entry per owner's chain (or repeated jump),
	// in the order of Actions; the CLI logs them once Tx has landed.
	Removals []RepairRemoval
	// ScopeOwnerSeen says a chain of the scope's owner exists in this family.
	ScopeOwnerSeen bool
}

// Repair plans the fix of everything Audit reports, as one transaction:
//
//   - a contested host port keeps one claim: the claim of an owner in keep, otherwise the
//     last added one, taken to be the last in CNI-HOSTPORT-DNAT: upstream portmap appends
//     each new jump, so on the nodes repair is for, the first claim is the stale one and
//     the last is the live pod's. (portguard itself never leaves two claims on a port,
//     except under conflictPolicy allow, where it puts the newest first; use --keep.) The others
//     lose their conflicting mappings with the same mechanics as ADD's takeover (takeOver):
//     the whole chain and its jumps when nothing else remains, otherwise the mapping's
//     rules and a jump rewritten to the ports still served;
//   - a jump port without a DNAT rule in its chain, and a DNAT rule without a jump port,
//     are removed the same way (a chain with nothing valid left goes entirely);
//   - repeated jumps are deleted; orphan CNI-DN chains are flushed and deleted (unless a
//     non-CNI rule still jumps to one: that is reported in Skipped, never touched);
//   - entry jumps, and SETMARK/MASQ with POSTROUTING's jump when remaining chains mark
//     packets, are restored.
//
// Only CNI-HOSTPORT-DNAT's jumps to CNI-DN chains, CNI-DN chains and the upstream shared
// rules are written. The state must be complete (state.ObserveAll). Keep owners that
// conflict with each other are an error.
//
// With j, a claim whose owner is alive (or cannot be judged) is never removed unless an
// owner in keep takes its port: it wins over stale claims whatever the jump order, and two
// live claimants of one port are both left alone and reported in Skipped (choose with
// --keep). This is ADD's takeover rule (pkg/liveness).
func Repair(s *state.State, keep map[hostport.Owner]bool, j Liveness) (RepairResult, error) {
	return RepairScoped(s, keep, j, RepairScope{})
}

// RepairScoped is Repair narrowed to the problems that involve scope's port and/or owner
// (RepairScope); every other problem, and the restoring of shared rules (entry jumps,
// SETMARK/MASQ), is left alone and reported in Skipped. Which claim keeps a contested
// port is decided over the whole table, exactly as Repair does; only what is removed
// is narrowed.
func RepairScoped(s *state.State, keep map[hostport.Owner]bool, j Liveness, scope RepairScope) (RepairResult, error) {
	an := analyze(s, keep, true, j)
	res := RepairResult{Tx: &iptables.Tx{}, UnknownKeep: an.unknown}
	sort.Slice(res.UnknownKeep, func(i, j int) bool { return res.UnknownKeep[i].String() < res.UnknownKeep[j].String() })
	if len(an.conflicts) > 0 {
		return res, fmt.Errorf("%s: --keep names owners that conflict: %s", s.Family, an.conflicts[0])
	}
	tx := res.Tx
	act := func(format string, a ...any) { res.Actions = append(res.Actions, fmt.Sprintf(format, a...)) }
	narrowed := !scope.IsZero()
	leave := func(format string, a ...any) {
		res.Skipped = append(res.Skipped, fmt.Sprintf("%s: %s; left alone (outside %s)", s.Family, fmt.Sprintf(format, a...), scope))
	}
	for _, a := range s.Attachments {
		if !scope.Owner.IsZero() && a.Exists && scope.ownerIs(a) {
			res.ScopeOwnerSeen = true
		}
	}
	// judge records the liveness of a removed owner in its record, when repair has a judge.
	judge := func(r *RepairRemoval, a *state.Attachment) {
		if j == nil || a.Owner.IsZero() {
			return
		}
		var dest netip.Addr
		if len(a.Mappings) > 0 {
			dest = a.Mappings[0].Dest.Addr()
		}
		ev := j.Owner(a.Owner, dest)
		r.OwnerState, r.Evidence = string(ev.State), &ev
	}
	dnat := newSim(s.Table.Rules(state.DNATChain))

	dupIndex := map[int]bool{}
	for _, j := range an.dupJumps {
		if !scope.jump(s, j) {
			leave("rule %d of %s, a repeated jump into %s", j.Index+1, state.DNATChain, j.Target)
			continue
		}
		why := fmt.Sprintf("delete repeated jump into %s", j.Target)
		tx.DeleteRule(j.Rule, why)
		dnat.delete(j.Rule)
		dupIndex[j.Index] = true
		act("%s: delete rule %d of %s, a repeated jump into %s", s.Family, j.Index+1, state.DNATChain, j.Target)
		rec := RepairRemoval{Family: s.Family.String(), Owner: j.Owner, Chain: j.Target, Claims: []hostport.Claim{}, Destinations: []string{},
			Rule: j.Rule.String(), Reasons: []string{KindDuplicateJump}}
		if a := s.Attachments[j.Target]; a != nil {
			judge(&rec, a)
		}
		res.Removals = append(res.Removals, rec)
	}

	// What each attachment loses.
	type loss struct {
		mappings []state.Mapping
		seen     map[string]bool
		for_     hostport.Owner
		reasons  map[string]bool
	}
	losses := map[*state.Attachment]*loss{}
	lose := func(a *state.Attachment, m state.Mapping, kind, why string) {
		l := losses[a]
		if l == nil {
			l = &loss{seen: map[string]bool{}, reasons: map[string]bool{}}
			losses[a] = l
		}
		l.reasons[kind] = true
		k := fmt.Sprintf("%s|%s", m.Claim, m.Dest)
		if l.seen[k] {
			return
		}
		l.seen[k] = true
		l.mappings = append(l.mappings, m)
		act("%s: %s: %s", s.Family, ownerText(a.Owner, a.Chain), why)
	}
	res.Skipped = append(res.Skipped, an.liveContests...)
	for _, c := range an.claims {
		switch c.Status {
		case StatusShadowed:
			if an.spare[c] {
				continue
			}
			by := c.ShadowedBy
			w := an.winner(c)
			if w != nil {
				by = ownerText(w.owner, w.Chain)
			}
			if !scope.contest(c, w) {
				leave("%s: claim %s -> %s (conflicts with %s)", ownerText(c.a.Owner, c.a.Chain), c.m.Claim, c.Destination, by)
				continue
			}
			lose(c.a, *c.m, KindShadowedClaim, fmt.Sprintf("remove claim %s -> %s (conflicts with %s, which is kept)", c.m.Claim, c.Destination, by))
			if w != nil && losses[c.a].for_.IsZero() {
				losses[c.a].for_ = w.owner
			}
		case StatusNoDNAT:
			if !scope.mismatch(an, c.a) {
				leave("%s: jump port %s/%d without a DNAT rule", ownerText(c.a.Owner, c.a.Chain), c.m.Claim.Proto, c.m.Claim.HostPort)
				continue
			}
			lose(c.a, *c.m, KindPortMismatch, fmt.Sprintf("remove jump port %s/%d (the chain has no DNAT rule for it)", c.m.Claim.Proto, c.m.Claim.HostPort))
		}
	}
	for _, a := range s.AttachmentsSorted() {
		dead := map[string]bool{}
		for _, k := range an.dnatOnly[a.Chain] {
			dead[k] = true
		}
		for _, m := range a.Mappings {
			if dead[portKey(m.Claim.Proto, m.Claim.HostPort)] {
				if !scope.mismatch(an, a) {
					leave("%s: DNAT %s -> %s without a jump", ownerText(a.Owner, a.Chain), m.Claim, m.Dest)
					continue
				}
				lose(a, m, KindPortMismatch, fmt.Sprintf("remove DNAT %s -> %s (no jump sends the port into the chain)", m.Claim, m.Dest))
			}
		}
	}

	removed := map[*state.Attachment]bool{}
	for _, a := range s.AttachmentsSorted() {
		l := losses[a]
		if l == nil {
			continue
		}
		lost := map[string]bool{}
		for _, m := range l.mappings {
			lost[fmt.Sprintf("%s|%s", m.Claim, m.Dest)] = true
		}
		v := victim{keep: map[string]bool{}, lost: l.mappings}
		remaining := 0
		for _, m := range a.Mappings {
			if !lost[fmt.Sprintf("%s|%s", m.Claim, m.Dest)] {
				remaining++
				v.keep[portKey(m.Claim.Proto, m.Claim.HostPort)] = true
			}
		}
		v.removeAll = remaining == 0
		// The repeated jumps are already deleted: takeOver sees only the others.
		ac := *a
		ac.Jumps = nil
		for _, j := range a.Jumps {
			if !dupIndex[j.Index] {
				ac.Jumps = append(ac.Jumps, j)
			}
		}
		v.a = &ac
		t, _ := takeOver(tx, dnat, v, Desired{Family: s.Family, Owner: l.for_}, true) // repair holds the lock exclusively
		rec := RepairRemoval{Family: t.Family, Owner: t.From, Chain: t.Chain, Claims: t.Claims, ChainRemoved: t.ChainRemoved}
		for _, m := range v.lost { // a jump port without DNAT rule has no destination: ""
			d := ""
			if m.Dest.IsValid() {
				d = m.Dest.String()
			}
			rec.Destinations = append(rec.Destinations, d)
		}
		if !l.for_.IsZero() {
			f := l.for_
			rec.KeptFor = &f
		}
		for k := range l.reasons {
			rec.Reasons = append(rec.Reasons, k)
		}
		sort.Strings(rec.Reasons)
		judge(&rec, a)
		res.Removals = append(res.Removals, rec)
		if v.removeAll {
			removed[a] = true
			act("%s: %s: nothing valid left: delete its jumps and the chain", s.Family, ownerText(a.Owner, a.Chain))
		}
	}

	for _, a := range an.orphans {
		if refs := referencedOutside(s, a.Chain); len(refs) > 0 {
			res.Skipped = append(res.Skipped, fmt.Sprintf("%s: orphan chain %s is referenced by non-CNI rule %s; left alone", s.Family, a.Chain, refs[0]))
			continue
		}
		if !scope.chain(a) {
			leave("orphan chain %s", a.Chain)
			continue
		}
		tx.RemoveChain(a.Chain, "delete orphan chain "+a.Chain)
		act("%s: delete orphan chain %s (no jump enters it)", s.Family, a.Chain)
		rec := RepairRemoval{Family: s.Family.String(), Owner: a.Owner, Chain: a.Chain, Claims: []hostport.Claim{}, Destinations: []string{},
			ChainRemoved: true, Reasons: []string{KindOrphanChain}}
		for _, m := range a.Mappings {
			rec.Claims = append(rec.Claims, m.Claim)
			rec.Destinations = append(rec.Destinations, m.Dest.String())
		}
		res.Removals = append(res.Removals, rec)
	}

	claims, marks := false, false
	for _, a := range s.Attachments {
		if !a.Exists || len(a.Jumps) == 0 || removed[a] {
			continue
		}
		claims = true
		gone := map[string]bool{}
		if l := losses[a]; l != nil {
			for _, m := range l.mappings {
				for _, r := range m.Rules {
					gone[state.Normalize(r)] = true
				}
			}
		}
		for _, r := range s.Table.Rules(a.Chain) {
			if r.Target() == state.SetMarkChain && !gone[state.Normalize(r)] {
				marks = true
			}
		}
	}
	if claims && narrowed {
		// Shared rules involve no one port or owner: a narrowed repair reports what the
		// whole repair would restore and leaves it.
		var scratch iptables.Tx
		ensureShared(&scratch, s, marks, false, an.markBit)
		for _, op := range scratch.Ops {
			switch op.Kind {
			case iptables.Declare:
				leave("missing shared chain %s", op.Chain)
			case iptables.Append, iptables.Insert:
				leave("missing shared rule -A %s %s", op.Chain, iptables.JoinArgs(op.Args))
			}
		}
	}
	if claims && !narrowed {
		before := len(tx.Ops)
		ensureShared(tx, s, marks, false, an.markBit)
		for _, op := range tx.Ops[before:] {
			switch op.Kind {
			case iptables.Declare:
				act("%s: create chain %s", s.Family, op.Chain)
			case iptables.Append, iptables.Insert:
				act("%s: restore -A %s %s", s.Family, op.Chain, iptables.JoinArgs(op.Args))
			}
		}
	}
	return res, nil
}
