package plan

import (
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/state"
)

// ensureShared adds to tx what the shared layout lacks: CNI-HOSTPORT-DNAT and its entry
// jumps, and (snat with portguard's own marks) SETMARK, MASQ and POSTROUTING's jump.
// A chain that was not read is not declared (that would flush it); its rules are asserted
// with -C instead, so the payload fails rather than guess, and the caller reads and replans,
// unless the kernel was shown to hold them (State.SharedShown).
//
// It reports whether it changed anything (rather than only asserting): creating the shared
// layout is the one write that concurrent ADDs of different ports must not both do.
func ensureShared(tx *iptables.Tx, s *state.State, snat, externalMark bool, markBit int) bool {
	n := len(tx.Ops)
	changed := func() bool {
		for _, op := range tx.Ops[n:] {
			if op.Kind != iptables.Check {
				return true
			}
		}
		return false
	}
	t := s.Table
	dnatNew := t.Absent(state.DNATChain)
	if dnatNew {
		tx.DeclareChain(state.DNATChain, "create "+state.DNATChain)
	}
	for _, ch := range state.EntryChains {
		ensureRule(tx, s, state.EntryJump(ch), dnatNew, false, "entry jump "+ch+" -> "+state.DNATChain)
	}
	if !snat || externalMark {
		return changed()
	}
	for _, sc := range []struct {
		chain string
		rule  iptables.Rule
	}{{state.SetMarkChain, state.SetMarkRule(markBit)}, {state.MasqChain, state.MasqRule(markBit)}} {
		isNew := t.Absent(sc.chain)
		if isNew {
			tx.DeclareChain(sc.chain, "create "+sc.chain)
		}
		ensureRule(tx, s, sc.rule, isNew, false, sc.chain+" rule")
	}
	ensureRule(tx, s, state.MasqJump(), t.Absent(state.MasqChain), true, "POSTROUTING jump -> "+state.MasqChain)
	return changed()
}

// ensureRule appends (or prepends) r when it is known to be absent, asserts it when its
// chain was not read, and does nothing when it is there. targetNew says the rule cannot
// exist because the chain it jumps to (or lives in) is being created.
func ensureRule(tx *iptables.Tx, s *state.State, r iptables.Rule, targetNew, prepend bool, what string) {
	switch {
	case !targetNew && !s.Table.Known(r.Chain) && s.SharedShown:
	case !targetNew && !s.Table.Known(r.Chain):
		tx.CheckRule(r, what+" is missing")
	case !targetNew && s.HasRule(r):
	case prepend:
		tx.InsertRule(r, 1, "restore "+what)
	default:
		tx.AppendRule(r, "restore "+what)
	}
}
