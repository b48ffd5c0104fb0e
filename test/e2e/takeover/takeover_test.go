package takeover

import (
	"net"
	"strings"
	"testing"

	tb "github.com/portguard/portguard/test/testbed"
)

// A pod crashes (its namespace goes, no CNI DEL) and leaves its claim on 8080; the next
// pod's ADD on 8080 takes it over in both families: one CNI-DN chain, the new pod answers,
// and the takeover is reported as a JSON line on stderr and in logFile.
func TestStaleClaimAfterCrashIsTakenOver(t *testing.T) {
	b := newBed(t)
	n, logFile := pgNet(b, tb.NetConfig{}, nil)
	a := b.NewPod("A")
	n.MustAdd(a, tb.TCP(8080, 80))
	a.Serve(80)
	for _, f := range families {
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8080, "A")
	}
	aIP4 := a.IP4
	a.Kill() // no DEL

	p := b.NewPod("B")
	p.Serve(80)
	res := n.MustAdd(p, tb.TCP(8080, 80))
	for _, f := range families {
		wantChains(t, b, f, p.Chain(n))
		wantOnlyJumps(t, b, f, map[string]int{p.Chain(n): 1})
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8080, "B")
	}
	if err := n.Check(p); err != nil {
		t.Errorf("CHECK of the new pod after the takeover: %v", err)
	}

	for _, src := range []struct{ name, text string }{{"stderr", res.Stderr}, {"logFile", readFile(t, logFile)}} {
		evs := takeoverEvents(src.text)
		if len(evs) != 2 {
			t.Errorf("%s: %d takeover lines, want 2 (one per family):\n%s", src.name, len(evs), src.text)
			continue
		}
		sawDest := false
		for _, e := range evs {
			to := e.Takeover
			if to.From != (owner{n.Name, a.ContainerID}) || to.For != (owner{n.Name, p.ContainerID}) ||
				to.Chain != a.Chain(n) || !to.ChainRemoved || len(to.Claims) != 1 || to.Claims[0].HostPort != 8080 {
				t.Errorf("%s: takeover line %+v, want from %s/%s chain %s removed, for %s, claim 8080",
					src.name, *to, n.Name, a.ContainerID, a.Chain(n), p.ContainerID)
			}
			for _, d := range to.Destinations {
				if d == hostPort(aIP4, 80) {
					sawDest = true
				}
			}
		}
		if !sawDest {
			t.Errorf("%s: no takeover line names A's old destination %s:\n%s", src.name, hostPort(aIP4, 80), src.text)
		}
	}
}

// The network is renamed (conflist "net-a" becomes "net-b") while pod A still holds 8080
// under the old name: pod B's ADD under the new name takes over A's chain although its
// comment names another network.
func TestRenamedNetworkClaimIsTakenOver(t *testing.T) {
	b := newBed(t)
	na, _ := pgNet(b, tb.NetConfig{Name: "net-a", IPv4Only: true}, force)
	a := b.NewPod("A")
	na.MustAdd(a, tb.TCP(8080, 80))
	a.Serve(80)
	wantAnswer(t, b, "tcp", b.NodeIP4, 8080, "A")

	na.Remove()
	nb, logFile := pgNet(b, tb.NetConfig{Name: "net-b", IPv4Only: true, Subnet4: na.Subnet4.String()}, force)
	p := b.NewPod("B")
	p.Serve(80)
	// net-b has its own host-local store: ask for an address A does not use.
	if _, err := nb.Call("add", p, tb.CallOptions{Mappings: []tb.PortMapping{tb.TCP(8080, 80)}, IPs: []string{subnetIP(na.Subnet4, 20)}}); err != nil {
		t.Fatal(err)
	}
	if p.IP4.Equal(a.IP4) {
		t.Fatalf("B got A's address %s", a.IP4)
	}
	wantChains(t, b, tb.V4, p.Chain(nb))
	wantOnlyJumps(t, b, tb.V4, map[string]int{p.Chain(nb): 1})
	wantAnswer(t, b, "tcp", b.NodeIP4, 8080, "B")
	evs := takeoverEvents(readFile(t, logFile))
	if len(evs) != 1 || evs[0].Takeover.From != (owner{"net-a", a.ContainerID}) || evs[0].Takeover.For != (owner{"net-b", p.ContainerID}) {
		t.Errorf("takeover log, want one line from net-a/%s for net-b/%s:\n%s", a.ContainerID, p.ContainerID, readFile(t, logFile))
	}
}

// force: the mechanics of taking over claims whose owners still serve (under the default
// policy a live owner refuses the ADD; see liveness_test.go).
var force = map[string]any{"conflictPolicy": "force"}

// The old pod held 8080 and 9090; the new pod claims 8080 only: 8080 goes to the new pod,
// 9090 still reaches the old one, whose jump is rewritten to 9090 and whose chain loses its
// 8080 rules.
func TestPartialOverlapKeepsTheOtherPort(t *testing.T) {
	b := newBed(t)
	n, _ := pgNet(b, tb.NetConfig{}, force)
	old := b.NewPod("old")
	n.MustAdd(old, tb.TCP(8080, 80), tb.TCP(9090, 80))
	old.Serve(80)
	nw := b.NewPod("new")
	nw.Serve(80)
	res := n.MustAdd(nw, tb.TCP(8080, 80))

	for _, f := range families {
		wantChains(t, b, f, old.Chain(n), nw.Chain(n))
		wantOnlyJumps(t, b, f, map[string]int{old.Chain(n): 1, nw.Chain(n): 1})
		st := b.NAT(f)
		if j := st.JumpsTo("CNI-HOSTPORT-DNAT", old.Chain(n)); len(j) == 1 &&
			(!strings.Contains(j[0], "9090") || strings.Contains(j[0], "8080")) {
			t.Errorf("%s: old pod's jump not rewritten to 9090 only: %s", f, j[0])
		}
		for _, r := range st.Rules[old.Chain(n)] {
			if strings.Contains(r, "8080") {
				t.Errorf("%s: old pod's chain still has an 8080 rule: %s", f, r)
			}
		}
		if len(st.Rules[old.Chain(n)]) == 0 {
			t.Errorf("%s: old pod's chain is empty", f)
		}
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8080, "new")
		wantAnswer(t, b, "tcp", b.NodeIP(f), 9090, "old")
	}
	evs := takeoverEvents(res.Stderr)
	if len(evs) != 2 {
		t.Errorf("%d takeover lines, want 2:\n%s", len(evs), res.Stderr)
	}
	for _, e := range evs {
		if e.Takeover.ChainRemoved || e.Takeover.From.ContainerID != old.ContainerID {
			t.Errorf("takeover line %+v: want the old pod's chain kept", *e.Takeover)
		}
	}
	if err := n.Check(nw); err != nil {
		t.Errorf("CHECK of the new pod: %v", err)
	}
}

// Claims that do not conflict are never touched; wildcard vs specific host IP is a conflict.
func TestNoFalseTakeover(t *testing.T) {
	t.Parallel()

	t.Run("other protocol", func(t *testing.T) {
		b := newBed(t)
		n, _ := pgNet(b, tb.NetConfig{}, force)
		a, p := servingPods(b)
		n.MustAdd(a, tb.UDP(8080, 80))
		res := n.MustAdd(p, tb.TCP(8080, 80))
		for _, f := range families {
			wantChains(t, b, f, a.Chain(n), p.Chain(n))
			wantAnswer(t, b, "udp", b.NodeIP(f), 8080, "A")
			wantAnswer(t, b, "tcp", b.NodeIP(f), 8080, "B")
		}
		wantNoTakeover(t, res, "for another protocol")
		wantChecksPass(t, n, a, p)
	})

	t.Run("other specific host IP", func(t *testing.T) {
		b := newBed(t)
		n, _ := pgNet(b, tb.NetConfig{}, force)
		a, p := servingPods(b)
		n.MustAdd(a, tb.TCP(8080, 80).On(b.NodeIP4.String()))
		res := n.MustAdd(p, tb.TCP(8080, 80).On(b.NodeIP4Alt.String()))
		wantChains(t, b, tb.V4, a.Chain(n), p.Chain(n))
		wantChains(t, b, tb.V6) // IPv4 host IPs claim nothing in IPv6
		wantAnswer(t, b, "tcp", b.NodeIP4, 8080, "A")
		wantAnswer(t, b, "tcp", b.NodeIP4Alt, 8080, "B")
		wantNoTakeover(t, res, "for another host IP")
		wantChecksPass(t, n, a, p)
	})

	t.Run("specific host IPs of other families", func(t *testing.T) {
		b := newBed(t)
		n, _ := pgNet(b, tb.NetConfig{}, force)
		a, p := servingPods(b)
		n.MustAdd(a, tb.TCP(8080, 80).On(b.NodeIP6.String()))
		res := n.MustAdd(p, tb.TCP(8080, 80).On(b.NodeIP4.String()))
		wantChains(t, b, tb.V6, a.Chain(n))
		wantChains(t, b, tb.V4, p.Chain(n))
		wantAnswer(t, b, "tcp", b.NodeIP6, 8080, "A")
		wantAnswer(t, b, "tcp", b.NodeIP4, 8080, "B")
		wantNoTakeover(t, res, "across families")
	})

	// A dual-stack pod holds 8080 in both families; an IPv4-only pod (another network and
	// bridge) claims 8080: only the IPv4 claim is taken over, IPv6 still reaches A.
	t.Run("other family kept", func(t *testing.T) {
		b := newBed(t)
		n, _ := pgNet(b, tb.NetConfig{}, force)
		n4, _ := pgNet(b, tb.NetConfig{IPv4Only: true, Bridge: "cni1"}, force)
		a, p := servingPods(b)
		n.MustAdd(a, tb.TCP(8080, 80))
		res := n4.MustAdd(p, tb.TCP(8080, 80))
		wantChains(t, b, tb.V4, p.Chain(n4))
		wantChains(t, b, tb.V6, a.Chain(n))
		wantOnlyJumps(t, b, tb.V6, map[string]int{a.Chain(n): 1})
		wantAnswer(t, b, "tcp", b.NodeIP4, 8080, "B")
		wantAnswer(t, b, "tcp", b.NodeIP6, 8080, "A")
		if evs := takeoverEvents(res.Stderr); len(evs) != 1 || evs[0].Takeover.Destinations[0] != hostPort(a.IP4, 80) {
			t.Errorf("want one IPv4 takeover from A:\n%s", res.Stderr)
		}
	})

	// Wildcard and specific host IP overlap: that is a conflict, in both orders. The
	// loser's claim in that family goes entirely; its claim in the other family stays.
	t.Run("wildcard then specific conflicts", func(t *testing.T) {
		b := newBed(t)
		n, _ := pgNet(b, tb.NetConfig{}, force)
		a, p := servingPods(b)
		n.MustAdd(a, tb.TCP(8080, 80))
		res := n.MustAdd(p, tb.TCP(8080, 80).On(b.NodeIP4.String()))
		wantChains(t, b, tb.V4, p.Chain(n))
		wantChains(t, b, tb.V6, a.Chain(n))
		wantAnswer(t, b, "tcp", b.NodeIP4, 8080, "B")
		wantNoAnswerFrom(t, b, "tcp", b.NodeIP4Alt, 8080, "A")
		wantAnswer(t, b, "tcp", b.NodeIP6, 8080, "A")
		if evs := takeoverEvents(res.Stderr); len(evs) != 1 || evs[0].Takeover.From.ContainerID != a.ContainerID {
			t.Errorf("want one takeover from A:\n%s", res.Stderr)
		}
	})

	t.Run("specific then wildcard conflicts", func(t *testing.T) {
		b := newBed(t)
		n, _ := pgNet(b, tb.NetConfig{}, force)
		a, p := servingPods(b)
		n.MustAdd(a, tb.TCP(8080, 80).On(b.NodeIP4.String()))
		res := n.MustAdd(p, tb.TCP(8080, 80))
		wantChains(t, b, tb.V4, p.Chain(n))
		wantChains(t, b, tb.V6, p.Chain(n))
		for _, ip := range []net.IP{b.NodeIP4, b.NodeIP4Alt, b.NodeIP6} {
			wantAnswer(t, b, "tcp", ip, 8080, "B")
		}
		if evs := takeoverEvents(res.Stderr); len(evs) != 1 || evs[0].Takeover.From.ContainerID != a.ContainerID || !evs[0].Takeover.ChainRemoved {
			t.Errorf("want one takeover removing A's chain:\n%s", res.Stderr)
		}
	})
}

// The same container is added again (its sandbox was recreated) with a new address: its own
// rules are replaced, not duplicated, and the new address answers.
func TestReAddSameContainerWithNewIP(t *testing.T) {
	b := newBed(t)
	// IPv4 only: host-local refuses a second address for the same container in a range
	// unless the address is requested, and only IPv4 is requested here.
	n, _ := pgNet(b, tb.NetConfig{IPv4Only: true}, nil)
	p := b.NewPod("P")
	n.MustAdd(p, tb.TCP(8080, 80))
	oldIP := p.IP4
	p.Kill()
	p.Revive()
	res, err := n.Call("add", p, tb.CallOptions{Mappings: []tb.PortMapping{tb.TCP(8080, 80)}, IPs: []string{subnetIP(n.Subnet4, 30)}})
	if err != nil {
		t.Fatal(err)
	}
	if p.IP4.Equal(oldIP) {
		t.Fatalf("re-ADD kept the address %s", oldIP)
	}
	p.Serve(80)
	wantChains(t, b, tb.V4, p.Chain(n))
	wantOnlyJumps(t, b, tb.V4, map[string]int{p.Chain(n): 1})
	rules := strings.Join(b.NAT(tb.V4).Rules[p.Chain(n)], "\n")
	if !strings.Contains(rules, "--to-destination "+hostPort(p.IP4, 80)) || strings.Contains(rules, oldIP.String()+":") {
		t.Errorf("chain rules after re-ADD (old %s, new %s):\n%s", oldIP, p.IP4, rules)
	}
	wantAnswer(t, b, "tcp", b.NodeIP4, 8080, "P")
	if evs := takeoverEvents(res.Stderr); len(evs) != 0 {
		t.Errorf("re-ADD of the same container reported a takeover:\n%s", res.Stderr)
	}
	if err := n.Check(p); err != nil {
		t.Errorf("CHECK after re-ADD: %v", err)
	}
}

// Upstream portmap leaves the classic stale state (pod A crashed, pod B added behind A's
// chain and unreachable); a portguard ADD of pod C on the same port, with portguard dropped
// in under the name "portmap", cleans it: one chain left, C answers.
func TestUpstreamStaleStateCleanedByPortguard(t *testing.T) {
	b := newBed(t)
	n := b.Network(tb.NetConfig{PortPlugin: "portmap"}) // upstream v1.10.0
	a := b.NewPod("A")
	n.MustAdd(a, tb.TCP(8080, 80))
	a.Serve(80)
	wantAnswer(t, b, "tcp", b.NodeIP4, 8080, "A")
	a.Kill()
	p := b.NewPod("B")
	p.Serve(80)
	n.MustAdd(p, tb.TCP(8080, 80))
	for _, f := range families {
		wantChains(t, b, f, a.Chain(n), p.Chain(n))
	}
	if got, err := answer(b, "tcp", b.NodeIP4, 8080); err == nil && got == "B" {
		t.Fatalf("upstream portmap reached B through A's stale claim: precondition of this test is gone")
	}

	// B never worked and is given up on too (a live B would keep its claim: liveness_test.go).
	p.Kill()
	b.InstallPlugin("portmap", tb.PortguardBinary(t))
	c := b.NewPod("C")
	c.Serve(80)
	res := n.MustAdd(c, tb.TCP(8080, 80))
	for _, f := range families {
		wantChains(t, b, f, c.Chain(n))
		wantOnlyJumps(t, b, f, map[string]int{c.Chain(n): 1})
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8080, "C")
	}
	if evs := takeoverEvents(res.Stderr); len(evs) != 4 {
		t.Errorf("%d takeover lines, want 4 (A and B, two families):\n%s", len(evs), res.Stderr)
	}
	if err := n.Check(c); err != nil {
		t.Errorf("CHECK of C: %v", err)
	}
}

// Partial overlap against a chain written by upstream portmap: the old pod held tcp 8080,
// tcp 9090 and udp 8080; a portguard ADD (dropped in as "portmap") claims tcp 8080 only.
// tcp 9090 and udp 8080 still reach the old pod; its udp jump is untouched.
func TestPartialOverlapOfUpstreamChain(t *testing.T) {
	b := newBed(t)
	// upstream v1.10.0 ignores conflictPolicy; portguard, dropped in later, takes over from
	// the old pod although it still serves.
	n := b.Network(tb.NetConfig{PortPlugin: "portmap", PortConf: force})
	old := b.NewPod("old")
	n.MustAdd(old, tb.TCP(8080, 80), tb.TCP(9090, 80), tb.UDP(8080, 80))
	old.Serve(80)
	udpJumps := map[tb.Family][]string{}
	for _, f := range families {
		for _, j := range jumps(b, f, old.Chain(n)) {
			if strings.Contains(j, "-p udp") {
				udpJumps[f] = append(udpJumps[f], j)
			} else if !strings.Contains(j, "8080,9090") {
				t.Fatalf("%s: upstream tcp jump %q does not hold both ports: precondition gone", f, j)
			}
		}
		if len(udpJumps[f]) != 1 {
			t.Fatalf("%s: upstream wrote udp jumps %q, want one", f, udpJumps[f])
		}
	}

	b.InstallPlugin("portmap", tb.PortguardBinary(t))
	nw := b.NewPod("new")
	nw.Serve(80)
	n.MustAdd(nw, tb.TCP(8080, 80))
	for _, f := range families {
		wantChains(t, b, f, old.Chain(n), nw.Chain(n))
		var tcp, udp []string
		for _, j := range jumps(b, f, old.Chain(n)) {
			if strings.Contains(j, "-p udp") {
				udp = append(udp, j)
			} else {
				tcp = append(tcp, j)
			}
		}
		if len(tcp) != 1 || !strings.Contains(tcp[0], "9090") || strings.Contains(tcp[0], "8080") {
			t.Errorf("%s: old pod's tcp jumps %q, want one for 9090 only", f, tcp)
		}
		if strings.Join(udp, "\n") != strings.Join(udpJumps[f], "\n") {
			t.Errorf("%s: old pod's udp jump changed: %q, was %q", f, udp, udpJumps[f])
		}
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8080, "new")
		wantAnswer(t, b, "tcp", b.NodeIP(f), 9090, "old")
		wantAnswer(t, b, "udp", b.NodeIP(f), 8080, "old")
	}
	if err := n.Check(nw); err != nil {
		t.Errorf("CHECK of the new pod: %v", err)
	}
}

// servingPods makes pods A and B, each answering its name on port 80.
func servingPods(b *tb.Bed) (*tb.Pod, *tb.Pod) {
	a, p := b.NewPod("A"), b.NewPod("B")
	a.Serve(80)
	p.Serve(80)
	return a, p
}

// wantNoTakeover fails when the ADD reported taking over any claim.
func wantNoTakeover(t *testing.T, res *tb.Result, why string) {
	t.Helper()
	if evs := takeoverEvents(res.Stderr); len(evs) != 0 {
		t.Errorf("takeover reported %s:\n%s", why, res.Stderr)
	}
}

// wantChecksPass runs CHECK for each pod.
func wantChecksPass(t *testing.T, n *tb.Network, pods ...*tb.Pod) {
	t.Helper()
	for _, q := range pods {
		if err := n.Check(q); err != nil {
			t.Errorf("CHECK %s: %v", q.Name, err)
		}
	}
}
