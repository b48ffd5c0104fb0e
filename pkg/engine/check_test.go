package engine

import (
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/plan"
	"github.com/portguard/portguard/pkg/state"
)

// CHECK's read over netlink answers the -C assertions it can: what remains is exactly what
// the read did not show.
func TestUnansweredKeepsOnlyWhatTheReadDidNotShow(t *testing.T) {
	c := conf(t, "", m8080+","+m9090, "10.99.0.5/16")
	d := podDesired(c, owner("c1"))[0]
	// As nft.Conn.Excerpt hands it over: the own jump at kernel position 7 of 9, spelled as
	// iptables -S prints it, and a foreign rule on 9090 at position 3.
	printed, _ := iptables.SplitArgs(`-p tcp -m comment --comment "dnat name: \"knet\" id: \"c1\"" -m multiport --dports 8080,9090 -j ` + d.Chain)
	if len(d.Jumps) != 1 {
		t.Fatalf("jumps: %v", d.Jumps)
	}
	foreign := iptables.Rule{Chain: state.DNATChain, Args: []string{"-p", "tcp", "-m", "tcp", "--dport", "9090", "-j", "RETURN"}}
	observe := func(chainRules []iptables.Rule, shared bool) *state.State {
		tab := iptables.NewTable()
		tab.Add(state.DNATChain, foreign, iptables.Rule{Chain: state.DNATChain, Args: printed})
		if chainRules != nil {
			tab.Add(d.Chain, chainRules...)
		}
		s := state.NewExcerpt(d.Family, tab, []int{3, 7})
		s.SharedShown = shared
		return s
	}
	checks := func(s *state.State) (problems, asserted []string) {
		res := plan.Check(s, d)
		if len(res.Need) > 0 {
			t.Fatalf("Check needs %v", res.Need)
		}
		for _, op := range unanswered(res.Tx, s, d).Ops {
			asserted = append(asserted, op.Chain+" "+strings.Join(op.Args, " "))
		}
		return res.Problems, asserted
	}

	// Everything shown: no assertion left; the foreign rule is named by its kernel position.
	problems, asserted := checks(observe(d.Rules, true))
	if len(asserted) != 0 {
		t.Errorf("assertions left with everything shown: %q", asserted)
	}
	if len(problems) != 1 || !strings.Contains(problems[0], "shadowed by rule 4 of "+state.DNATChain) {
		t.Errorf("problems: %q, want the foreign rule at kernel position 4 shadowing 9090", problems)
	}

	// The chain lacks its last rule: that one is asserted, nothing else.
	_, asserted = checks(observe(d.Rules[:len(d.Rules)-1], true))
	if want := d.Chain + " " + strings.Join(d.Rules[len(d.Rules)-1].Args, " "); len(asserted) != 1 || asserted[0] != want {
		t.Errorf("asserted %q, want only %q", asserted, want)
	}

	// The chain was not read (a shape the decoder does not know) and the layout not shown:
	// every rule of both is asserted.
	_, asserted = checks(observe(nil, false))
	if want := len(d.Rules) + len(state.Layout(true, d.MarkBit)); len(asserted) != want {
		t.Errorf("asserted %d rules, want %d: %q", len(asserted), want, asserted)
	}
}
