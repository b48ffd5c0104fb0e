package takeover

import (
	"fmt"
	"strings"
	"sync"
	"testing"

	tb "github.com/portguard/portguard/test/testbed"
)

// conflictPolicy reject: the second claim on 8080 fails with a CNI error naming the owner
// (network, container ID, pod IP:port), and the nat tables are exactly as before.
func TestRejectPolicyNamesOwnerAndChangesNothing(t *testing.T) {
	b := newBed(t)
	n, _ := pgNet(b, tb.NetConfig{}, map[string]any{"conflictPolicy": "reject"})
	a := b.NewPod("A")
	n.MustAdd(a, tb.TCP(8080, 80))
	a.Serve(80)
	before := map[tb.Family]string{}
	for _, f := range families {
		before[f] = normalizedNAT(t, b, f)
	}

	p := b.NewPod("B")
	res, err := n.Add(p, tb.TCP(8080, 80))
	if err == nil {
		t.Fatalf("ADD of a second claim on 8080 under conflictPolicy reject succeeded:\n%s", res.Stdout)
	}
	msg := err.Error()
	t.Logf("reject error: %s", msg)
	for _, want := range []string{n.Name, a.ContainerID, hostPort(a.IP4, 80)} {
		if !strings.Contains(msg, want) {
			t.Errorf("reject error does not name %q: %s", want, msg)
		}
	}
	for _, f := range families {
		if after := normalizedNAT(t, b, f); after != before[f] {
			t.Errorf("%s nat table changed by a rejected ADD:\nbefore:\n%s\nafter:\n%s", f, before[f], after)
		}
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8080, "A")
	}
	if err := n.Check(a); err != nil {
		t.Errorf("CHECK of the owner after the rejected ADD: %v", err)
	}
}

// A hand-made chain in upstream portmap's exact format, inserted before ours in
// CNI-HOSTPORT-DNAT, shadows the pod: CHECK fails naming it; the next ADD of the pod takes
// it over and CHECK passes again.
func TestCheckFailsOnShadowingUpstreamChain(t *testing.T) {
	b := newBed(t)
	n, _ := pgNet(b, tb.NetConfig{IPv4Only: true}, nil)
	p := b.NewPod("P")
	addRes := n.MustAdd(p, tb.TCP(8080, 80))
	p.Serve(80)
	g := b.NewPod("ghost") // the address the shadowing chain sends 8080 to
	n.MustAdd(g)
	g.Serve(80)
	if err := n.Check(p); err != nil {
		t.Fatalf("CHECK right after ADD: %v", err)
	}
	wantAnswer(t, b, "tcp", b.NodeIP4, 8080, "P")

	const ghostNet, ghostID = "other-net", "ghost-0001"
	ghost := tb.ChainName(ghostNet, ghostID)
	b.MustRestoreNAT(tb.V4, fmt.Sprintf(`:%[1]s - [0:0]
-A %[1]s -s %[2]s -p tcp -m tcp --dport 8080 -j CNI-HOSTPORT-SETMARK
-A %[1]s -s 127.0.0.1/32 -p tcp -m tcp --dport 8080 -j CNI-HOSTPORT-SETMARK
-A %[1]s -p tcp -m tcp --dport 8080 -j DNAT --to-destination %[3]s
-I CNI-HOSTPORT-DNAT 1 -p tcp -m comment --comment "dnat name: \"%[4]s\" id: \"%[5]s\"" -m multiport --dports 8080 -j %[1]s`,
		ghost, n.Subnet4, hostPort(g.IP4, 80), ghostNet, ghostID))
	// The hand-made chain really shadows the pod.
	wantAnswer(t, b, "tcp", b.NodeIP4, 8080, "ghost")

	err := n.Check(p)
	if err == nil {
		t.Fatalf("CHECK passed while %s shadows the pod:\n%s", ghost, strings.Join(b.HostportJumps(tb.V4), "\n"))
	}
	t.Logf("CHECK error: %v", err)
	if !strings.Contains(err.Error(), ghost) {
		t.Errorf("CHECK error does not name the shadowing chain %s: %v", ghost, err)
	}

	res, err := reAdd(t, b, n, p, addRes.Stdout, tb.TCP(8080, 80))
	if err != nil {
		t.Fatalf("ADD again: %v", err)
	}
	if err := n.Check(p); err != nil {
		t.Errorf("CHECK after the next ADD: %v", err)
	}
	wantChains(t, b, tb.V4, p.Chain(n))
	wantAnswer(t, b, "tcp", b.NodeIP4, 8080, "P")
	if evs := takeoverEvents(res.Stderr); len(evs) != 1 || evs[0].Takeover.From != (owner{ghostNet, ghostID}) {
		t.Errorf("want one takeover from %s/%s:\n%s", ghostNet, ghostID, res.Stderr)
	}
}

// GC (CNI 1.1.0) with cni.dev/valid-attachments: a partial list keeps the listed pod and
// removes the others of this network; an empty list removes the rest; another network's
// chains (written by upstream portmap) are never touched. Finally `cnitool gc` (DEL of
// cached attachments, then GC with no valid list) leaves the other network alone too.
func TestGC(t *testing.T) {
	b := newBed(t)
	n, logFile := pgNet(b, tb.NetConfig{}, nil)
	other := b.Network(tb.NetConfig{PortPlugin: "portmap", Bridge: "cni1"}) // upstream
	pods := []*tb.Pod{b.NewPod("P1"), b.NewPod("P2"), b.NewPod("P3")}
	for i, p := range pods {
		p.Serve(80)
		n.MustAdd(p, tb.TCP(8081+i, 80))
	}
	q := b.NewPod("Q")
	q.Serve(80)
	other.MustAdd(q, tb.TCP(8090, 80))
	stale := b.NewPod("stale") // crashed: still in cnitool's cache, rules left behind
	n.MustAdd(stale, tb.TCP(8084, 80))
	stale.Kill()
	for _, f := range families {
		wantChains(t, b, f, pods[0].Chain(n), pods[1].Chain(n), pods[2].Chain(n), stale.Chain(n), q.Chain(other))
	}

	// Partial list: P1 stays.
	res, err := gcCall(t, b, n, pods[0])
	if err != nil {
		t.Fatalf("GC [P1]: %v", err)
	}
	for _, f := range families {
		wantChains(t, b, f, pods[0].Chain(n), q.Chain(other))
		wantOnlyJumps(t, b, f, map[string]int{pods[0].Chain(n): 1, q.Chain(other): 1})
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8081, "P1")
		wantNoAnswerFrom(t, b, "tcp", b.NodeIP(f), 8082, "P2")
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8090, "Q")
	}
	removed := map[string]bool{}
	states := map[string]string{}
	for _, e := range events(res.Stderr + readFile(t, logFile)) {
		if e.Event == "gc" && e.Removed != nil {
			removed[e.Removed.ContainerID] = true
			if e.Evidence != nil {
				states[e.Removed.ContainerID] = e.Evidence.State
			}
		}
	}
	// GC goes by the valid list, and logs the evidence it had: P2 and P3 still run, the
	// crashed pod's namespace is gone.
	if states[pods[1].ContainerID] != "alive" || states[stale.ContainerID] != "stale" {
		t.Errorf("GC evidence states %v: want P2 alive, stale pod stale", states)
	}
	for _, p := range []*tb.Pod{pods[1], pods[2], stale} {
		if !removed[p.ContainerID] {
			t.Errorf("GC reported no removal of %s (%s):\n%s", p.Name, p.ContainerID, res.Stderr)
		}
	}
	if err := n.Check(pods[0]); err != nil {
		t.Errorf("CHECK of the kept pod after GC: %v", err)
	}

	// Empty list: nothing of this network stays.
	if _, err := gcCall(t, b, n); err != nil {
		t.Fatalf("GC []: %v", err)
	}
	for _, f := range families {
		wantChains(t, b, f, q.Chain(other))
		wantOnlyJumps(t, b, f, map[string]int{q.Chain(other): 1})
		wantNoAnswerFrom(t, b, "tcp", b.NodeIP(f), 8081, "P1")
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8090, "Q")
	}
	if err := other.Check(q); err != nil {
		t.Errorf("upstream CHECK of the other network's pod after GC: %v", err)
	}

	// cnitool gc on a network with a live pod again.
	p4 := b.NewPod("P4")
	n.MustAdd(p4, tb.TCP(8085, 80))
	if _, err := n.GC(); err != nil {
		t.Fatalf("cnitool gc: %v", err)
	}
	for _, f := range families {
		wantChains(t, b, f, q.Chain(other))
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8090, "Q")
	}
}

// STATUS succeeds on a working node (through cnitool and called directly), without a table
// dump.
func TestStatus(t *testing.T) {
	b := newBed(t)
	n, _ := pgNet(b, tb.NetConfig{}, nil)
	p := b.NewPod("P")
	n.MustAdd(p, tb.TCP(8080, 80))
	b.ResetShim()
	if _, err := n.Status(); err != nil {
		t.Errorf("cnitool status: %v", err)
	}
	if _, err := b.PluginCall("portguard", "STATUS", pluginConf(t, n, nil)); err != nil {
		t.Errorf("portguard STATUS: %v", err)
	}
	for _, c := range b.ShimCalls() {
		if strings.Contains(c, "-save") {
			t.Errorf("STATUS dumped a table: %s", c)
		}
	}
}

// 20 pods claim 8080 at once under conflictPolicy force: every ADD succeeds, exactly one
// claim remains per family (the same pod in both), and that pod answers.
func TestParallelAddsEndWithOneClaim(t *testing.T) {
	b := newBed(t)
	n, _ := pgNet(b, tb.NetConfig{}, force)
	// Upstream bridge races on the MAC of a bridge that parallel ADDs create together (a
	// later cnitool check then fails "Bridge interface cni0 Mac doesn't match"): one pod
	// without host ports creates and pins the bridge first.
	n.MustAdd(b.NewPod("warm-up"))
	const N = 20
	pods := make([]*tb.Pod, N)
	for i := range pods {
		pods[i] = b.NewPod(fmt.Sprintf("p%02d", i))
		pods[i].Serve(80)
	}
	var wg sync.WaitGroup
	stderr := make([]string, N)
	errs := make([]error, N)
	for i, p := range pods {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := n.Add(p, tb.TCP(8080, 80))
			errs[i] = err
			if res != nil {
				stderr[i] = res.Stderr
			}
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("ADD %s: %v", pods[i].Name, err)
		}
	}
	byChain := map[string]*tb.Pod{}
	for _, p := range pods {
		byChain[p.Chain(n)] = p
	}
	var winner *tb.Pod
	for _, f := range families {
		chains := b.DNChains(f)
		if len(chains) != 1 {
			t.Errorf("%s: %d CNI-DN chains after 20 parallel ADDs on one port, want 1: %v", f, len(chains), chains)
			continue
		}
		w := byChain[chains[0]]
		if w == nil {
			t.Errorf("%s: chain %s belongs to none of the pods", f, chains[0])
			continue
		}
		if winner != nil && winner != w {
			t.Errorf("IPv4 claim held by %s, IPv6 claim by %s", winner.Name, w.Name)
		}
		winner = w
		wantOnlyJumps(t, b, f, map[string]int{w.Chain(n): 1})
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8080, w.Name)
	}
	if winner != nil {
		if err := n.Check(winner); err != nil {
			t.Errorf("CHECK of the winner %s: %v", winner.Name, err)
		}
	}
	// Every ADD after the first took over exactly one claim per family.
	if got := len(takeoverEvents(strings.Join(stderr, "\n"))); got != 2*(N-1) {
		t.Errorf("%d takeover lines in total, want %d", got, 2*(N-1))
	}
}
