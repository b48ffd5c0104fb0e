package engine

import (
	"reflect"
	"testing"

	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/nft"
	"github.com/portguard/portguard/pkg/state"
)

// splitTaken leaves the payload nothing that names a victim read in part (iptables-nft
// would fetch its whole chain for it) and turns those operations into TakeFrom's input:
// the ports dropped from its jumps and the handles of its taken rules.
func TestSplitTakenDivertsEverythingNamingTheVictim(t *testing.T) {
	const victim, own = "CNI-DN-victim", "CNI-DN-own"
	rule := func(chain string, args ...string) iptables.Rule { return iptables.Rule{Chain: chain, Args: args} }
	jump := func(ports, target string) iptables.Rule {
		return rule(state.DNATChain, "-p", "tcp", "-m", "multiport", "--dports", ports, "-j", target)
	}
	lostDNAT := rule(victim, "-p", "tcp", "-m", "tcp", "--dport", "30005", "-j", "DNAT", "--to-destination", "10.0.0.2:30005")
	lostMark := rule(victim, "-s", "10.0.0.0/16", "-p", "tcp", "-m", "tcp", "--dport", "30005", "-j", "CNI-HOSTPORT-SETMARK")
	tx := &iptables.Tx{}
	tx.DeleteRule(lostMark, "take")
	tx.DeleteRule(lostDNAT, "take")
	tx.AppendRule(jump("30004,30006", victim), "take")
	tx.DeleteRule(jump("30004,30005,30006", victim), "take")
	tx.DeleteRule(jump("30007", victim), "take") // a jump left without ports
	tx.DeclareChain(own, "own")
	tx.AppendRule(rule(own, "-p", "tcp", "--dport", "30005", "-j", "DNAT", "--to-destination", "10.0.0.9:80"), "own")
	tx.InsertRule(jump("30005", own), 1, "own")
	taken := map[string]nft.Taken{victim: {Handles: map[string]uint64{lostDNAT.Spec(): 7, lostMark.Spec(): 6}}}

	rest, work := splitTaken(tx, taken)
	for _, op := range rest.Ops {
		if op.Chain == victim || (iptables.Rule{Chain: op.Chain, Args: op.Args}).Target() == victim {
			t.Errorf("the payload still names the victim: %+v", op)
		}
	}
	if len(rest.Ops) != 3 {
		t.Errorf("payload: %d operations, want the 3 of the new attachment", len(rest.Ops))
	}
	w := work[victim]
	if !reflect.DeepEqual(w.handles, []uint64{6, 7}) {
		t.Errorf("handles %v, want [6 7]", w.handles)
	}
	drop := map[int]bool{}
	for _, p := range w.drop["tcp"] {
		drop[p] = true
	}
	if !reflect.DeepEqual(drop, map[int]bool{30005: true, 30007: true}) || len(w.drop) != 1 {
		t.Errorf("dropped ports %v, want tcp 30005 and 30007", w.drop)
	}
}
