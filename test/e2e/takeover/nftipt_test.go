package takeover

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/portguard/portguard/test/testbed"
)

// The nftables backend against iptables-format claims (issue 10): what upstream portmap's
// iptables backend and portguard's iptables backend write in ip/ip6 nat through
// iptables-nft. iptables' nat hooks at priority -100, before portguard's table (-99), so
// such a claim on a port gets the port's packets whatever the table holds.

// iptSources are the two writers of iptables-format claims: upstream portmap v1.10.0
// (its default backend with iptables present) and portguard's iptables backend.
var iptSources = []struct {
	name string
	net  func(b *testbed.Bed) *testbed.Network
}{
	{"upstream", func(b *testbed.Bed) *testbed.Network {
		return b.Network(testbed.NetConfig{PortPlugin: "portmap"})
	}},
	{"portguard", func(b *testbed.Bed) *testbed.Network {
		n, _ := pgNet(b, testbed.NetConfig{}, nil)
		return n
	}},
}

// cniCode is the code of the CNI error a plugin printed on stdout (0: none).
func cniCode(stdout string) int {
	var e struct {
		Code int `json:"code"`
	}
	_ = json.Unmarshal([]byte(stdout), &e)
	return e.Code
}

// A pod ADDed by an iptables writer dies without DEL; the nftables backend's ADD of a new
// pod on one of its ports takes that port over in the batch that creates the new claim:
// the new pod answers in both families (never the dead destination), the dead pod's jump
// keeps only its other port, the takeover is logged with its evidence, and CHECK of the
// new pod passes. A second ADD on the other port takes the rest, and the dead pod's chain
// is gone.
func TestNFTablesIptablesStaleClaimTakenOver(t *testing.T) {
	for _, src := range iptSources {
		t.Run(src.name, func(t *testing.T) {
			b := newBed(t)
			old := src.net(b)
			n, logFile := pgNet(b, testbed.NetConfig{Bridge: "cni1"}, map[string]any{"backend": "nftables"})

			dead := b.NewPod("D")
			dead.Serve(80)
			old.MustAdd(dead, testbed.TCP(8090, 80), testbed.TCP(8091, 80))
			for _, f := range families {
				wantAnswer(t, b, "tcp", b.NodeIP(f), 8090, "D")
			}
			chain := dead.Chain(old)
			dead.Kill()

			p := b.NewPod("B")
			p.Serve(80)
			n.MustAdd(p, testbed.TCP(8090, 80))
			for _, f := range families {
				for i := 0; i < 3; i++ {
					wantAnswer(t, b, "tcp", b.NodeIP(f), 8090, "B")
				}
				js := jumps(b, f, chain)
				if len(js) != 1 || !strings.Contains(js[0], "8091") || strings.Contains(js[0], "8090") {
					t.Errorf("%s: jumps into the dead pod's %s after the takeover of 8090: %q, want one on 8091 only", f, chain, js)
				}
				if rules := b.NAT(f).Rules[chain]; strings.Contains(strings.Join(rules, "\n"), "8090") {
					t.Errorf("%s: %s keeps rules of 8090:\n%s", f, chain, strings.Join(rules, "\n"))
				}
			}
			if err := n.Check(p); err != nil {
				t.Errorf("CHECK after the takeover: %v", err)
			}
			var seen int
			for _, e := range takeoverEvents(readFile(t, logFile)) {
				tk := e.Takeover
				if tk.From.ContainerID != dead.ContainerID {
					continue
				}
				seen++
				if !strings.HasSuffix(tk.Chain, " nat "+chain) || tk.ChainRemoved || tk.Evidence == nil || tk.Evidence.State != "stale" {
					t.Errorf("takeover event: chain %q removed %v evidence %+v", tk.Chain, tk.ChainRemoved, tk.Evidence)
				}
				if tk.For.ContainerID != p.ContainerID || len(tk.Claims) != 1 || tk.Claims[0].HostPort != 8090 {
					t.Errorf("takeover event for %+v claims %+v", tk.For, tk.Claims)
				}
			}
			if seen != 2 {
				t.Errorf("%d takeover events from the dead pod, want 2 (one per family):\n%s", seen, readFile(t, logFile))
			}

			q := b.NewPod("E")
			q.Serve(80)
			n.MustAdd(q, testbed.TCP(8091, 80))
			for _, f := range families {
				wantAnswer(t, b, "tcp", b.NodeIP(f), 8091, "E")
				wantAnswer(t, b, "tcp", b.NodeIP(f), 8090, "B")
				wantChains(t, b, f)
			}
		})
	}
}

// A live pod of an iptables writer keeps its port: the nftables backend's ADD fails with
// code 100 and changes nothing (portguard's table and both nat tables identical before and
// after), the live pod keeps answering, and CHECK of a pod whose claim such a rule shadows
// names the rule.
func TestNFTablesIptablesLiveClaimRefused(t *testing.T) {
	for _, src := range iptSources {
		t.Run(src.name, func(t *testing.T) {
			b := newBed(t)
			old := src.net(b)
			n := nftNet(b, testbed.NetConfig{Bridge: "cni1"})

			// A pod of the nftables network, so its table exists before the refused ADD.
			x := b.NewPod("X")
			x.Serve(80)
			n.MustAdd(x, testbed.TCP(8095, 80))

			live := b.NewPod("L")
			live.Serve(80)
			old.MustAdd(live, testbed.TCP(8092, 80))
			before := nftTable(t, b)
			natBefore := map[testbed.Family]string{}
			for _, f := range families {
				natBefore[f] = normalizedNAT(t, b, f)
			}

			c := b.NewPod("C")
			c.Serve(80)
			prev := n.MustAdd(c)
			res, err := reAdd(t, b, n, c, prev.Stdout, testbed.TCP(8092, 80))
			if err == nil {
				t.Fatalf("ADD on the port of a live iptables pod succeeded:\n%s", res.Stderr)
			}
			if code := cniCode(res.Stdout); code != refusedCode {
				t.Errorf("refused ADD: stdout %q, want a CNI error with code %d", res.Stdout, refusedCode)
			}
			if !strings.Contains(res.Stdout, live.ContainerID) {
				t.Errorf("the refusal does not name the live owner %s: %s", live.ContainerID, res.Stdout)
			}
			if after := nftTable(t, b); after != before {
				t.Errorf("refused ADD changed portguard's table:\nbefore:\n%s\nafter:\n%s", before, after)
			}
			for _, f := range families {
				if after := normalizedNAT(t, b, f); after != natBefore[f] {
					t.Errorf("%s: refused ADD changed nat:\nbefore:\n%s\nafter:\n%s", f, natBefore[f], after)
				}
				wantAnswer(t, b, "tcp", b.NodeIP(f), 8092, "L")
			}

			// The iptables writer does not see portguard's table: a live pod of it on X's
			// port gets X's packets, and CHECK of X says so, naming the rule's chain.
			y := b.NewPod("Y")
			y.Serve(80)
			old.MustAdd(y, testbed.TCP(8095, 80))
			for _, f := range families {
				wantAnswer(t, b, "tcp", b.NodeIP(f), 8095, "Y")
			}
			err = n.Check(x)
			if err == nil || !strings.Contains(err.Error(), "shadowed") || !strings.Contains(err.Error(), y.Chain(old)) {
				t.Errorf("CHECK of X with Y's iptables claim on its port: %v; want it named (%s)", err, y.Chain(old))
			}
		})
	}
}

// A pod ADDed by portguard's iptables backend is DELed through the nftables backend after
// the node switched (same network name): its iptables chain and jump go too. A re-ADD of a
// pod through the nftables backend replaces its own iptables-format leftover without a
// takeover.
func TestNFTablesRemovesOwnIptablesLeftovers(t *testing.T) {
	b := newBed(t)
	ipt, _ := pgNet(b, testbed.NetConfig{}, nil)
	a := b.NewPod("A")
	a.Serve(80)
	prev := ipt.MustAdd(a, testbed.TCP(8096, 80))
	c := b.NewPod("C")
	c.Serve(80)
	ipt.MustAdd(c, testbed.TCP(8097, 80))

	// The same network, now with the nftables backend.
	var list map[string]any
	if err := json.Unmarshal(ipt.Conflist, &list); err != nil {
		t.Fatal(err)
	}
	for _, p := range list["plugins"].([]any) {
		if pm := p.(map[string]any); pm["type"] == "portguard" {
			pm["backend"] = "nftables"
		}
	}
	raw, _ := json.Marshal(list)
	ipt.Remove()
	n := b.Conflist(raw)

	if res, err := reAdd(t, b, n, a, prev.Stdout, testbed.TCP(8096, 80)); err != nil {
		t.Fatalf("re-ADD through the nftables backend: %v\n%s", err, res.Stderr)
	} else if len(takeoverEvents(res.Stderr)) != 0 {
		t.Errorf("re-ADD of the same attachment reported a takeover:\n%s", res.Stderr)
	}
	for _, f := range families {
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8096, "A")
		wantChains(t, b, f, c.Chain(n))
	}
	n.MustDel(c)
	for _, f := range families {
		wantChains(t, b, f)
		wantNoAnswerFrom(t, b, "tcp", b.NodeIP(f), 8097, "C")
	}
	n.MustDel(c) // idempotent
}

// A node without iptables: the plugin runs with a PATH that holds no iptables binary and a
// configuration without "backend"; it picks nftables (as upstream does), ADD, CHECK and
// DEL work, the port answers in both families, and nothing is created in ip/ip6 nat.
func TestNoIptablesNodePicksNFTables(t *testing.T) {
	b := newBed(t)
	dir := filepath.Join(b.Dir, "noipt-bin")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// The bed runs cnitool through `sh -c 'mount …; exec cnitool'`.
	for _, tool := range []string{"sh", "mount"} {
		p, err := exec.LookPath(tool)
		if err != nil {
			t.Skipf("%s: %v", tool, err)
		}
		if err := os.Symlink(p, filepath.Join(dir, tool)); err != nil {
			t.Fatal(err)
		}
	}
	env := []string{"PATH=" + dir}
	n, _ := pgNet(b, testbed.NetConfig{}, nil)
	p := b.NewPod("A")
	p.Serve(80)
	maps := []testbed.PortMapping{testbed.TCP(8098, 80), testbed.UDP(8098, 80)}
	if res, err := n.Call("add", p, testbed.CallOptions{Mappings: maps, Env: env}); err != nil {
		t.Fatalf("ADD: %v\n%s", err, res.Stderr)
	}
	for _, f := range families {
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8098, "A")
		wantAnswer(t, b, "udp", b.NodeIP(f), 8098, "A")
	}
	if tbl := nftTable(t, b); !strings.Contains(tbl, p.ContainerID) {
		t.Errorf("no element of %s in portguard's table:\n%s", p.ContainerID, tbl)
	}
	noNAT := func(when string) {
		t.Helper()
		for _, fam := range []string{"ip", "ip6"} {
			if out, err := b.Exec(b.Node, "nft", "list", "table", fam, "nat"); err == nil {
				t.Errorf("%s: table %s nat exists on a node without iptables:\n%s", when, fam, out)
			}
		}
	}
	noNAT("after ADD")
	if res, err := n.Call("check", p, testbed.CallOptions{Env: env}); err != nil {
		t.Errorf("CHECK: %v\n%s", err, res.Stderr)
	}
	if res, err := n.Call("del", p, testbed.CallOptions{Env: env}); err != nil {
		t.Fatalf("DEL: %v\n%s", err, res.Stderr)
	}
	if tbl := nftTable(t, b); strings.Contains(tbl, p.ContainerID) {
		t.Errorf("DEL left elements:\n%s", tbl)
	}
	for _, f := range families {
		wantNoAnswerFrom(t, b, "tcp", b.NodeIP(f), 8098, "A")
	}
	noNAT("after DEL")
	if calls := b.ShimCalls(); len(calls) != 0 {
		t.Errorf("iptables processes ran: %v", calls)
	}
}

// iptables-legacy rules cannot be deleted over netlink: a legacy claim on the port refuses
// the nftables backend's ADD with code 100, naming iptables-legacy, and changes nothing
// (the legacy claim keeps answering); CHECK of a pod whose port a legacy claim takes
// afterwards says so.
func TestNFTablesLegacyClaimRefused(t *testing.T) {
	if _, err := exec.LookPath("iptables-legacy-restore"); err != nil {
		t.Skipf("iptables-legacy-restore: %v", err)
	}
	b := newBed(t)
	n := nftNet(b, testbed.NetConfig{})
	x := b.NewPod("X")
	x.Serve(80)
	n.MustAdd(x, testbed.TCP(8101, 80))
	l := b.NewPod("L")
	l.Serve(80)
	n.MustAdd(l) // an address, no port: the legacy rule below gives it 8100
	chain := testbed.ChainName("legacy", l.ContainerID)
	legacy := func(port int) {
		payload := fmt.Sprintf(`*nat
:CNI-HOSTPORT-DNAT - [0:0]
:%[1]s - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"legacy\" id: \"%[2]s\"" -m multiport --dports %[3]d -j %[1]s
-A %[1]s -p tcp -m tcp --dport %[3]d -j DNAT --to-destination %[4]s:80
COMMIT
`, chain, l.ContainerID, port, l.IP(testbed.V4))
		b.MustExec(b.Node, "sh", "-c", "iptables-legacy-restore --noflush <<'EOF'\n"+payload+"EOF\n")
	}
	legacy(8100)
	wantAnswer(t, b, "tcp", b.NodeIP4, 8100, "L")

	before := nftTable(t, b)
	c := b.NewPod("C")
	c.Serve(80)
	prev := n.MustAdd(c)
	res, err := reAdd(t, b, n, c, prev.Stdout, testbed.TCP(8100, 80))
	if err == nil {
		t.Fatalf("ADD on a port of an iptables-legacy claim succeeded:\n%s", res.Stderr)
	}
	if code := cniCode(res.Stdout); code != refusedCode || !strings.Contains(res.Stdout, "iptables-legacy") || !strings.Contains(res.Stdout, chain) {
		t.Errorf("refused ADD: stdout %q, want code %d naming iptables-legacy and %s", res.Stdout, refusedCode, chain)
	}
	if after := nftTable(t, b); after != before {
		t.Errorf("refused ADD changed portguard's table:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	wantAnswer(t, b, "tcp", b.NodeIP4, 8100, "L")

	// A legacy claim written after X's ADD on X's port gets X's packets; CHECK says so.
	if err := n.Check(x); err != nil {
		t.Fatalf("CHECK of X before: %v", err)
	}
	legacy(8101)
	wantAnswer(t, b, "tcp", b.NodeIP4, 8101, "L")
	if err := n.Check(x); err == nil || !strings.Contains(err.Error(), "iptables-legacy") {
		t.Errorf("CHECK of X with a legacy claim on its port: %v", err)
	}
}

// conflictPolicy holds for iptables claims as for every other: reject refuses even a dead
// owner's claim (code 100, nothing changed), force takes a live owner's port.
func TestNFTablesIptablesClaimPolicies(t *testing.T) {
	b := newBed(t)
	old, _ := pgNet(b, testbed.NetConfig{}, nil)
	reject, _ := pgNet(b, testbed.NetConfig{Bridge: "cni1"}, map[string]any{"backend": "nftables", "conflictPolicy": "reject"})
	force, _ := pgNet(b, testbed.NetConfig{Bridge: "cni2"}, map[string]any{"backend": "nftables", "conflictPolicy": "force"})

	dead := b.NewPod("D")
	dead.Serve(80)
	old.MustAdd(dead, testbed.TCP(8093, 80))
	dead.Kill()
	natBefore := normalizedNAT(t, b, testbed.V4)
	r := b.NewPod("R")
	r.Serve(80)
	prev := reject.MustAdd(r)
	res, err := reAdd(t, b, reject, r, prev.Stdout, testbed.TCP(8093, 80))
	if err == nil || cniCode(res.Stdout) != refusedCode {
		t.Errorf("conflictPolicy reject on a dead iptables claim: %v, stdout %q; want code %d", err, res.Stdout, refusedCode)
	}
	if after := normalizedNAT(t, b, testbed.V4); after != natBefore {
		t.Errorf("the refused ADD changed nat:\nbefore:\n%s\nafter:\n%s", natBefore, after)
	}

	live := b.NewPod("L")
	live.Serve(80)
	old.MustAdd(live, testbed.TCP(8094, 80))
	f := b.NewPod("F")
	f.Serve(80)
	force.MustAdd(f, testbed.TCP(8094, 80))
	for _, fam := range families {
		wantAnswer(t, b, "tcp", b.NodeIP(fam), 8094, "F")
	}
	for _, fam := range families {
		if js := jumps(b, fam, live.Chain(old)); len(js) != 0 {
			t.Errorf("%s: the live pod's jumps stayed under force: %q", fam, js)
		}
	}
}
