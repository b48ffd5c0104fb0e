package stress

import (
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/portguard/portguard/pkg/state"
)

// holdings is a model of one family's table: chain -> the claims ("proto/port") the
// attachment behind it holds. An attachment that holds nothing is absent.
type holdings map[string]map[string]bool

func (h holdings) clone() holdings {
	out := holdings{}
	for c, ks := range h {
		m := map[string]bool{}
		for k := range ks {
			m[k] = true
		}
		out[c] = m
	}
	return out
}

func keysOf(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func sameKeys(a, b map[string]bool) bool {
	if len(a) != len(b) {
		return false
	}
	for k := range a {
		if !b[k] {
			return false
		}
	}
	return true
}

// describe renders holdings with attachment names for failure messages.
func (h holdings) describe(byChain map[string]*attachment) string {
	var lines []string
	for c, ks := range h {
		name := c
		if a := byChain[c]; a != nil {
			name = a.Name
		}
		lines = append(lines, fmt.Sprintf("%s%v", name, keysOf(ks)))
	}
	sort.Strings(lines)
	return strings.Join(lines, " ")
}

// kernelHoldings reads the holdings off an observed state: for each CNI-DN chain, the
// claims of its jump rules.
func kernelHoldings(s *state.State) holdings {
	out := holdings{}
	for _, a := range s.Attachments {
		m := map[string]bool{}
		for _, j := range a.Jumps {
			for _, p := range j.Ports {
				m[j.Proto+"/"+strconv.Itoa(p)] = true
			}
		}
		out[a.Chain] = m
	}
	return out
}

// verify compares one family's kernel state with the model and returns every violation,
// each starting with its class: HALF-INSTALLED, LOST, DUPLICATE, UNEXPECTED, MISMATCH,
// SHARED. byChain names every attachment the test knows.
func verify(o *observation, want holdings, byChain map[string]*attachment) []string {
	var problems []string
	s := o.s
	name := func(chain string) string {
		if a := byChain[chain]; a != nil {
			return a.Name + " (" + chain + ")"
		}
		return chain
	}

	// Every rule of CNI-HOSTPORT-DNAT is a claim of a known chain; no port is claimed twice.
	owners := map[string][]string{}
	for _, j := range s.Jumps {
		if !j.IsClaim() {
			problems = append(problems, "UNEXPECTED: rule in CNI-HOSTPORT-DNAT that enters no CNI-DN chain: "+j.Rule.String())
			continue
		}
		for _, p := range j.Ports {
			k := j.Proto + "/" + strconv.Itoa(p)
			owners[k] = append(owners[k], name(j.Target))
		}
	}
	for k, os := range owners {
		if len(os) > 1 {
			problems = append(problems, fmt.Sprintf("DUPLICATE: %s %s claimed %d times, in kernel order: %s", o.f, k, len(os), strings.Join(os, ", ")))
		}
	}

	for _, a := range s.AttachmentsSorted() {
		switch {
		case a.Exists && len(a.Jumps) == 0:
			problems = append(problems, "HALF-INSTALLED: chain without jumps: "+name(a.Chain))
		case !a.Exists && len(a.Jumps) > 0:
			problems = append(problems, "HALF-INSTALLED: jumps to a chain that does not exist: "+name(a.Chain))
		}
		hold, expected := want[a.Chain]
		if !expected {
			if len(a.Jumps) > 0 {
				problems = append(problems, fmt.Sprintf("UNEXPECTED: %s holds %v, the model says it is gone", name(a.Chain), keysOf(kernelHoldings(s)[a.Chain])))
			} else if a.Exists {
				problems = append(problems, fmt.Sprintf("UNEXPECTED: %s still exists, the model says it is gone", name(a.Chain)))
			}
			continue
		}
		att := byChain[a.Chain]
		if att == nil {
			problems = append(problems, "UNEXPECTED: unknown chain "+a.Chain)
			continue
		}
		have := kernelHoldings(s)[a.Chain]
		for _, k := range keysOf(hold) {
			if !have[k] {
				problems = append(problems, fmt.Sprintf("LOST: %s %s no longer claims %s (the model says it holds %v)", o.f, name(a.Chain), k, keysOf(hold)))
			}
		}
		for _, k := range keysOf(have) {
			if !hold[k] {
				problems = append(problems, fmt.Sprintf("UNEXPECTED: %s %s claims %s (the model says it holds %v)", o.f, name(a.Chain), k, keysOf(hold)))
			}
		}
		// The chain and its jumps are exactly what the attachment needs for what it holds.
		wantJumps, wantRules, err := att.desired(o.f, hold)
		if err != nil {
			problems = append(problems, "MISMATCH: "+err.Error())
			continue
		}
		var gotJumps, gotRules []string
		for _, j := range a.Jumps {
			gotJumps = append(gotJumps, state.Normalize(j.Rule))
		}
		for _, r := range s.Table.Rules(a.Chain) {
			gotRules = append(gotRules, state.Normalize(r))
		}
		sort.Strings(gotJumps)
		sort.Strings(gotRules)
		if strings.Join(gotJumps, "\n") != strings.Join(wantJumps, "\n") {
			problems = append(problems, fmt.Sprintf("MISMATCH: %s %s jumps\n    have %q\n    want %q", o.f, name(a.Chain), gotJumps, wantJumps))
		}
		if strings.Join(gotRules, "\n") != strings.Join(wantRules, "\n") {
			problems = append(problems, fmt.Sprintf("HALF-INSTALLED/MISMATCH: %s %s chain rules\n    have %q\n    want %q", o.f, name(a.Chain), gotRules, wantRules))
		}
	}
	for _, c := range sortedChains(want) {
		if a := s.Attachments[c]; a == nil || (!a.Exists && len(a.Jumps) == 0) {
			problems = append(problems, fmt.Sprintf("LOST: %s %s is gone, the model says it holds %v", o.f, name(c), keysOf(want[c])))
		}
	}
	problems = append(problems, verifyShared(o)...)
	return problems
}

func sortedChains(h holdings) []string {
	out := make([]string, 0, len(h))
	for c := range h {
		out = append(out, c)
	}
	sort.Strings(out)
	return out
}

// verifyShared: portguard's shared rules appear at most once, and all of them once
// CNI-HOSTPORT-DNAT exists (every attachment in these tests uses snat, the default).
func verifyShared(o *observation) []string {
	var problems []string
	s := o.s
	count := func(chain string, r string) int {
		n := 0
		for _, have := range s.Table.Rules(chain) {
			if state.Normalize(have) == r {
				n++
			}
		}
		return n
	}
	rules := []struct {
		chain string
		norm  string
	}{
		{"PREROUTING", state.Normalize(state.EntryJump("PREROUTING"))},
		{"OUTPUT", state.Normalize(state.EntryJump("OUTPUT"))},
		{"POSTROUTING", state.Normalize(state.MasqJump())},
		{state.SetMarkChain, state.Normalize(state.SetMarkRule(13))},
		{state.MasqChain, state.Normalize(state.MasqRule(13))},
	}
	for _, r := range rules {
		n := count(r.chain, r.norm)
		if n > 1 || (n == 0 && s.DNATExists()) {
			problems = append(problems, fmt.Sprintf("SHARED: %s: %s appears %d times", o.f, r.norm, n))
		}
	}
	return problems
}
