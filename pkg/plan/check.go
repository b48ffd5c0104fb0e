package plan

import (
	"fmt"
	"sort"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/state"
)

// Check validates an attachment. What the read state shows (jumps, their order, other
// owners on the same ports) becomes Problems; what was not read (the chain's rules, the
// shared chains) becomes -C assertions in Tx, which change nothing and fail if a rule is
// missing. Claims of other owners whose host IP matters are requested through Need.
func Check(s *state.State, d Desired) Result {
	if !s.DNATKnown() {
		return Result{Need: []string{state.DNATChain}}
	}
	var res Result
	if !s.DNATExists() {
		res.Problems = append(res.Problems, fmt.Sprintf("%s: chain %s does not exist", d.Family, state.DNATChain))
		return res
	}
	own := s.Attachments[d.Chain]
	first := -1
	if own != nil && len(own.Jumps) > 0 {
		first = own.Jumps[0].Index
	}
	var ownJumps []state.Jump
	if own != nil {
		ownJumps = own.Jumps
	}
	if len(ownJumps) == 0 {
		for _, r := range d.Jumps {
			res.Problems = append(res.Problems, jumpMissing(d, r))
		}
	} else if len(ownJumps) > len(d.Jumps) {
		// d.Jumps has one rule per kernel rule (address lists expanded as iptables does), so
		// more jumps than that are someone else's.
		res.Problems = append(res.Problems, fmt.Sprintf("%s: %d jump rules enter %s, %d expected", d.Family, len(ownJumps), d.Chain, len(d.Jumps)))
	}

	// Another owner's claim on one of our ports shadows us when it comes first and
	// duplicates us when it comes later (it takes over as soon as we go).
	var need []string
	for _, j := range s.Jumps {
		if j.Target == d.Chain {
			continue
		}
		for _, c := range d.Claims {
			if j.Proto != c.Proto || !j.HasPort(c.HostPort) {
				continue
			}
			if j.IsClaim() {
				a := s.Attachments[j.Target]
				if !c.AnyHostIP() && !a.Read {
					need = append(need, a.Chain)
					continue
				}
				if !c.AnyHostIP() && !mappingsConflict(a, c) {
					continue
				}
			}
			who := fmt.Sprintf("rule %d of %s (%s)", j.Index+1, state.DNATChain, j.Rule.Spec())
			if !j.Owner.IsZero() {
				who = fmt.Sprintf("%s (chain %s)", j.Owner, j.Target)
			}
			verb := "is duplicated by"
			if first < 0 || j.Index < first {
				verb = "is shadowed by"
			}
			res.Problems = append(res.Problems, fmt.Sprintf("%s: host port %s %s %s", d.Family, c, verb, who))
		}
	}
	if len(need) > 0 {
		sort.Strings(need)
		return Result{Need: need}
	}

	tx := &iptables.Tx{}
	// The kernel compares the jumps (-C): the conditions in them may be spelled otherwise
	// than iptables prints them (a CIDR with host bits, a long option).
	if len(ownJumps) > 0 {
		for _, r := range d.Jumps {
			tx.CheckRule(r, jumpMissing(d, r))
		}
	}
	for _, r := range d.Rules {
		tx.CheckRule(r, fmt.Sprintf("%s: rule missing in %s: %s", d.Family, d.Chain, r.Spec()))
	}
	for _, ch := range state.EntryChains {
		tx.CheckRule(state.EntryJump(ch), fmt.Sprintf("%s: entry jump from %s to %s is missing", d.Family, ch, state.DNATChain))
	}
	if d.SNAT && !d.ExternalMark {
		tx.CheckRule(state.MasqJump(), fmt.Sprintf("%s: POSTROUTING jump to %s is missing (snat is on)", d.Family, state.MasqChain))
		tx.CheckRule(state.SetMarkRule(d.MarkBit), fmt.Sprintf("%s: %s lacks its mark rule (snat is on)", d.Family, state.SetMarkChain))
		tx.CheckRule(state.MasqRule(d.MarkBit), fmt.Sprintf("%s: %s lacks its MASQUERADE rule (snat is on)", d.Family, state.MasqChain))
	}
	res.Tx = tx
	return res
}

// mappingsConflict reports whether any mapping of a conflicts with claim c.
func mappingsConflict(a *state.Attachment, c hostport.Claim) bool {
	for _, m := range a.Mappings {
		if m.Claim.Conflicts(c) {
			return true
		}
	}
	return false
}

func jumpMissing(d Desired, r iptables.Rule) string {
	return fmt.Sprintf("%s: jump rule missing in %s: %s", d.Family, state.DNATChain, r.Spec())
}
