package stress

import (
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/portguard/portguard/pkg/hostport"
)

// crashAttachments: two networks, a few ports, overlapping claims (one and two ports, TCP
// and UDP, IPv4-only and dual-stack), so ADDs keep taking ports from each other.
func crashAttachments() []*attachment {
	type spec struct {
		name, network string
		dual          bool
		maps          []mapping
	}
	specs := []spec{
		{"a0", "crash-a", false, []mapping{{"tcp", 30001, 80}}},
		{"a1", "crash-a", true, []mapping{{"tcp", 30001, 80}, {"tcp", 30002, 81}}},
		{"a2", "crash-a", false, []mapping{{"tcp", 30002, 80}, {"udp", 30001, 53}}},
		{"a3", "crash-a", false, []mapping{{"tcp", 30003, 80}}},
		{"a4", "crash-a", false, []mapping{{"udp", 30001, 53}, {"tcp", 30003, 80}}},
		{"a5", "crash-a", true, []mapping{{"tcp", 30001, 8080}}},
		{"b0", "crash-b", true, []mapping{{"tcp", 30002, 80}}},
		{"b1", "crash-b", true, []mapping{{"tcp", 30003, 80}, {"tcp", 30001, 80}}},
	}
	var out []*attachment
	for i, s := range specs {
		a := &attachment{Name: s.name, Network: s.network, ID: "crash-" + s.name,
			IP4: fmt.Sprintf("198.18.30.%d/24", 10+i), Maps: s.maps}
		if s.dual {
			a.IP6 = fmt.Sprintf("fd00:30::%x/64", 0x10+i)
		}
		out = append(out, a)
	}
	return out
}

type crashModel map[hostport.Family]holdings

func (m crashModel) clone() crashModel {
	out := crashModel{}
	for f, h := range m {
		out[f] = h.clone()
	}
	return out
}

// afterAdd: a holds all its claims; every other holder loses the conflicting ones and
// disappears when nothing remains (all claims here are on every host IP, so "conflict" is
// "same proto/port").
func (m crashModel) afterAdd(a *attachment) crashModel {
	out := m.clone()
	for _, f := range hostport.Families {
		want := a.claims(f)
		if len(want) == 0 {
			continue
		}
		for c, ks := range out[f] {
			if c == a.chain() {
				continue
			}
			for k := range want {
				delete(ks, k)
			}
			if len(ks) == 0 {
				delete(out[f], c)
			}
		}
		out[f][a.chain()] = want
	}
	return out
}

func (m crashModel) without(drop func(chain string) bool) crashModel {
	out := m.clone()
	for _, f := range hostport.Families {
		for c := range out[f] {
			if drop(c) {
				delete(out[f], c)
			}
		}
	}
	return out
}

func equalHoldings(a, b holdings) bool {
	if len(a) != len(b) {
		return false
	}
	for c, ks := range a {
		if kb, ok := b[c]; !ok || !sameKeys(ks, kb) {
			return false
		}
	}
	return true
}

type crashStats struct {
	ops, kills, groupKills, killsBeforeRestore, killsRestorePending, killsMidRestore, killsAfterRestore int
	killedApplied, killedPartly, killedNotApplied, staleCreated, staleClearedByAdd, staleClearedByGC    int
	byVerb                                                                                              map[string]int
	takeovers, orphansHoldingLock, exitRaces                                                            int
}

func envInt(name string, def int64) (int64, bool) {
	if v := os.Getenv(name); v != "" {
		if i, err := strconv.ParseInt(v, 10, 64); err == nil {
			return i, true
		}
	}
	return def, false
}

// TestCrash runs seeded random ADD/DEL/CHECK/GC calls over a few attachments sharing ports,
// SIGKILLing about a third of them at a random moment (0-40 ms; half of those with an
// iptables-restore that first sleeps 1-15 ms, so kills land before, during and after the
// restore; half killing the plugin with everything it started, half the plugin alone). After
// every call it compares both families' nat tables with a model:
//
//   - a call that was not killed must succeed (CHECK: pass exactly when the attachment holds
//     all its claims) and the kernel must equal the model after the call;
//   - a killed call must leave each family either exactly as before or exactly as after it:
//     no half-installed attachment, no lost claim, no duplicate claim;
//   - a successful ADD takes its ports from every other holder, live or stale; a successful
//     GC removes the network's attachments outside the valid list, stale ones included;
//   - foreign rules never change.
//
// The kernel is read under the portguard lock, as the next call would read it; when the
// plugin alone was killed, an iptables-restore it started may still run and must hold the
// lock until it ends (see also TestKilledCallsRestoreDoesNotLandLater).
//
// PORTGUARD_STRESS_SEED replays a run, PORTGUARD_STRESS_OPS sets its length (default 500).
func TestCrash(t *testing.T) {
	require(t)
	seed, fixed := envInt("PORTGUARD_STRESS_SEED", time.Now().UnixNano()%1_000_000_007)
	nops, _ := envInt("PORTGUARD_STRESS_OPS", 500)
	replay := fmt.Sprintf("PORTGUARD_STRESS_SEED=%d PORTGUARD_STRESS_OPS=%d go test -count=1 -run 'TestCrash$' -v ./test/stress", seed, nops)
	t.Logf("seed %d (fixed by env: %v), %d operations; replay: %s", seed, fixed, nops, replay)
	rng := rand.New(rand.NewPCG(uint64(seed), 0x9e3779b97f4a7c15))

	start := time.Now()
	n := newNode(t, true)
	n.loadForeign()
	foreign := map[hostport.Family]string{}
	for _, f := range hostport.Families {
		foreign[f] = foreignText(n.mustObserve(f).raw)
	}
	atts := crashAttachments()
	byChain := map[string]*attachment{}
	for _, a := range atts {
		byChain[a.chain()] = a
	}
	model := crashModel{hostport.V4: holdings{}, hostport.V6: holdings{}}
	live := map[string]bool{} // chain -> the runtime believes the attachment is up
	stats := crashStats{byVerb: map[string]int{}}
	var history []string

	fail := func(step int, what string, problems []string, obs map[hostport.Family]*observation) {
		t.Helper()
		tail := history
		if len(tail) > 40 {
			tail = tail[len(tail)-40:]
		}
		var dump strings.Builder
		for _, f := range hostport.Families {
			if o := obs[f]; o != nil {
				fmt.Fprintf(&dump, "--- %s nat table\n%s\n", f, o.raw)
			}
		}
		t.Fatalf("step %d: %s\n  %s\nseed %d; replay: %s\nlast operations:\n  %s\nmodel %v: %s\nmodel %v: %s\n%s",
			step, what, strings.Join(problems, "\n  "), seed, replay, strings.Join(tail, "\n  "),
			hostport.V4, model[hostport.V4].describe(byChain), hostport.V6, model[hostport.V6].describe(byChain), dump.String())
	}

	for step := 1; step <= int(nops); step++ {
		a := atts[rng.IntN(len(atts))]
		var verb string
		switch x := rng.IntN(100); {
		case x < 38:
			verb = "ADD"
		case x < 63:
			verb = "DEL"
		case x < 85:
			verb = "CHECK"
		default:
			verb = "GC"
		}
		c := callSpec{Verb: verb, ID: a.ID, Stdin: a.netConf(10, nil), Timeout: 30 * time.Second}
		after := model
		desc := verb + " " + a.Name
		var validGC map[string]bool
		network := a.Network
		switch verb {
		case "ADD":
			after = model.afterAdd(a)
		case "DEL":
			after = model.without(func(ch string) bool { return ch == a.chain() })
		case "GC":
			c.ID = ""
			validGC = map[string]bool{}
			var ids, names []string
			for _, b := range atts {
				if b.Network == network && live[b.chain()] && rng.IntN(5) != 0 {
					validGC[b.ID] = true
					ids = append(ids, b.ID)
					names = append(names, b.Name)
				}
			}
			c.Stdin = gcConf(network, ids, 10)
			after = model.without(func(ch string) bool {
				b := byChain[ch]
				return b.Network == network && !validGC[b.ID]
			})
			desc = fmt.Sprintf("GC %s valid=%v", network, names)
		}
		mark := fmt.Sprintf("%s/mark-%d", n.dir, step)
		var markAtKill string
		if rng.IntN(100) < 33 {
			c.Kill = true
			c.KillAfter = time.Duration(rng.IntN(41)) * time.Millisecond
			c.KillGroup = rng.IntN(2) == 0
			c.Env = append(c.Env, "PGS_MARK="+mark)
			delay := ""
			if x := rng.IntN(10); x < 5 {
				ms := 1 + rng.IntN(15)
				if x == 0 && !c.KillGroup {
					ms = 40 + rng.IntN(61) // an orphaned restore that outlives the kill
				}
				delay = fmt.Sprintf("0.%03d", ms)
				c.Env = append(c.Env, "PGS_RESTORE_DELAY="+delay)
				delay = ", restore delayed " + delay + "s"
			}
			c.OnKill = func() { b, _ := os.ReadFile(mark); markAtKill = string(b) }
			who := "plugin"
			if c.KillGroup {
				who = "group"
			}
			desc += fmt.Sprintf(" [SIGKILL %s after %s%s]", who, c.KillAfter, delay)
		}

		// A plugin killed alone may leave its iptables-restore running: the test does not
		// wait for it, it reads the kernel under the portguard lock, as the next call would.
		c.LeaveOrphans = c.Kill && !c.KillGroup
		r := n.call(c)
		stats.ops++
		stats.byVerb[verb]++
		if r.Err != nil {
			fail(step, desc+": "+r.String(), nil, nil)
		}
		if r.Killed && c.LeaveOrphans && verb != "CHECK" && groupAlive(r.Pgid) {
			// Something the killed plugin started still runs: it must hold the lock.
			if lk, err := n.takeLock(0); err == nil {
				// A child that just closed its files (and with them the lock) on exit is
				// not a zombie yet: give exits a moment. An orphan that goes on running
				// without the lock is the bug.
				members := groupMembers(r.Pgid)
				gone := waitGroupGone(r.Pgid, 50*time.Millisecond) == nil
				lk.Close()
				if !gone {
					waitGroupGone(r.Pgid, 20*time.Second)
					fail(step, fmt.Sprintf("%s: processes started by the killed call %v were still running while the portguard lock was free "+
						"(an orphaned iptables-restore can land after the next call has read the table)", desc, members), nil, nil)
				}
				stats.exitRaces++
			} else {
				stats.orphansHoldingLock++
			}
		}
		lk, err := n.takeLock(20 * time.Second)
		if err != nil {
			fail(step, desc+": "+err.Error(), nil, nil)
		}
		if r.Killed && verb == "CHECK" {
			// CHECK takes no lock and its payload only asserts (-C): let it finish.
			waitGroupGone(r.Pgid, 20*time.Second)
		}
		if r.Killed && groupAlive(r.Pgid) {
			members := groupMembers(r.Pgid)
			lk.Close()
			waitGroupGone(r.Pgid, 20*time.Second)
			fail(step, fmt.Sprintf("%s: processes started by the killed call %v were still running when the portguard lock was free "+
				"(an orphaned iptables-restore can land after the next call has read the table)", desc, members), nil, nil)
		}
		obs := map[hostport.Family]*observation{}
		for _, f := range hostport.Families {
			o, err := n.observe(f)
			if err != nil {
				lk.Close()
				fail(step, desc+": observe: "+err.Error(), nil, obs)
			}
			obs[f] = o
		}
		lk.Close()

		next := after
		outcome := r.short()
		if r.Killed {
			stats.kills++
			if c.KillGroup {
				stats.groupKills++
			}
			s, x, d := strings.Count(markAtKill, "s "), strings.Count(markAtKill, "x "), strings.Count(markAtKill, "d ")
			where := ""
			switch {
			case s == 0:
				stats.killsBeforeRestore++
				where = "before any restore"
			case x < s:
				stats.killsRestorePending++
				where = "restore pending"
			case d < x:
				stats.killsMidRestore++
				where = "mid-restore"
			default:
				stats.killsAfterRestore++
				where = "after a restore"
			}
			// Each family is as before the call or as after it; adopt what the kernel shows.
			next = crashModel{}
			applied := 0
			var problems []string
			for _, f := range hostport.Families {
				have := kernelHoldings(obs[f].s)
				switch {
				case equalHoldings(have, after[f]):
					next[f] = after[f]
					if !equalHoldings(after[f], model[f]) {
						applied++
					}
				case equalHoldings(have, model[f]):
					next[f] = model[f]
				default:
					problems = append(problems, fmt.Sprintf("%s is neither as before nor as after the killed call:", f))
					for _, p := range verify(obs[f], after[f], byChain) {
						problems = append(problems, "  vs after:  "+p)
					}
					for _, p := range verify(obs[f], model[f], byChain) {
						problems = append(problems, "  vs before: "+p)
					}
				}
			}
			if len(problems) > 0 {
				history = append(history, fmt.Sprintf("%d: %s -> %s (%s)", step, desc, outcome, where))
				fail(step, "killed call left the kernel in between", problems, obs)
			}
			changes := 0
			for _, f := range hostport.Families {
				if !equalHoldings(after[f], model[f]) {
					changes++
				}
			}
			switch {
			case changes == 0:
			case applied == changes:
				stats.killedApplied++
			case applied == 0:
				stats.killedNotApplied++
			default:
				stats.killedPartly++
			}
			outcome = fmt.Sprintf("killed %s after %s, %d of %d changed families applied", where, r.Dur.Round(time.Millisecond), applied, changes)
		} else {
			ok := r.Exit == 0
			if verb == "CHECK" {
				full := true
				for _, f := range hostport.Families {
					if w := a.claims(f); len(w) > 0 && !sameKeys(model[f][a.chain()], w) {
						full = false
					}
				}
				if ok != full {
					fail(step, fmt.Sprintf("%s: %s, but the attachment holds all its claims: %v", desc, r, full), nil, obs)
				}
			} else if !ok {
				fail(step, desc+": "+r.String(), nil, obs)
			}
		}

		// Stale claims: present but not live. Count those the call created and cleared.
		staleBefore := map[string]bool{}
		for _, f := range hostport.Families {
			for ch := range model[f] {
				if !live[ch] {
					staleBefore[ch] = true
				}
			}
		}
		switch {
		case verb == "ADD" && !r.Killed:
			live[a.chain()] = true
		case verb == "ADD" && r.Killed, verb == "DEL":
			delete(live, a.chain())
		case verb == "GC" && !r.Killed:
			for ch := range live {
				if b := byChain[ch]; b.Network == network && !validGC[b.ID] {
					delete(live, ch)
				}
			}
		}
		present := map[string]bool{}
		for _, f := range hostport.Families {
			for ch := range next[f] {
				present[ch] = true
			}
		}
		for ch := range present {
			if !live[ch] && !staleBefore[ch] {
				stats.staleCreated++
			}
		}
		if !r.Killed {
			for ch := range staleBefore {
				if !present[ch] {
					if verb == "GC" {
						stats.staleClearedByGC++
					} else if verb == "ADD" {
						stats.staleClearedByAdd++
					}
				}
			}
			if verb == "ADD" {
				for _, f := range hostport.Families {
					for ch := range model[f] {
						if ch != a.chain() && !equalHoldings(holdings{ch: model[f][ch]}, holdings{ch: next[f][ch]}) {
							stats.takeovers++
						}
					}
				}
			}
		}
		model = next
		history = append(history, fmt.Sprintf("%d: %s -> %s", step, desc, outcome))
		if len(history) > 1000 {
			history = history[len(history)-100:]
		}
		if nops >= 2000 && step%1000 == 0 {
			t.Logf("step %d of %d after %s: %d kills so far", step, nops, time.Since(start).Round(time.Second), stats.kills)
		}

		// The kernel equals the model, whatever happened.
		var problems []string
		for _, f := range hostport.Families {
			for _, p := range verify(obs[f], model[f], byChain) {
				problems = append(problems, p)
			}
			if got := foreignText(obs[f].raw); got != foreign[f] {
				problems = append(problems, fmt.Sprintf("FOREIGN: %s foreign rules changed:\nbefore\n%s\nafter\n%s", f, foreign[f], got))
			}
		}
		if len(problems) > 0 {
			fail(step, desc+" -> "+outcome, problems, obs)
		}
	}
	took := time.Since(start)
	t.Logf("%d operations in %s (%.1f ms each): %v", stats.ops, took.Round(time.Millisecond),
		float64(took.Milliseconds())/float64(stats.ops), stats.byVerb)
	t.Logf("kills: %d (%d with the whole process group, %d the plugin alone); landed before any restore %d, "+
		"while a restore was pending %d, mid-restore %d, after a restore %d; killed calls applied %d, "+
		"not applied %d, one family of two %d",
		stats.kills, stats.groupKills, stats.kills-stats.groupKills, stats.killsBeforeRestore, stats.killsRestorePending,
		stats.killsMidRestore, stats.killsAfterRestore, stats.killedApplied, stats.killedNotApplied, stats.killedPartly)
	t.Logf("stale attachments left by killed calls: %d; cleared by a later ADD on their ports %d, by GC %d; takeovers %d; "+
		"killed calls whose iptables processes outlived them (holding the lock) %d (exiting as the lock came free %d)",
		stats.staleCreated, stats.staleClearedByAdd, stats.staleClearedByGC, stats.takeovers, stats.orphansHoldingLock, stats.exitRaces)
	if testing.Verbose() {
		t.Logf("last operations:\n  %s", strings.Join(history[max(0, len(history)-15):], "\n  "))
	}
}
