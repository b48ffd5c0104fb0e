package stress

import (
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"syscall"
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
	retries, probes                                                                                     int
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
// PORTGUARD_STRESS_SEED replays a run, PORTGUARD_STRESS_OPS sets its length (default 500;
// 250 for TestCrashNFTables).
func TestCrash(t *testing.T) {
	require(t)
	runCrash(t, iptablesKernel, "TestCrash")
}

// TestCrashNFTables is TestCrash on the nftables backend. A call's changes are one netlink
// batch over both families there, and no process of its own outlives the plugin, so there
// is no shim: kills land at a random moment within the verb's usual duration (measured as
// the run goes), before or after the commit. Beyond TestCrash's checks:
//
//   - a killed call leaves both families together as before or as after it (one
//     transaction), never one of them changed alone;
//   - the guard maps agree with the claims (one guard per claimed port, none for a free
//     one), and the masquerade entries with their holders (none of an owner without claims);
//   - the same ADD or DEL, retried right after a killed one, succeeds and converges on the
//     model's "after";
//   - packets: every attachment has a pod answering its name, and after every killed call
//     (and after its retry) each TCP host port, dialled on the node's own address in both
//     families, is answered by its holder in the model, or refused when nobody holds it;
//   - the foreign iptables rules and a foreign nftables table never change, and no iptables
//     chain of portguard's appears.
func TestCrashNFTables(t *testing.T) {
	require(t, "nft", "socat")
	runCrash(t, nftablesKernel, "TestCrashNFTables")
}

func runCrash(t *testing.T, k kernel, name string) {
	seed, fixed := envInt("PORTGUARD_STRESS_SEED", time.Now().UnixNano()%1_000_000_007)
	// With packets (below) every killed call is also probed and retried: half the steps by
	// default keep the run about as long as the iptables one.
	def := int64(500)
	if k.backend != "" {
		def = 250
	}
	nops, _ := envInt("PORTGUARD_STRESS_OPS", def)
	replay := fmt.Sprintf("PORTGUARD_STRESS_SEED=%d PORTGUARD_STRESS_OPS=%d go test -count=1 -run '%s$' -v ./test/stress", seed, nops, name)
	t.Logf("seed %d (fixed by env: %v), %d operations; replay: %s", seed, fixed, nops, replay)
	rng := rand.New(rand.NewPCG(uint64(seed), 0x9e3779b97f4a7c15))

	start := time.Now()
	shim := k.backend == ""
	n := newNode(t, shim)
	n.loadForeign()
	if k.backend == "nftables" {
		n.loadForeignNFT()
	}
	first, err := k.observe(n)
	if err != nil {
		t.Fatal(err)
	}
	foreign := map[hostport.Family]string{}
	for _, f := range hostport.Families {
		foreign[f] = first.foreign(f)
	}
	atts := crashAttachments()
	byChain := map[string]*attachment{}
	for _, a := range atts {
		a.Backend = k.backend
		byChain[a.chain()] = a
	}
	// With packets (every backend but iptables, whose run stays as it was): a pod per
	// attachment answering its name on every container port. CNI_NETNS stays the node's
	// spare namespace, where no process lives, so every owner is stale to the liveness rule
	// and ADD's default conflictPolicy takes its ports over, as in the iptables run.
	packets := k.backend != ""
	if packets {
		n.crashPods(atts)
	}
	durations := map[string][]time.Duration{} // verb -> durations of calls not killed
	model := crashModel{hostport.V4: holdings{}, hostport.V6: holdings{}}
	live := map[string]bool{} // chain -> the runtime believes the attachment is up
	stats := crashStats{byVerb: map[string]int{}}
	var history []string

	fail := func(step int, what string, problems []string, obs snapshot) {
		t.Helper()
		tail := history
		if len(tail) > 40 {
			tail = tail[len(tail)-40:]
		}
		var dump strings.Builder
		if obs != nil {
			dump.WriteString(obs.dump())
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
			c.Stdin = gcConfFor(k.backend, network, ids, 10)
			after = model.without(func(ch string) bool {
				b := byChain[ch]
				return b.Network == network && !validGC[b.ID]
			})
			desc = fmt.Sprintf("GC %s valid=%v", network, names)
		}
		mark := fmt.Sprintf("%s/mark-%d", n.dir, step)
		var markAtKill string
		kill := rng.IntN(100) < 33
		if kill && !shim {
			// Within the verb's usual duration (the median of the calls not killed so
			// far, 30 ms until there is one), a quarter beyond it.
			c.Kill = true
			c.KillGroup = rng.IntN(2) == 0
			usual := 30 * time.Millisecond
			if ds := durations[verb]; len(ds) > 0 {
				sorted := append([]time.Duration(nil), ds...)
				sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
				usual = sorted[len(sorted)/2]
			}
			c.KillAfter = time.Duration(rng.Int64N(int64(usual)*5/4 + 1))
			who := "plugin"
			if c.KillGroup {
				who = "group"
			}
			desc += fmt.Sprintf(" [SIGKILL %s after %s]", who, c.KillAfter.Round(100*time.Microsecond))
		} else if kill {
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
		obs, err := k.observe(n)
		if err != nil {
			lk.Close()
			fail(step, desc+": observe: "+err.Error(), nil, nil)
		}
		lk.Close()
		if !r.Killed && r.Exit == 0 {
			durations[verb] = append(durations[verb], r.Dur)
		}

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
			case !shim:
				where = "at a random moment"
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
				have := obs.holdings(f)
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
					for _, p := range obs.verify(f, after[f], byChain) {
						problems = append(problems, "  vs after:  "+p)
					}
					for _, p := range obs.verify(f, model[f], byChain) {
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
			if k.atomic && applied > 0 && applied < changes {
				history = append(history, fmt.Sprintf("%d: %s -> killed (%s)", step, desc, where))
				fail(step, fmt.Sprintf("killed call applied %d of the %d families it changes: the batch was not one transaction", applied, changes), nil, obs)
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
			for _, p := range obs.verify(f, model[f], byChain) {
				problems = append(problems, p)
			}
			if got := obs.foreign(f); got != foreign[f] {
				problems = append(problems, fmt.Sprintf("FOREIGN: %s foreign rules changed:\nbefore\n%s\nafter\n%s", f, foreign[f], got))
			}
		}
		if len(problems) > 0 {
			fail(step, desc+" -> "+outcome, problems, obs)
		}
		if !r.Killed || !packets {
			continue
		}
		if p := n.crashProbe(atts, model); len(p) > 0 {
			fail(step, desc+" -> "+outcome+": packets disagree with the table", p, obs)
		}
		stats.probes++
		if verb != "ADD" && verb != "DEL" {
			continue
		}
		// The runtime retries the killed call: it converges on the call's "after".
		c.Kill, c.OnKill, c.LeaveOrphans = false, nil, false
		rr := n.call(c)
		stats.retries++
		if rr.Exit != 0 || rr.Err != nil {
			fail(step, desc+" retried: "+rr.String(), nil, nil)
		}
		want := model.clone()
		if verb == "ADD" {
			want = want.afterAdd(a)
			live[a.chain()] = true
		} else {
			want = want.without(func(ch string) bool { return ch == a.chain() })
		}
		if obs, err = k.observe(n); err != nil {
			fail(step, desc+" retried: observe: "+err.Error(), nil, nil)
		}
		model = want
		history = append(history, fmt.Sprintf("%d: %s retried -> %s", step, verb+" "+a.Name, rr.short()))
		for _, f := range hostport.Families {
			problems = append(problems, obs.verify(f, model[f], byChain)...)
		}
		problems = append(problems, n.crashProbe(atts, model)...)
		if len(problems) > 0 {
			fail(step, desc+" retried -> "+rr.short()+": not converged", problems, obs)
		}
	}
	took := time.Since(start)
	t.Logf("%d operations in %s (%.1f ms each): %v", stats.ops, took.Round(time.Millisecond),
		float64(took.Milliseconds())/float64(stats.ops), stats.byVerb)
	if !shim {
		t.Logf("kills: %d (%d with the whole process group, %d the plugin alone); killed calls that changed the table "+
			"applied %d (killed after their commit), not applied %d (killed before it), one family of two %d",
			stats.kills, stats.groupKills, stats.kills-stats.groupKills, stats.killedApplied, stats.killedNotApplied, stats.killedPartly)
	} else {
		t.Logf("kills: %d (%d with the whole process group, %d the plugin alone); landed before any restore %d, "+
			"while a restore was pending %d, mid-restore %d, after a restore %d; killed calls applied %d, "+
			"not applied %d, one family of two %d",
			stats.kills, stats.groupKills, stats.kills-stats.groupKills, stats.killsBeforeRestore, stats.killsRestorePending,
			stats.killsMidRestore, stats.killsAfterRestore, stats.killedApplied, stats.killedNotApplied, stats.killedPartly)
	}
	t.Logf("stale attachments left by killed calls: %d; cleared by a later ADD on their ports %d, by GC %d; takeovers %d; "+
		"killed calls whose iptables processes outlived them (holding the lock) %d (exiting as the lock came free %d)",
		stats.staleCreated, stats.staleClearedByAdd, stats.staleClearedByGC, stats.takeovers, stats.orphansHoldingLock, stats.exitRaces)
	if packets {
		t.Logf("killed ADDs and DELs retried and converged: %d; packet probes after killed calls: %d", stats.retries, stats.probes)
	}
	if testing.Verbose() {
		t.Logf("last operations:\n  %s", strings.Join(history[max(0, len(history)-15):], "\n  "))
	}
}

// The crash node's pod network: a bridge with the node's addresses of both families.
const (
	crashBridge = "pgcbr0"
	crashNode4  = "198.18.30.1"
	crashNode6  = "fd00:30::1"
)

// crashPods gives every attachment a pod on the crash bridge at its addresses, answering
// its name on every container port of its mappings, over TCP in both families.
func (n *node) crashPods(atts []*attachment) {
	n.t.Helper()
	n.must("ip", "-n", n.ns, "link", "add", crashBridge, "type", "bridge")
	n.must("ip", "-n", n.ns, "addr", "add", crashNode4+"/24", "dev", crashBridge)
	n.must("ip", "-n", n.ns, "addr", "add", crashNode6+"/64", "dev", crashBridge, "nodad")
	n.must("ip", "-n", n.ns, "link", "set", crashBridge, "up")
	for k, a := range atts {
		pns := fmt.Sprintf("pgs-%s-c%d", n.id, k)
		n.addNetns(pns)
		veth := fmt.Sprintf("cv%d", k)
		n.must("ip", "-n", n.ns, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pns)
		n.must("ip", "-n", n.ns, "link", "set", veth, "master", crashBridge, "up")
		n.must("ip", "-n", pns, "addr", "add", a.IP4, "dev", "eth0")
		n.must("ip", "-n", pns, "addr", "add", fmt.Sprintf("fd00:30::%x/64", 0x10+k), "dev", "eth0", "nodad")
		n.must("ip", "-n", pns, "link", "set", "eth0", "up")
		n.must("ip", "-n", pns, "route", "add", "default", "via", crashNode4)
		n.must("ip", "-n", pns, "-6", "route", "add", "default", "via", crashNode6)
		ports := map[int]bool{}
		for _, m := range a.Maps {
			if m.Proto == "tcp" && !ports[m.CtrPort] {
				ports[m.CtrPort] = true
				// One IPv6 socket with ipv6only off takes both families.
				cmd := exec.Command("ip", "netns", "exec", pns, "socat",
					fmt.Sprintf("TCP6-LISTEN:%d,ipv6only=0,reuseaddr,fork", m.CtrPort), "EXEC:/bin/echo "+a.Name)
				cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
				cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
				if err := cmd.Start(); err != nil {
					n.t.Fatal(err)
				}
				n.mu.Lock()
				n.procs = append(n.procs, cmd)
				n.mu.Unlock()
			}
		}
		for p := range ports {
			if err := waitListening6(n, pns, p); err != nil {
				n.t.Fatalf("pod %s: %v", a.Name, err)
			}
		}
	}
}

// waitListening6 waits until something listens on TCP port in the namespace.
func waitListening6(n *node, netns string, port int) error {
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		out, _ := runCmd(5*time.Second, nil, "ip", "netns", "exec", netns, "ss", "-Hltn", fmt.Sprintf("sport = :%d", port))
		if strings.TrimSpace(out) != "" {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("nothing listens on tcp/%d after 5s", port)
}

// crashProbe dials every TCP host port of the attachments on the node's own address of
// each family, from the node, and compares who answers with the model: the holder of the
// port in that family, or nobody (the connection is refused: nothing redirects it).
func (n *node) crashProbe(atts []*attachment, model crashModel) []string {
	byChain := map[string]*attachment{}
	ports := map[int]bool{}
	for _, a := range atts {
		byChain[a.chain()] = a
		for _, m := range a.Maps {
			if m.Proto == "tcp" {
				ports[m.HostPort] = true
			}
		}
	}
	var problems []string
	for _, f := range hostport.Families {
		node := crashNode4
		if f == hostport.V6 {
			node = crashNode6
		}
		for _, p := range keysOfInt(ports) {
			want := ""
			for ch, ks := range model[f] {
				if ks["tcp/"+strconv.Itoa(p)] {
					want = byChain[ch].Name
				}
			}
			var got string
			var err error
			// Only "no answer at all" is tried again: on a loaded machine a responder's fork
			// can miss the read deadline. A wrong answer fails at once.
			for try := 0; try < 3; try++ {
				if got, err = n.dialAddr(node, p); err == nil || want == "" {
					break
				}
			}
			switch {
			case want == "" && err == nil:
				problems = append(problems, fmt.Sprintf("PACKETS: %s tcp/%d is held by nobody, yet %q answered", f, p, got))
			case want != "" && (err != nil || got != want):
				problems = append(problems, fmt.Sprintf("PACKETS: %s tcp/%d answered %q (%v), want its holder %s", f, p, got, err, want))
			}
		}
	}
	return problems
}

func keysOfInt(m map[int]bool) []int {
	out := make([]int, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Ints(out)
	return out
}
