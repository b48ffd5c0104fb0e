package iptbackend

import (
	"errors"
	"fmt"

	"github.com/portguard/portguard/pkg/config"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/nft"
	"github.com/portguard/portguard/pkg/plan"
	"github.com/portguard/portguard/pkg/state"
)

// Check validates the attachment in the families the pod has addresses in
// (backend.Backend).
//
// On iptables-nft a CHECK that finds all in order starts no process: the rules of
// CNI-HOSTPORT-DNAT that can matter (nft.Conn.Excerpt), the attachment's chain and the
// shared layout are read over netlink, and the planner's -C assertions that this read
// answers are dropped. What it does not answer (a rule not found as written, a shape the
// decoder does not know, a shared layout not shown) is asserted by iptables-restore as
// before, and the kernel decides.
func (b *Backend) Check(c *config.Config, owner hostport.Owner) (problems []string, err error) {
	defer func() { err = busy(err) }()
	defer b.Close()
	for _, d := range podDesired(c, owner) {
		f := d.Family
		s, r, err := b.observeCheck(d)
		if err != nil {
			return nil, err
		}
		res, err := planWith(r, s, func(s *state.State) plan.Result { return plan.Check(s, d) })
		if err != nil {
			return nil, err
		}
		problems = append(problems, res.Problems...)
		tx := unanswered(res.Tx, s, d)
		if tx.Empty() {
			continue
		}
		// The assertions change nothing; the first one that fails names the problem.
		if err := Apply(b.Runner, f, tx); err != nil {
			if errors.Is(err, iptables.ErrXtablesLock) {
				return nil, err
			}
			var re *iptables.RestoreError
			if errors.As(err, &re) && tx.Explain(re.Line) != "" {
				problems = append(problems, tx.Explain(re.Line))
			} else {
				problems = append(problems, fmt.Sprintf("%s: %v", f, err))
			}
		}
	}
	return problems, nil
}

// observeCheck reads what CHECK of d decides on, and returns the runner for further
// reads. Over netlink: the excerpt of CNI-HOSTPORT-DNAT (or, when some rule there has a
// shape the decoder does not know, the whole chain through nft.Reader), the attachment's
// chain when the decoder knows its rules, and whether the shared layout is shown.
func (b *Backend) observeCheck(d plan.Desired) (*state.State, iptables.Runner, error) {
	nl := b.conn(d.Family)
	if nl == nil {
		s, err := state.Observe(b.Runner, d.Family, state.DNATChain)
		return s, b.Runner, err
	}
	r := &nft.Reader{Runner: b.Runner, Conn: nl, Attachments: true}
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
	s.SharedShown, _ = b.sharedShown(d)
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
