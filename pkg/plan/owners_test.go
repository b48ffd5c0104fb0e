package plan

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/liveness"
)

// fakeLiveness judges owners from a table; everyone else is stale.
type fakeLiveness struct {
	states  map[hostport.Owner]liveness.State
	holders map[netip.Addr][]hostport.Owner
}

func (f fakeLiveness) Owner(o hostport.Owner, dest netip.Addr) liveness.Evidence {
	if s, ok := f.states[o]; ok {
		return liveness.Evidence{State: s, Reason: "test says " + string(s)}
	}
	return liveness.Evidence{State: liveness.Stale, Reason: "no record"}
}

func (f fakeLiveness) Holders(a netip.Addr) []hostport.Owner { return f.holders[a] }

func keptOwner(t *testing.T, text string, res RepairResult) string {
	t.Helper()
	fa := Audit(stateOf(t, applyTx(t, text, res.Tx)))
	var ids []string
	for _, pc := range fa.Ports {
		for _, c := range pc.Claims {
			ids = append(ids, c.ContainerID)
		}
	}
	return strings.Join(ids, ",")
}

// Repair keeps a live owner's claim over a stale one whatever the jump order, leaves two
// live claimants alone (reported, --keep decides), and lets --keep take a live owner's port.
func TestRepairNeverRemovesALiveClaim(t *testing.T) {
	text := blogState(t) // old (first jump) and new (last jump) both claim tcp 8080
	for _, tc := range []struct {
		name    string
		alive   map[hostport.Owner]liveness.State
		keep    map[hostport.Owner]bool
		want    string // container IDs left with a claim
		skipped string
	}{
		{"no evidence: the last jump wins", nil, nil, "new", ""},
		{"old alive, new stale: old kept", map[hostport.Owner]liveness.State{ownerOld: liveness.Alive}, nil, "old", ""},
		{"old unknown: protected like alive", map[hostport.Owner]liveness.State{ownerOld: liveness.Unknown}, nil, "old", ""},
		{"both alive: both left", map[hostport.Owner]liveness.State{ownerOld: liveness.Alive, ownerNew: liveness.Alive}, nil, "old,new", "several live claimants"},
		{"--keep the stale one over a live one", map[hostport.Owner]liveness.State{ownerOld: liveness.Alive}, map[hostport.Owner]bool{ownerNew: true}, "new", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var j Liveness
			if tc.alive != nil {
				j = fakeLiveness{states: tc.alive}
			}
			res, err := Repair(stateOf(t, text), tc.keep, j)
			if err != nil {
				t.Fatal(err)
			}
			if got := keptOwner(t, text, res); got != tc.want {
				t.Errorf("claims left: %q, want %q\n%v", got, tc.want, res.Actions)
			}
			skipped := strings.Join(res.Skipped, "\n")
			if (tc.skipped == "") != (skipped == "") || !strings.Contains(skipped, tc.skipped) {
				t.Errorf("skipped %q, want %q", skipped, tc.skipped)
			}
		})
	}
}

// Audit shows each claim's owner state and reports a stale claim whose destination now
// belongs to another live attachment; a claim whose own owner holds it is not reported.
func TestAuditOwnerStateAndAddressReuse(t *testing.T) {
	text := blogState(t) // claims of old, new and bad (the last two stale here)
	fa := Audit(stateOf(t, text))
	var dest netip.Addr
	for _, pc := range fa.Ports {
		for _, c := range pc.Claims {
			if c.ContainerID == "old" {
				dest = netip.MustParseAddrPort(c.Destination).Addr()
			}
		}
	}
	other := hostport.Owner{Network: "net", ContainerID: "reuser"}
	j := fakeLiveness{
		states:  map[hostport.Owner]liveness.State{ownerNew: liveness.Alive, other: liveness.Alive},
		holders: map[netip.Addr][]hostport.Owner{dest: {ownerOld, other}},
	}
	fa.JudgeOwners(j)
	states := map[string]string{}
	for _, pc := range fa.Ports {
		for _, c := range pc.Claims {
			states[c.ContainerID] = c.OwnerState
			if c.Evidence == nil {
				t.Errorf("claim of %s has no evidence", c.ContainerID)
			}
		}
	}
	if states["old"] != "stale" || states["new"] != "alive" {
		t.Errorf("owner states %v", states)
	}
	var reuse []Problem
	for _, p := range fa.Problems {
		if p.Kind == KindAddressReused {
			reuse = append(reuse, p)
		}
	}
	if len(reuse) != 1 || reuse[0].ContainerID != "old" || !strings.Contains(reuse[0].Message, other.String()) {
		t.Fatalf("address reuse problems %+v", reuse)
	}
	if fa.Summary.AddressReuses != 1 || fa.Summary.AliveOwners != 1 || fa.Summary.StaleOwners != 2 || fa.Summary.Problems != len(fa.Problems) {
		t.Errorf("summary %+v", fa.Summary)
	}

	// Without another live holder there is nothing to report.
	fa = Audit(stateOf(t, text))
	fa.JudgeOwners(fakeLiveness{holders: map[netip.Addr][]hostport.Owner{dest: {ownerOld, other}}})
	for _, p := range fa.Problems {
		if p.Kind == KindAddressReused {
			t.Errorf("reuse reported with a stale holder: %+v", p)
		}
	}
}
