package e2e

import (
	"fmt"
	"net"
	"strings"
	"testing"

	tb "github.com/portguard/portguard/test/testbed"
)

// TestForwarding: one dual-stack pod with TCP and UDP host ports answers from the client (to
// each node address), from the node to its own address and to 127.0.0.1; CHECK passes right
// after ADD; the chain is named as upstream names it; DEL removes everything.
func TestForwarding(t *testing.T) {
	t.Parallel()
	b, n := pgBed(t)
	p := b.NewPod("alpha")
	n.MustAdd(p, tb.TCP(8080, 80), tb.UDP(8080, 80), tb.TCP(8443, 443))
	p.Serve(80, 443)

	if err := n.Check(p); err != nil {
		t.Errorf("CHECK right after ADD: %v", err)
	}
	for _, f := range families {
		for _, proto := range protos() {
			expectAnswer(t, proto, b.Client, b.NodeIP(f).String(), 8080, "alpha")
			expectAnswer(t, proto, b.Node, b.NodeIP(f).String(), 8080, "alpha")
		}
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8443, "alpha")
		// no hostIP: every node address forwards
		expectAnswer(t, "tcp", b.Client, b.NodeIPAlt(f).String(), 8080, "alpha")
	}
	for _, proto := range protos() {
		expectAnswer(t, proto, b.Node, "127.0.0.1", 8080, "alpha")
	}

	comment := fmt.Sprintf(`dnat name: \"%s\" id: \"%s\"`, n.Name, p.ContainerID)
	for _, f := range families {
		st := b.NAT(f)
		if d := st.DNChains(); len(d) != 1 || d[0] != p.Chain(n) {
			t.Errorf("%s: CNI-DN chains %v, want [%s] (upstream's name)", f, d, p.Chain(n))
		}
		jumps := st.JumpsTo("CNI-HOSTPORT-DNAT", p.Chain(n))
		if len(jumps) != 2 {
			t.Errorf("%s: %d jump rules to %s, want 2 (tcp, udp): %v", f, len(jumps), p.Chain(n), jumps)
		}
		for _, j := range jumps {
			if !strings.Contains(j, comment) {
				t.Errorf("%s: jump without the upstream comment %s: %s", f, comment, j)
			}
		}
		for _, entry := range []string{"PREROUTING", "OUTPUT"} {
			if len(st.JumpsTo(entry, "CNI-HOSTPORT-DNAT")) != 1 {
				t.Errorf("%s: %s has no single jump to CNI-HOSTPORT-DNAT: %v", f, entry, st.Rules[entry])
			}
		}
		if len(st.JumpsTo("POSTROUTING", "CNI-HOSTPORT-MASQ")) != 1 {
			t.Errorf("%s: POSTROUTING has no single jump to CNI-HOSTPORT-MASQ: %v", f, st.Rules["POSTROUTING"])
		}
	}

	n.MustDel(p)
	expectClean(t, b)
	for _, f := range families {
		expectNoAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8080)
	}
}

// TestHostIP: a mapping with a hostIP forwards only that node address (and only in that
// address's family); two pods share a host port on different specific host IPs.
func TestHostIP(t *testing.T) {
	t.Parallel()
	b, n := pgBed(t)
	a, c := b.NewPod("A"), b.NewPod("B")
	n.MustAdd(a,
		tb.TCP(8081, 80).On(b.NodeIP4.String()),
		tb.PortMapping{HostPort: 8081, ContainerPort: 80, Protocol: "UDP", HostIP: b.NodeIP4.String()},
		tb.TCP(8081, 80).On(b.NodeIP6.String()))
	n.MustAdd(c, tb.TCP(8081, 80).On(b.NodeIP4Alt.String()), tb.TCP(8081, 80).On(b.NodeIP6Alt.String()))
	a.Serve()
	c.Serve()

	for _, p := range []*tb.Pod{a, c} {
		if err := n.Check(p); err != nil {
			t.Errorf("CHECK %s: %v", p.Name, err)
		}
	}
	for _, f := range families {
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8081, "A")
		expectAnswer(t, "tcp", b.Client, b.NodeIPAlt(f).String(), 8081, "B")
		expectAnswer(t, "tcp", b.Node, b.NodeIPAlt(f).String(), 8081, "B")
	}
	expectAnswer(t, "udp", b.Client, b.NodeIP4.String(), 8081, "A")
	// A's host IPs are specific: not reachable through loopback
	expectNoAnswer(t, "tcp", b.Node, "127.0.0.1", 8081)

	// Family of the hostIP decides the table: A has tcp+udp DNAT in IPv4, only tcp in IPv6,
	// each restricted to its address.
	for _, f := range families {
		want := map[tb.Family]int{tb.V4: 2, tb.V6: 1}[f]
		var dnat []string
		for _, r := range b.NAT(f).Rules[a.Chain(n)] {
			if strings.Contains(r, "-j DNAT") {
				dnat = append(dnat, r)
			}
		}
		if len(dnat) != want {
			t.Errorf("%s: A's chain has %d DNAT rules, want %d: %v", f, len(dnat), want, dnat)
		}
		for _, r := range dnat {
			if !strings.Contains(r, "-d "+b.NodeIP(f).String()+"/") {
				t.Errorf("%s: DNAT rule not restricted to %s: %s", f, b.NodeIP(f), r)
			}
		}
	}
	n.MustDel(a)
	expectAnswer(t, "tcp", b.Client, b.NodeIP4Alt.String(), 8081, "B")
	n.MustDel(c)
	expectClean(t, b)
}

// TestCheckNamesMissingRules: CHECK fails when a rule of the attachment or one of its jumps
// was removed behind its back, and passes for an untouched neighbour.
func TestCheckNamesMissingRules(t *testing.T) {
	t.Parallel()
	b, n := pgBed(t)
	p1, p2, p3 := b.NewPod("one"), b.NewPod("two"), b.NewPod("three")
	n.MustAdd(p1, tb.TCP(8101, 80))
	n.MustAdd(p2, tb.TCP(8102, 80))
	n.MustAdd(p3, tb.TCP(8103, 80))

	// p1: remove its IPv4 DNAT rule; p2: remove its IPv6 jump rule.
	var dnat string
	for _, r := range b.NAT(tb.V4).Rules[p1.Chain(n)] {
		if strings.Contains(r, "-j DNAT") {
			dnat = r
		}
	}
	jumps := jumpsTo(b, tb.V6, p2.Chain(n))
	if dnat == "" || len(jumps) != 1 {
		t.Fatalf("unexpected layout: DNAT %q, IPv6 jumps %v", dnat, jumps)
	}
	b.MustRestoreNAT(tb.V4, "-D"+strings.TrimPrefix(dnat, "-A"))
	b.MustRestoreNAT(tb.V6, "-D"+strings.TrimPrefix(jumps[0], "-A"))

	if err := n.Check(p1); err == nil {
		t.Error("CHECK passed with the IPv4 DNAT rule missing")
	} else {
		t.Logf("CHECK p1: %v", err)
	}
	if err := n.Check(p2); err == nil {
		t.Error("CHECK passed with the IPv6 jump rule missing")
	} else {
		t.Logf("CHECK p2: %v", err)
	}
	if err := n.Check(p3); err != nil {
		t.Errorf("CHECK of the untouched pod: %v", err)
	}
	for _, p := range []*tb.Pod{p1, p2, p3} {
		n.MustDel(p)
	}
	expectClean(t, b)
}

// TestDelIdempotent: DEL of a never-added container on a node without any CNI chain, DEL
// twice, DEL after the sandbox is gone: all succeed and leave nothing behind.
func TestDelIdempotent(t *testing.T) {
	t.Parallel()
	b, n := pgBed(t)

	never := b.NewPod("never")
	if _, err := n.Call("del", never, tb.CallOptions{Mappings: []tb.PortMapping{tb.TCP(8110, 80)}}); err != nil {
		t.Errorf("DEL of a never-added container (no CNI chains at all): %v", err)
	}
	if _, err := n.Call("del", never, tb.CallOptions{NoMappings: true}); err != nil {
		t.Errorf("DEL of a never-added container without runtimeConfig: %v", err)
	}

	p := b.NewPod("twice")
	n.MustAdd(p, tb.TCP(8111, 80), tb.UDP(8111, 80))
	if err := n.Del(p); err != nil {
		t.Errorf("first DEL: %v", err)
	}
	if err := n.Del(p); err != nil {
		t.Errorf("second DEL: %v", err)
	}

	other := b.NewPod("other")
	n.MustAdd(other, tb.TCP(8112, 80))
	if _, err := n.Call("del", never, tb.CallOptions{Mappings: []tb.PortMapping{tb.TCP(8112, 80)}}); err != nil {
		t.Errorf("DEL of a never-added container claiming another pod's port: %v", err)
	}
	if got := jumpsTo(b, tb.V4, other.Chain(n)); len(got) != 1 {
		t.Errorf("DEL of another container touched this pod's jumps: %v", got)
	}

	gone := b.NewPod("gone")
	n.MustAdd(gone, tb.TCP(8113, 80))
	gone.Kill()
	if err := n.Del(gone); err != nil {
		t.Errorf("DEL after the sandbox namespace is gone: %v", err)
	}
	if err := n.Del(gone); err != nil {
		t.Errorf("second DEL after the sandbox namespace is gone: %v", err)
	}
	n.MustDel(other)
	expectClean(t, b)
}

// TestReAddNewIP: ADD again for the same container (same ID) with a new pod IP replaces the
// attachment's rules instead of appending to them.
func TestReAddNewIP(t *testing.T) {
	t.Parallel()
	b, n := pgBed(t)
	p := b.NewPod("A")
	maps := []tb.PortMapping{tb.TCP(8120, 80), tb.UDP(8120, 80)}
	first := []string{tb.NthIP(n.Subnet4, 10), tb.NthIP(n.Subnet6, 10)}
	second := []string{tb.NthIP(n.Subnet4, 11), tb.NthIP(n.Subnet6, 11)}
	if _, err := n.Call("add", p, tb.CallOptions{Mappings: maps, IPs: first}); err != nil {
		t.Fatal(err)
	}
	oldIPs := map[tb.Family]net.IP{tb.V4: p.IP4, tb.V6: p.IP6}
	rulesBefore := map[tb.Family]int{}
	for _, f := range families {
		rulesBefore[f] = len(b.NAT(f).Rules[p.Chain(n)])
	}

	p.Kill()
	p.Revive()
	if _, err := n.Call("add", p, tb.CallOptions{Mappings: maps, IPs: second}); err != nil {
		t.Fatal(err)
	}
	p.Serve()
	if p.IP4.Equal(oldIPs[tb.V4]) || p.IP6.Equal(oldIPs[tb.V6]) {
		t.Fatalf("re-ADD kept the old addresses %v %v", p.IP4, p.IP6)
	}
	for _, f := range families {
		st := b.NAT(f)
		if d := st.DNChains(); len(d) != 1 {
			t.Errorf("%s: chains after re-ADD: %v", f, d)
		}
		rules := st.Rules[p.Chain(n)]
		if len(rules) != rulesBefore[f] {
			t.Errorf("%s: %d rules after re-ADD, %d before: %v", f, len(rules), rulesBefore[f], rules)
		}
		for _, r := range rules {
			if strings.Contains(r, oldIPs[f].String()) {
				t.Errorf("%s: rule for the old address %s kept: %s", f, oldIPs[f], r)
			}
		}
		if j := st.JumpsTo("CNI-HOSTPORT-DNAT", p.Chain(n)); len(j) != 2 {
			t.Errorf("%s: %d jumps after re-ADD, want 2: %v", f, len(j), j)
		}
		for _, proto := range protos() {
			expectAnswer(t, proto, b.Client, b.NodeIP(f).String(), 8120, "A")
		}
	}
	if err := n.Check(p); err != nil {
		t.Errorf("CHECK after re-ADD: %v", err)
	}
	n.MustDel(p)
	expectClean(t, b)
}

// foreignPayload is a kube-proxy-like service chain entered from PREROUTING and OUTPUT, a user
// DNAT rule and a user MASQUERADE rule, installed before any plugin call.
func foreignPayload(b *tb.Bed, n *tb.Network, f tb.Family) string {
	svc, user := "198.18.254.10/32", b.NodeIP4.String()+"/32"
	backend1, backend2 := strings.Split(tb.NthIP(n.Subnet4, 60), "/")[0]+":443", strings.Split(tb.NthIP(n.Subnet4, 61), "/")[0]+":80"
	subnet := n.Subnet4.String()
	if f == tb.V6 {
		svc, user = "fd00:fe::10/128", b.NodeIP6.String()+"/128"
		backend1 = "[" + strings.Split(tb.NthIP(n.Subnet6, 60), "/")[0] + "]:443"
		backend2 = "[" + strings.Split(tb.NthIP(n.Subnet6, 61), "/")[0] + "]:80"
		subnet = n.Subnet6.String()
	}
	return strings.Join([]string{
		":KUBE-SERVICES - [0:0]",
		":KUBE-SVC-E2E - [0:0]",
		":KUBE-MARK-MASQ - [0:0]",
		`-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES`,
		`-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES`,
		"-A KUBE-SERVICES -d " + svc + ` -p tcp -m comment --comment "default/e2e:https cluster IP" -m tcp --dport 443 -j KUBE-SVC-E2E`,
		"-A KUBE-SVC-E2E -j KUBE-MARK-MASQ",
		"-A KUBE-SVC-E2E -p tcp -m tcp -j DNAT --to-destination " + backend1,
		"-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
		"-A PREROUTING -d " + user + " -p tcp -m tcp --dport 9999 -j DNAT --to-destination " + backend2,
		"-A POSTROUTING -s " + subnet + " ! -d " + subnet + " -j MASQUERADE",
	}, "\n")
}

// TestForeignRulesUntouched: rules portguard does not own stay byte-identical across ADD and
// DEL, in every table, and host ports still forward with them in place.
func TestForeignRulesUntouched(t *testing.T) {
	t.Parallel()
	b, n := pgBed(t)
	before := map[tb.Family]string{}
	for _, f := range families {
		b.MustRestoreNAT(f, foreignPayload(b, n, f))
		before[f] = b.SaveAll(f)
	}
	compare := func(stage string) {
		t.Helper()
		for _, f := range families {
			now := b.SaveAll(f)
			for _, table := range []string{"nat", "filter", "mangle", "raw"} {
				if was, is := tb.Foreign(before[f], table), tb.Foreign(now, table); was != is {
					t.Errorf("%s after %s: foreign %s rules changed:\nbefore:\n%s\nafter:\n%s", f, stage, table, was, is)
				}
			}
		}
	}
	a, c := b.NewPod("A"), b.NewPod("B")
	n.MustAdd(a, tb.TCP(8130, 80), tb.UDP(8130, 80))
	n.MustAdd(c, tb.TCP(8131, 80), tb.TCP(9999, 80).On(b.NodeIP4Alt.String()))
	a.Serve()
	c.Serve()
	compare("ADD")
	for _, f := range families {
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8130, "A")
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8131, "B")
	}
	expectAnswer(t, "tcp", b.Client, b.NodeIP4Alt.String(), 9999, "B")
	if err := n.Check(a); err != nil {
		t.Errorf("CHECK with foreign rules present: %v", err)
	}
	compare("CHECK")
	n.MustDel(a)
	compare("DEL of A")
	n.MustDel(c)
	compare("DEL of B")
	expectClean(t, b)
}

// TestParallelAddDel: 20 ADDs in parallel, then 20 DELs in parallel: no error, every pod
// forwarded and checked in between, no CNI-DN chain left.
func TestParallelAddDel(t *testing.T) {
	t.Parallel()
	b, n := pgBed(t)
	const N = 20
	pods := make([]*tb.Pod, N)
	for i := range pods {
		pods[i] = b.NewPod(fmt.Sprintf("p%d", i))
	}
	parallel := func(verb string, f func(i int, p *tb.Pod) error) {
		t.Helper()
		errs := make(chan error, N)
		for i, p := range pods {
			go func() { errs <- f(i, p) }()
		}
		for range pods {
			if err := <-errs; err != nil {
				t.Errorf("parallel %s: %v", verb, err)
			}
		}
	}
	parallel("ADD", func(i int, p *tb.Pod) error {
		_, err := n.Add(p, tb.TCP(10000+i, 80), tb.UDP(10000+i, 80))
		return err
	})
	for _, f := range families {
		if got := len(b.DNChains(f)); got != N {
			t.Errorf("%s: %d CNI-DN chains after %d parallel ADDs", f, got, N)
		}
	}
	parallel("CHECK", func(i int, p *tb.Pod) error { return n.Check(p) })
	for _, i := range []int{0, N - 1} {
		pods[i].Serve()
		for _, f := range families {
			expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 10000+i, pods[i].Name)
		}
	}
	parallel("DEL", func(i int, p *tb.Pod) error { return n.Del(p) })
	expectClean(t, b)
}

// TestNoMappingsNoIptables: calls without port mappings pass the result through and start no
// iptables process at all (counted by the PATH shim).
func TestNoMappingsNoIptables(t *testing.T) {
	t.Parallel()
	b, n := pgBed(t)
	p := b.NewPod("")
	b.ResetShim()
	if _, err := n.Call("add", p, tb.CallOptions{}); err != nil { // "portMappings": []
		t.Fatal(err)
	}
	if p.IP4 == nil || p.IP6 == nil {
		t.Errorf("ADD result lost the addresses: %v %v", p.IP4, p.IP6)
	}
	if err := n.Check(p); err != nil {
		t.Errorf("CHECK: %v", err)
	}
	if err := n.Del(p); err != nil {
		t.Errorf("DEL: %v", err)
	}
	q := b.NewPod("")
	if _, err := n.Call("add", q, tb.CallOptions{NoMappings: true}); err != nil { // no runtimeConfig
		t.Fatal(err)
	}
	if calls := b.ShimCalls(); len(calls) != 0 {
		t.Errorf("no-mapping ADD/CHECK/DEL started %d iptables processes:\n%s", len(calls), strings.Join(calls, "\n"))
	}
	expectClean(t, b)
}

// TestInstalledAsPortmap: the portguard binary installed under the file name "portmap" and
// referenced as "type": "portmap" behaves as portguard.
func TestInstalledAsPortmap(t *testing.T) {
	t.Parallel()
	b := tb.New(t)
	b.InstallPlugin("portmap", tb.PortguardBinary(t))
	n := b.Network(tb.NetConfig{PortPlugin: "portmap"})
	p := b.NewPod("dropin")
	n.MustAdd(p, tb.TCP(8140, 80), tb.UDP(8140, 80))
	p.Serve()
	restores := 0
	for _, c := range b.ShimCalls() {
		if strings.HasPrefix(c, "iptables-restore") || strings.HasPrefix(c, "ip6tables-restore") {
			restores++
		}
	}
	if restores == 0 {
		t.Errorf("no iptables-restore call: is the binary under the name portmap really portguard? calls: %v", b.ShimCalls())
	}
	for _, f := range families {
		for _, proto := range protos() {
			expectAnswer(t, proto, b.Client, b.NodeIP(f).String(), 8140, "dropin")
		}
		if d := b.DNChains(f); len(d) != 1 || d[0] != p.Chain(n) {
			t.Errorf("%s: chains %v, want [%s]", f, d, p.Chain(n))
		}
	}
	if err := n.Check(p); err != nil {
		t.Errorf("CHECK: %v", err)
	}
	n.MustDel(p)
	expectClean(t, b)
}

// TestManyPorts: more than 15 host ports of one protocol are split over several multiport
// TestManyPorts: 20 TCP and 20 UDP host ports (more than multiport's 15 per rule) all
// forward, from the client and from the node; CHECK passes; DEL leaves nothing.
func TestManyPorts(t *testing.T) {
	t.Parallel()
	b, n := pgBed(t)
	a := b.NewPod("A")
	maps := append(ports("tcp", 9100, 20), ports("udp", 9100, 20)...)
	n.MustAdd(a, maps...)
	a.Serve(80)
	for _, f := range families {
		if j := jumpsTo(b, f, a.Chain(n)); len(j) != 4 {
			t.Errorf("%s: %d jumps, want 2 per protocol (15 + 5 ports): %v", f, len(j), j)
		}
		for _, m := range maps {
			expectAnswer(t, m.Protocol, b.Client, b.NodeIP(f).String(), m.HostPort, "A")
		}
	}
	for _, port := range []int{9100, 9114, 9115, 9119} {
		expectAnswer(t, "tcp", b.Node, b.NodeIP4.String(), port, "A")
	}
	if err := n.Check(a); err != nil {
		t.Errorf("CHECK: %v", err)
	}
	n.MustDel(a)
	expectClean(t, b)
	expectNoAnswer(t, "tcp", b.Client, b.NodeIP4.String(), 9119)
}

// TestInvalidMappingChangesNothing: an invalid mapping (hostPort out of range, unknown
// protocol, malformed hostIP) fails the ADD with an error that names the field, and the nat
// table is exactly as before (upstream leaks an empty chain for hostPort 70000).
func TestInvalidMappingChangesNothing(t *testing.T) {
	t.Parallel()
	b, n := pgBed(t)
	ok := b.NewPod("ok")
	n.MustAdd(ok, tb.TCP(8150, 80))
	before := map[tb.Family]string{}
	for _, f := range families {
		before[f] = tb.Normalize(b.MustSaveNAT(f))
	}
	for _, c := range []struct {
		field string
		bad   tb.PortMapping
	}{
		{"hostPort", tb.TCP(70000, 80)},
		{"containerPort", tb.TCP(8152, 0)},
		{"protocol", tb.PortMapping{HostPort: 8153, ContainerPort: 80, Protocol: "icmp"}},
		{"hostIP", tb.TCP(8154, 80).On("198.18.0.999")},
	} {
		bad := b.NewPod("")
		_, err := n.Add(bad, tb.TCP(8151, 80), c.bad)
		if err == nil {
			t.Errorf("ADD with invalid %s %+v succeeded", c.field, c.bad)
			continue
		}
		t.Logf("invalid %s: %v", c.field, err)
		if !strings.Contains(err.Error(), c.field) {
			t.Errorf("error does not name the field %s: %v", c.field, err)
		}
		if strings.Contains(err.Error(), "goroutine ") {
			t.Errorf("error carries a Go stack trace: %v", err)
		}
		for _, f := range families {
			if after := tb.Normalize(b.MustSaveNAT(f)); after != before[f] {
				t.Errorf("%s: nat table changed by an ADD refused for %s:\nbefore:\n%s\nafter:\n%s", f, c.field, before[f], after)
			}
		}
	}
	n.MustDel(ok)
}

// TestIPv4OnlyNetwork: on a single-stack network, ADD touches only IPv4 and CHECK does not
// fail for the family the pod does not have.
func TestIPv4OnlyNetwork(t *testing.T) {
	t.Parallel()
	b, n := pgBed(t, tb.NetConfig{IPv4Only: true})
	p := b.NewPod("v4")
	n.MustAdd(p, tb.TCP(8170, 80), tb.UDP(8170, 80))
	p.Serve()
	if p.IP6 != nil {
		t.Fatalf("pod got an IPv6 address %v on an IPv4-only network", p.IP6)
	}
	if err := n.Check(p); err != nil {
		t.Errorf("CHECK: %v", err)
	}
	if d := b.DNChains(tb.V6); len(d) != 0 {
		t.Errorf("IPv6 chains for an IPv4-only pod: %v", d)
	}
	for _, proto := range protos() {
		expectAnswer(t, proto, b.Client, b.NodeIP4.String(), 8170, "v4")
	}
	expectAnswer(t, "tcp", b.Node, "127.0.0.1", 8170, "v4")
	n.MustDel(p)
	expectClean(t, b)
}

// TestUDPConntrackFlushed: a UDP flow keeps its conntrack entry across calls unless the
// plugin flushes it. After DEL the same client flow gets no answer (not the old pod's), and
// after ADD of another pod on the port the same flow reaches the new pod at once.
func TestUDPConntrackFlushed(t *testing.T) {
	t.Parallel()
	b, n := pgBed(t)
	a, c := b.NewPod("A"), b.NewPod("B")
	// Two UDP ports: the plugin flushes every port of the attachment in one call.
	ports := []int{8160, 8161}
	n.MustAdd(a, tb.UDP(ports[0], 80), tb.UDP(ports[1], 80))
	a.Serve()
	c.Serve()
	const src = 40160
	for _, f := range families {
		for i, port := range ports {
			if got, err := tb.SendUDPFromPort(b.Client, src+i, b.NodeIP(f).String(), port); err != nil || got != "A" {
				t.Fatalf("%s udp/%d: before DEL: answer %q, err %v", f, port, got, err)
			}
		}
	}
	n.MustDel(a) // A keeps running and would answer a stale conntrack entry
	for _, f := range families {
		for i, port := range ports {
			if got, err := tb.SendUDPFromPort(b.Client, src+i, b.NodeIP(f).String(), port); err == nil {
				t.Errorf("%s udp/%d: after DEL the old flow still reaches %q: conntrack entry not flushed", f, port, got)
			}
		}
	}
	n.MustAdd(c, tb.UDP(ports[0], 80), tb.UDP(ports[1], 80))
	for _, f := range families {
		for i, port := range ports {
			if got, err := tb.SendUDPFromPort(b.Client, src+i, b.NodeIP(f).String(), port); err != nil || got != "B" {
				t.Errorf("%s udp/%d: after ADD of B: answer %q, err %v; want B", f, port, got, err)
			}
		}
	}
	n.MustDel(c)
}
