package engine

import (
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/portguard/portguard/pkg/backend"
	iptbackend "github.com/portguard/portguard/pkg/backend/iptables"
	"github.com/portguard/portguard/pkg/config"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/iptables/iptablestest"
	"github.com/portguard/portguard/pkg/lock"
	"github.com/portguard/portguard/pkg/plan"
	"github.com/portguard/portguard/pkg/state"
)

// These tests run the engine in-process against iptablestest's stateful nat table, so the
// paths that only a table changing under the engine reaches (plan again, retry, take the
// exclusive lock) run without root. The netlink paths are off: the runner is not Exec.

const v4 = hostport.V4

func fakeEngine(t *testing.T) (*Engine, *iptablestest.Kernel) {
	t.Helper()
	k, err := iptablestest.New(nil)
	if err != nil {
		t.Fatal(err)
	}
	return &Engine{Backend: &iptbackend.Backend{Runner: k}, LockPath: filepath.Join(t.TempDir(), "lock"), LockTimeout: 5 * time.Second}, k
}

func owner(id string) hostport.Owner { return hostport.Owner{Network: "knet", ContainerID: id} }

const (
	m8080 = `{"hostPort":8080,"containerPort":80,"protocol":"tcp"}`
	m9090 = `{"hostPort":9090,"containerPort":90,"protocol":"tcp"}`
)

func mustAdd(t *testing.T, e *Engine, c *config.Config, id string) []backend.Takeover {
	t.Helper()
	tk, err := e.Add(c, owner(id))
	if err != nil {
		t.Fatalf("ADD %s: %v", id, err)
	}
	return tk
}

// healthy asserts that the IPv4 table audits clean (shared layout whole, no shadowed
// claim, no orphan chain) and returns the owners of the claims on each host port.
func healthy(t *testing.T, k *iptablestest.Kernel) map[int][]string {
	t.Helper()
	s, err := state.ObserveAll(k, v4)
	if err != nil {
		t.Fatal(err)
	}
	fa := plan.Audit(s)
	if !fa.Healthy() {
		t.Fatalf("audit: %+v\n%s", fa.Problems, k.Dump(v4))
	}
	out := map[int][]string{}
	for _, p := range fa.Ports {
		for _, c := range p.Claims {
			out[p.HostPort] = append(out[p.HostPort], c.ContainerID)
		}
	}
	return out
}

func claims(t *testing.T, k *iptablestest.Kernel, want map[int][]string) {
	t.Helper()
	got := healthy(t, k)
	if len(got) != len(want) {
		t.Fatalf("claims %v, want %v\n%s", got, want, k.Dump(v4))
	}
	for port, ids := range want {
		if !slices.Equal(got[port], ids) {
			t.Fatalf("claims %v, want %v\n%s", got, want, k.Dump(v4))
		}
	}
}

// lockModes records, at each restore, whether the engine held the lock exclusively (a
// shared lock cannot be had beside it) or shared.
func lockModes(t *testing.T, e *Engine, k *iptablestest.Kernel) *[]string {
	var modes []string
	k.BeforeRestore = func(hostport.Family, string) {
		l, err := lock.Acquire(e.LockPath, lock.Shared, 20*time.Millisecond)
		if err != nil {
			modes = append(modes, "exclusive")
			return
		}
		l.Release()
		modes = append(modes, "shared")
	}
	return &modes
}

func count(calls []string, prefix string) int {
	n := 0
	for _, c := range calls {
		if strings.HasPrefix(c, prefix) {
			n++
		}
	}
	return n
}

// On a node without the shared layout, the ADD under the shared lock plans, sees that it
// must create the layout, and starts over under the exclusive lock before writing
// anything; once the layout is there, ADDs write under the shared lock.
func TestAddCreatesSharedLayoutUnderExclusiveLock(t *testing.T) {
	e, k := fakeEngine(t)
	modes := lockModes(t, e, k)
	mustAdd(t, e, conf(t, "", m8080, "10.99.0.5/16"), "c1")
	if !slices.Equal(*modes, []string{"exclusive"}) {
		t.Fatalf("restores ran under %v, want one under the exclusive lock", *modes)
	}
	if got := count(k.Calls(), "list ipv4 "+state.DNATChain); got != 2 {
		t.Fatalf("%s read %d times, want twice (shared, then exclusive): %v", state.DNATChain, got, k.Calls())
	}
	mustAdd(t, e, conf(t, "", m9090, "10.99.0.6/16"), "c2")
	if !slices.Equal(*modes, []string{"exclusive", "shared"}) {
		t.Fatalf("restores ran under %v; the second ADD needs no exclusive lock", *modes)
	}
	claims(t, k, map[int][]string{8080: {"c1"}, 9090: {"c2"}})
}

// A shared rule removed by an outside writer: the ADD (shared lock, CNI-HOSTPORT-DNAT read
// only) asserts it, the payload is refused, the engine reads the shared chains, finds the
// rule must be restored, and does so under the exclusive lock.
func TestAddRestoresSharedRuleRemovedBehindItsBack(t *testing.T) {
	e, k := fakeEngine(t)
	mustAdd(t, e, conf(t, "", m8080, "10.99.0.5/16"), "c1")
	if err := k.Apply(v4, "*nat\n-F "+state.SetMarkChain+"\nCOMMIT\n"); err != nil {
		t.Fatal(err)
	}
	modes := lockModes(t, e, k)
	k.ResetCalls()
	mustAdd(t, e, conf(t, "", m9090, "10.99.0.6/16"), "c2")
	// The exclusive pass reads CNI-HOSTPORT-DNAT only again, so its first payload asserts
	// the rule again and is refused too before the full read.
	if !slices.Equal(*modes, []string{"shared", "exclusive", "exclusive"}) {
		t.Fatalf("restores under %v, want the asserting one shared and the restoring one exclusive", *modes)
	}
	if res := k.Results(v4); res[0] == nil || res[len(res)-1] != nil {
		t.Fatalf("restore results %v: want the first refused and the last applied", res)
	}
	if !strings.Contains(k.Payloads(v4)[0], "-C "+state.SetMarkChain) {
		t.Fatalf("first payload does not assert the SETMARK rule:\n%s", k.Payloads(v4)[0])
	}
	claims(t, k, map[int][]string{8080: {"c1"}, 9090: {"c2"}})
}

// A takeover plans, finds a claim on its port whose chain it has not read, reads it and
// plans again; the whole victim goes, and OnTakeover hears of it.
func TestAddTakeoverReadsVictimAndPlansAgain(t *testing.T) {
	e, k := fakeEngine(t)
	mustAdd(t, e, conf(t, "", m8080, "10.99.0.5/16"), "c1")
	var heard []backend.Takeover
	e.OnTakeover = func(tk backend.Takeover) { heard = append(heard, tk) }
	k.ResetCalls()
	tk := mustAdd(t, e, conf(t, "", m8080, "10.99.0.6/16"), "c2")
	victim := hostport.ChainName(owner("c1"))
	want := []string{"list ipv4 " + state.DNATChain, "list ipv4 " + victim, "restore ipv4"}
	if got := k.Calls(); !slices.Equal(got, want) {
		t.Fatalf("calls %v, want %v", got, want)
	}
	if len(tk) != 1 || tk[0].From != owner("c1") || !tk[0].ChainRemoved || len(heard) != 1 {
		t.Fatalf("takeovers %+v, heard %+v", tk, heard)
	}
	if k.Has(v4, victim) {
		t.Fatal("the victim's chain is left")
	}
	claims(t, k, map[int][]string{8080: {"c2"}})
}

// Two partial takeovers of one victim race (ADDs of different ports run in parallel): c2
// takes 8080 from c1 (which also holds 9090) and asserts that c1 keeps 9090; between its
// read and its write, c3 takes 9090. c2's payload is refused, and c2 plans again from a
// fresh read: now c1 loses everything, so its chain goes instead of being left empty.
func TestAddRetriesAfterParallelTakeoverOfTheSameVictim(t *testing.T) {
	e, k := fakeEngine(t)
	mustAdd(t, e, conf(t, "", m8080+","+m9090, "10.99.0.5/16"), "c1")
	other := &Engine{Backend: &iptbackend.Backend{Runner: k}, LockPath: e.LockPath, LockTimeout: e.LockTimeout}
	raced := false
	k.BeforeRestore = func(f hostport.Family, payload string) {
		if raced {
			return
		}
		raced = true
		if _, err := other.Add(conf(t, "", m9090, "10.99.0.7/16"), owner("c3")); err != nil {
			t.Errorf("c3's parallel ADD: %v", err)
		}
	}
	k.ResetCalls()
	tk := mustAdd(t, e, conf(t, "", m8080, "10.99.0.6/16"), "c2")
	// Payloads in the order given: c2's first (refused: c3 took 9090 from c1 meanwhile), c3's, c2's second.
	res := k.Results(v4)
	var re *iptables.RestoreError
	if len(res) != 3 || !errors.As(res[0], &re) || res[1] != nil || res[2] != nil {
		t.Fatalf("restore results %v, want c2's first refused, then c3's and c2's second applied", res)
	}
	if first := k.Payloads(v4)[0]; !strings.Contains(first, "-C "+hostport.ChainName(owner("c1"))) {
		t.Fatalf("c2's first payload does not assert what c1 keeps:\n%s", first)
	}
	if len(tk) != 1 || !tk[0].ChainRemoved {
		t.Fatalf("c2's takeover %+v: c1 keeps nothing, its chain must go", tk)
	}
	if k.Has(v4, hostport.ChainName(owner("c1"))) {
		t.Fatalf("c1's chain is left:\n%s", k.Dump(v4))
	}
	claims(t, k, map[int][]string{8080: {"c2"}, 9090: {"c3"}})
}

// A payload that keeps being refused ends the ADD with an error that names what the
// failing line was for.
func TestAddGivesUpExplainingTheRefusedLine(t *testing.T) {
	e, k := fakeEngine(t)
	mustAdd(t, e, conf(t, "", m8080+","+m9090, "10.99.0.5/16"), "c1")
	victim := hostport.ChainName(owner("c1"))
	// Another writer keeps changing the victim's 9090 rule behind every read.
	k.BeforeRestore = func(f hostport.Family, _ string) {
		for _, r := range k.Rules(f, victim) {
			if r.Value("--dport") == "9090" && r.Target() == "DNAT" {
				dest := "10.99.0.5:91"
				if r.Value("--to-destination") == dest {
					dest = "10.99.0.5:90"
				}
				if err := k.Apply(f, "*nat\n-D "+victim+" "+r.Spec()+"\n-A "+victim+" "+r.WithValue("--to-destination", dest).Spec()+"\nCOMMIT\n"); err != nil {
					t.Error(err)
				}
				return
			}
		}
	}
	_, err := e.Add(conf(t, "", m8080, "10.99.0.6/16"), owner("c2"))
	if err == nil || !strings.Contains(err.Error(), victim+" still holds") {
		t.Fatalf("want an error naming the refused assertion, got %v", err)
	}
	if got := count(k.Calls(), "restore ipv4"); got != 1+5 {
		t.Fatalf("%d restores: one ADD and five attempts expected", got)
	}
}

// The common DEL reads nothing: one payload removes the jumps and the chain.
func TestDelBlind(t *testing.T) {
	e, k := fakeEngine(t)
	c := conf(t, "", m8080, "10.99.0.5/16")
	mustAdd(t, e, c, "c1")
	mustAdd(t, e, conf(t, "", m9090, "10.99.0.6/16"), "c2")
	k.ResetCalls()
	if err := e.Del(c, owner("c1")); err != nil {
		t.Fatal(err)
	}
	if got := k.Calls(); !slices.Equal(got, []string{"restore ipv4"}) {
		t.Fatalf("calls %v, want one restore and no read", got)
	}
	claims(t, k, map[int][]string{9090: {"c2"}})
	if k.Has(v4, hostport.ChainName(owner("c1"))) {
		t.Fatal("chain left")
	}
	// A second DEL finds nothing to remove and succeeds.
	if err := e.Del(c, owner("c1")); err != nil {
		t.Fatalf("repeated DEL: %v", err)
	}
	claims(t, k, map[int][]string{9090: {"c2"}})
}

// DEL whose blind payload cannot work reads the table under the exclusive lock: the
// victim of a partial takeover (its jump rewritten to the port it kept), and a DEL without
// portMappings.
func TestDelSlowPath(t *testing.T) {
	e, k := fakeEngine(t)
	c1 := conf(t, "", m8080+","+m9090, "10.99.0.5/16")
	mustAdd(t, e, c1, "c1")
	mustAdd(t, e, conf(t, "", m8080, "10.99.0.6/16"), "c2")
	claims(t, k, map[int][]string{8080: {"c2"}, 9090: {"c1"}})
	modes := lockModes(t, e, k)
	k.ResetCalls()
	if err := e.Del(c1, owner("c1")); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(*modes, []string{"shared", "exclusive"}) || count(k.Calls(), "list ipv4") == 0 {
		t.Fatalf("restores under %v, calls %v: want the blind one refused, then a read and a planned one", *modes, k.Calls())
	}
	claims(t, k, map[int][]string{8080: {"c2"}})
	if k.Has(v4, hostport.ChainName(owner("c1"))) {
		t.Fatal("c1's chain left")
	}

	// Without portMappings the jumps are unknown: read, then remove.
	k.BeforeRestore = nil
	c2 := conf(t, "", "", "10.99.0.6/16")
	k.ResetCalls()
	if err := e.Del(c2, owner("c2")); err != nil {
		t.Fatal(err)
	}
	if calls := k.Calls(); calls[0] != "list ipv4 "+state.DNATChain {
		t.Fatalf("calls %v", calls)
	}
	claims(t, k, map[int][]string{})
	if k.Has(v4, hostport.ChainName(owner("c2"))) {
		t.Fatal("c2's chain left")
	}
}

// GC removes the network's attachments that are not valid, keeps the valid ones and other
// networks', and removes a chain known only from the runtime's cache.
func TestGC(t *testing.T) {
	e, k := fakeEngine(t)
	mustAdd(t, e, conf(t, "", m8080, "10.99.0.5/16"), "c1")
	mustAdd(t, e, conf(t, "", m9090, "10.99.0.6/16"), "c2")
	c3, err := config.Parse([]byte(`{"cniVersion":"1.0.0","name":"other","type":"portguard",
		"runtimeConfig":{"portMappings":[{"hostPort":7070,"containerPort":70,"protocol":"tcp"}]},
		"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.99.0.7/16"}]}}`), "eth0")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.Add(c3, hostport.Owner{Network: "other", ContainerID: "c1"}); err != nil {
		t.Fatal(err)
	}
	orphan := hostport.ChainName(owner("gone"))
	if err := k.Apply(v4, "*nat\n:"+orphan+" - [0:0]\n-A "+orphan+" -p tcp -m tcp --dport 6060 -j DNAT --to-destination 10.99.0.9:60\nCOMMIT\n"); err != nil {
		t.Fatal(err)
	}
	removed, err := e.GC("knet", map[string]bool{"c2": true}, []hostport.Owner{owner("gone")})
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(removed, func(a, b hostport.Owner) int { return strings.Compare(a.ContainerID, b.ContainerID) })
	if !slices.Equal(removed, []hostport.Owner{owner("c1"), owner("gone")}) {
		t.Fatalf("removed %v", removed)
	}
	if k.Has(v4, orphan) || k.Has(v4, hostport.ChainName(owner("c1"))) {
		t.Fatalf("GC left chains:\n%s", k.Dump(v4))
	}
	claims(t, k, map[int][]string{9090: {"c2"}, 7070: {"c1"}})
}

// CHECK passes right after ADD and names the rule another writer removed.
func TestCheckAfterAddAndAfterOutsideChange(t *testing.T) {
	e, k := fakeEngine(t)
	c := conf(t, "", m8080, "10.99.0.5/16")
	mustAdd(t, e, c, "c1")
	if err := e.Check(c, owner("c1")); err != nil {
		t.Fatalf("CHECK after ADD: %v", err)
	}
	chain := hostport.ChainName(owner("c1"))
	rs := k.Rules(v4, chain)
	if err := k.Apply(v4, "*nat\n-D "+chain+" "+rs[len(rs)-1].Spec()+"\nCOMMIT\n"); err != nil {
		t.Fatal(err)
	}
	if err := e.Check(c, owner("c1")); err == nil || !strings.Contains(err.Error(), "CHECK of") {
		t.Fatalf("CHECK with the DNAT rule gone: %v", err)
	}
}

// xtablesLocked is a nat table whose every iptables-restore times out on the xtables lock
// (iptables-legacy beside a busy kube-proxy).
type xtablesLocked struct{ *iptablestest.Kernel }

func (xtablesLocked) Restore(hostport.Family, string) error {
	return fmt.Errorf("%w after 5s", iptables.ErrXtablesLock)
}

// The xtables lock held too long is CNI error 11 (try again later), for ADD and DEL alike:
// the backend marks it busy, the engine gives it its code.
func TestXtablesLockIsTryAgainLater(t *testing.T) {
	e, k := fakeEngine(t)
	e.Backend = &iptbackend.Backend{Runner: xtablesLocked{k}}
	c := conf(t, "", m8080, "10.99.0.5/16")
	var ce *types.Error
	if _, err := e.Add(c, owner("c1")); !errors.As(err, &ce) || ce.Code != types.ErrTryAgainLater || !strings.Contains(ce.Msg, "xtables lock") {
		t.Fatalf("ADD: want CNI error 11 naming the xtables lock, got %#v", err)
	}
	if err := e.Del(c, owner("c1")); !errors.As(err, &ce) || ce.Code != types.ErrTryAgainLater {
		t.Fatalf("DEL: want CNI error 11, got %#v", err)
	}
}

// Collect removes exactly the owners given, whatever else the network holds: every other
// container ID that present reports under the lock is valid, including one added after the
// caller decided (c3 here, which the caller never saw), and a network of another name is
// untouched.
func TestCollectRemovesOnlyTheOwnersGiven(t *testing.T) {
	e, k := fakeEngine(t)
	mustAdd(t, e, conf(t, "", m8080, "10.99.0.5/16"), "c1")
	mustAdd(t, e, conf(t, "", m9090, "10.99.0.6/16"), "c2")
	var presentCalls int
	present := func(network string) (map[string]bool, error) {
		presentCalls++
		if network != "knet" {
			t.Errorf("present(%q)", network)
		}
		// What the node holds now, read under the lock: c3 was added since the decision.
		held := map[string]bool{"c1": true, "c2": true, "c3": true}
		return held, nil
	}
	if err := k.Apply(v4, "*nat\n:"+hostport.ChainName(owner("c3"))+" - [0:0]\n-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment \"dnat name: \\\"knet\\\" id: \\\"c3\\\"\" -m multiport --dports 7070 -j "+hostport.ChainName(owner("c3"))+"\n-A "+hostport.ChainName(owner("c3"))+" -p tcp -m tcp --dport 7070 -j DNAT --to-destination 10.99.0.7:70\nCOMMIT\n"); err != nil {
		t.Fatal(err)
	}
	removed, err := e.Collect([]hostport.Owner{owner("c1")}, present)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(removed, []hostport.Owner{owner("c1")}) || presentCalls != 1 {
		t.Fatalf("removed %v, present called %d times", removed, presentCalls)
	}
	claims(t, k, map[int][]string{9090: {"c2"}, 7070: {"c3"}})
	if removed, err := e.Collect(nil, present); err != nil || len(removed) != 0 || presentCalls != 1 {
		t.Fatalf("Collect of nobody: %v %v (present called %d times)", removed, err, presentCalls)
	}
}
