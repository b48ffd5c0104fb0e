package e2e

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/plan"
	tb "github.com/portguard/portguard/test/testbed"
)

// nftBed is a bed with a portguard network on the nftables backend (bridge cni1) and an
// upstream portmap network on upstream's nftables backend (bridge cni0), plus a fake
// kube-proxy: a foreign table with a nat chain hooked before everyone (its DNAT to a
// Service) that nothing of portguard may touch.
func nftBed(t *testing.T) (b *tb.Bed, pg, up *tb.Network) {
	t.Helper()
	b = tb.New(t)
	up = b.Network(tb.NetConfig{PortPlugin: "portmap", PortConf: map[string]any{"backend": "nftables"}})
	pg = b.Network(tb.NetConfig{PortPlugin: "portguard", Bridge: "cni1", PortConf: map[string]any{"backend": "nftables"}})
	script := `table ip kube-proxy {
	set cluster-ips {
		type ipv4_addr
		elements = { 10.96.0.1, 10.96.0.10 }
	}
	chain nat-prerouting {
		type nat hook prerouting priority -100;
		ip daddr @cluster-ips tcp dport 443 dnat to 198.18.250.250:6443 comment "kube-proxy service"
	}
	chain nat-output {
		type nat hook output priority -100;
		ip daddr @cluster-ips tcp dport 443 dnat to 198.18.250.250:6443
	}
}
table inet foreign-filter {
	chain input {
		type filter hook input priority 0; policy accept;
		tcp dport 9 counter accept
	}
}
`
	f := filepath.Join(t.TempDir(), "kube-proxy.nft")
	if err := os.WriteFile(f, []byte(script), 0o644); err != nil {
		t.Fatal(err)
	}
	b.MustExec(b.Node, "nft", "-f", f)
	return b, pg, up
}

// foreignTables lists the tables that are neither portguard's nor upstream's, in full.
func foreignTables(t *testing.T, b *tb.Bed) string {
	t.Helper()
	return b.MustExec(b.Node, "nft", "list", "table", "ip", "kube-proxy") + b.MustExec(b.Node, "nft", "list", "table", "inet", "foreign-filter")
}

func ruleset(t *testing.T, b *tb.Bed) string {
	t.Helper()
	return b.MustExec(b.Node, "nft", "list", "ruleset")
}

// ctl runs portguardctl in the node; code is its exit status.
func ctl(t *testing.T, b *tb.Bed, args ...string) (res *tb.Result, code int) {
	t.Helper()
	res, err := b.Ctl(args...)
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
	default:
		t.Fatalf("portguardctl %v: %v", args, err)
	}
	return res, code
}

func nftAudit(t *testing.T, b *tb.Bed, args ...string) (plan.AuditReport, int) {
	t.Helper()
	res, code := ctl(t, b, append([]string{"audit", "-o", "json"}, args...)...)
	if code == 2 {
		t.Fatalf("audit: exit 2: %s", res.Stderr)
	}
	var rep plan.AuditReport
	if err := json.Unmarshal([]byte(res.Stdout), &rep); err != nil {
		t.Fatalf("audit -o json: %v\n%s", err, res.Stdout)
	}
	return rep, code
}

// nftKinds counts the problems of the nftables backend's families by kind.
func nftKinds(rep plan.AuditReport) map[string]int {
	out := map[string]int{}
	for _, fa := range rep.Families {
		if fa.Backend != plan.BackendNFTables {
			continue
		}
		for _, p := range fa.Problems {
			out[p.Kind]++
		}
	}
	return out
}

// A node polluted by upstream's nftables backend: upstream pod D claimed portguard pod P's
// port after P (upstream appends without looking) and died without DEL, so its rule, hooked
// before portguard's table, blackholes the port in both families; upstream pod E died
// without DEL on a port of its own; upstream pod L is alive. audit lists every claim with
// its owner's state and reports the split claim and the stale upstream rules; repair
// --dry-run changes nothing; repair removes exactly D's and E's upstream rules in one
// batch, P answers in both families, L still answers, and the foreign tables (a fake
// kube-proxy and a filter table) are byte-identical before and after.
func TestNFTRepairPollutedByUpstream(t *testing.T) {
	t.Parallel()
	b, pg, up := nftBed(t)
	foreign := foreignTables(t, b)

	l, p, d, e := b.NewPod("L"), b.NewPod("P"), b.NewPod("D"), b.NewPod("E")
	for _, x := range []*tb.Pod{l, p, d, e} {
		x.Serve(80)
	}
	up.MustAdd(l, tb.TCP(8090, 80))
	pg.MustAdd(p, tb.TCP(8091, 80))
	up.MustAdd(d, tb.TCP(8091, 80))
	up.MustAdd(e, tb.TCP(8092, 80))
	for _, f := range families {
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8091, "D") // upstream's rule wins
	}
	d.Kill()
	e.Kill()
	for _, f := range families {
		expectNoAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8091)
	}

	rep, code := nftAudit(t, b)
	if code != 1 {
		t.Fatalf("audit of the polluted node: exit %d, want 1", code)
	}
	kinds := nftKinds(rep)
	if kinds[plan.KindSplitClaim] != 2 || kinds[plan.KindStaleUpstreamRule] != 4 || len(kinds) != 2 {
		t.Errorf("nftables problems %v, want split-claim 2 (one per family) and stale-upstream-rule 4 (D and E, both families)", kinds)
	}
	states := map[string]string{}
	for _, fa := range rep.Families {
		if fa.Backend != plan.BackendNFTables {
			continue
		}
		for _, pc := range fa.Ports {
			for _, c := range pc.Claims {
				states[fa.Family.String()+" "+c.ContainerID] = c.OwnerState + "/" + c.Status
			}
		}
	}
	for _, f := range []string{"ipv4", "ipv6"} {
		for id, want := range map[string]string{l.ContainerID: "alive/wins", p.ContainerID: "alive/shadowed", d.ContainerID: "stale/wins", e.ContainerID: "stale/wins"} {
			if got := states[f+" "+id]; got != want {
				t.Errorf("%s claim of %s: %q, want %q (all: %v)", f, id, got, want, states)
			}
		}
	}
	prom, code := ctl(t, b, "audit", "-o", "prometheus")
	for _, want := range []string{`portguard_split_claims{backend="nftables",family="ipv4"} 1`, `portguard_stale_upstream_rules{backend="nftables",family="ipv6"} 2`,
		`portguard_audit_healthy{backend="nftables",family="ipv4"} 0`, `portguard_claims{backend="nftables",family="ipv6"} 4`} {
		if code != 0 || !strings.Contains(prom.Stdout, want) {
			t.Errorf("audit -o prometheus: exit %d, no %q:\n%s", code, want, prom.Stdout)
		}
	}
	text, _ := ctl(t, b, "audit")
	t.Logf("portguardctl audit:\n%s", text.Stdout)
	if !strings.Contains(text.Stdout, "nftables") || !strings.Contains(text.Stdout, "split-claim") {
		t.Errorf("text audit does not show the nftables side:\n%s", text.Stdout)
	}

	// doctor: the kernel probe passes and changes nothing; each network's backend is named;
	// the split claim is an error with its fix.
	before := ruleset(t, b)
	doc, code := ctl(t, b, "doctor", "--conf-dir", b.NetDir, "--bin-dir", b.CNIBinDir, "-o", "json")
	var dr struct {
		Findings []struct{ Check, Severity, What string }
		Audit    plan.AuditReport
	}
	if err := json.Unmarshal([]byte(doc.Stdout), &dr); err != nil || code != 1 {
		t.Fatalf("doctor: exit %d, %v\n%s%s", code, err, doc.Stdout, doc.Stderr)
	}
	probeOK, backends, splitFound := false, 0, false
	for _, f := range dr.Findings {
		switch {
		case f.Check == "nftables":
			probeOK = f.Severity == "ok"
		case f.Check == "net-backend" && strings.Contains(f.What, "the nftables backend"):
			backends++
		case f.Check == "audit" && f.Severity == "error" && strings.Contains(f.What, "split-claim"):
			splitFound = true
		}
	}
	if !probeOK || backends != 2 || !splitFound || nftKinds(dr.Audit)[plan.KindSplitClaim] != 2 {
		t.Errorf("doctor: probe ok %v, %d networks on nftables (want 2), split claim reported %v:\n%s", probeOK, backends, splitFound, doc.Stdout)
	}
	if after := ruleset(t, b); after != before {
		t.Fatalf("doctor changed the ruleset:\n%s\n---\n%s", before, after)
	}

	// A repair narrowed to E's port removes E's rules only.
	res, code := ctl(t, b, "repair", "--port", "tcp/8092")
	upstreamNow := b.MustExec(b.Node, "nft", "list", "table", "ip", "cni_hostport")
	if code != 1 || strings.Contains(upstreamNow, e.ContainerID) || !strings.Contains(upstreamNow, d.ContainerID) {
		t.Fatalf("repair --port tcp/8092: exit %d (want 1: D's problems left)\n%s%s\n%s", code, res.Stdout, res.Stderr, upstreamNow)
	}
	expectNoAnswer(t, "tcp", b.Client, b.NodeIP4.String(), 8091)

	before = ruleset(t, b)
	dry, code := ctl(t, b, "repair", "--dry-run")
	if code != 0 || !strings.Contains(dry.Stdout, "delete rule ip cni_hostport hostports handle") || !strings.Contains(dry.Stdout, "delete rule ip6 cni_hostport masquerading handle") {
		t.Errorf("repair --dry-run: exit %d\n%s%s", code, dry.Stdout, dry.Stderr)
	}
	t.Logf("portguardctl repair --dry-run:\n%s", dry.Stdout)
	if after := ruleset(t, b); after != before {
		t.Fatalf("repair --dry-run changed the ruleset:\n%s\n---\n%s", before, after)
	}

	log := filepath.Join(t.TempDir(), "repair.log")
	res, code = ctl(t, b, "repair", "--log-file", log)
	if code != 0 {
		t.Fatalf("repair: exit %d\n%s%s", code, res.Stdout, res.Stderr)
	}
	for _, f := range families {
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8091, "P")
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8090, "L")
	}
	if got := foreignTables(t, b); got != foreign {
		t.Errorf("foreign tables changed by repair:\n%s\n---\n%s", foreign, got)
	}
	upstream := b.MustExec(b.Node, "nft", "list", "table", "ip", "cni_hostport") + b.MustExec(b.Node, "nft", "list", "table", "ip6", "cni_hostport")
	if strings.Contains(upstream, d.ContainerID) || strings.Contains(upstream, e.ContainerID) || strings.Count(upstream, l.ContainerID) < 4 {
		t.Errorf("upstream's tables after repair (want L's rules only):\n%s", upstream)
	}
	raw, err := os.ReadFile(log)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(raw)), "\n")
	var split, stale int
	for _, ln := range lines {
		var ev struct {
			Event  string
			Repair plan.RepairRemoval
		}
		if err := json.Unmarshal([]byte(ln), &ev); err != nil || ev.Event != "repair" {
			t.Fatalf("log line %q: %v", ln, err)
		}
		for _, r := range ev.Repair.Reasons {
			switch r {
			case plan.KindSplitClaim:
				split++
			case plan.KindStaleUpstreamRule:
				stale++
			}
		}
		if ev.Repair.OwnerState == "alive" {
			t.Errorf("repair removed a live owner's claim: %s", ln)
		}
	}
	if split != 2 || stale < 2 {
		t.Errorf("log: %d split-claim and %d stale-upstream-rule removals, want 2 and at least 2 (D's masquerade rules):\n%s", split, stale, raw)
	}
	if _, code := nftAudit(t, b); code != 0 {
		t.Errorf("audit after repair: exit %d", code)
	}
	if err := pg.Check(p); err != nil {
		t.Errorf("portguard CHECK of P after repair: %v", err)
	}
}

// Damage inside portguard's table, made by hand with nft: a claim's element deleted (its
// masquerade entry is left without a claim), a claim with conditions deleted (its gate and
// conditions chain are left), and the postrouting chain flushed (layout). audit reports
// each; repair removes the leftovers and rewrites the layout in place without touching the
// other claims (they keep answering, hairpin included) or the foreign tables; the audit
// after it is healthy. Then gc collects a network's invalid attachment.
func TestNFTRepairOrphansAndLayout(t *testing.T) {
	t.Parallel()
	b, pg, _ := nftBed(t)
	pg2 := b.Network(tb.NetConfig{PortPlugin: "portguard", Bridge: "cni2",
		PortConf: map[string]any{"backend": "nftables", "conditionsV4": []string{"ip saddr 198.18.0.0/15"}}})
	foreign := foreignTables(t, b)
	a, k, g := b.NewPod("A"), b.NewPod("K"), b.NewPod("G")
	for _, x := range []*tb.Pod{a, k, g} {
		x.Serve(80)
	}
	pg.MustAdd(a, tb.TCP(8110, 80))
	pg.MustAdd(k, tb.TCP(8112, 80))
	pg2.MustAdd(g, tb.TCP(8111, 80))
	expectAnswer(t, "tcp", b.Client, b.NodeIP4.String(), 8111, "G")
	if rep, code := nftAudit(t, b); code != 0 {
		t.Fatalf("audit of a healthy nftables node: exit %d: %v", code, nftKinds(rep))
	}

	b.MustExec(b.Node, "nft", "delete element inet portguard any4 { tcp . 8110 }")
	b.MustExec(b.Node, "nft", "delete element inet portguard any4 { tcp . 8111 }")
	b.MustExec(b.Node, "nft", "flush chain inet portguard postrouting")
	rep, code := nftAudit(t, b)
	kinds := nftKinds(rep)
	if code != 1 || kinds[plan.KindOrphanMasquerade] != 2 || kinds[plan.KindOrphanGate] != 1 || kinds[plan.KindLayoutDamaged] != 1 || len(kinds) != 3 {
		t.Fatalf("audit of the damaged table: exit %d, problems %v; want orphan-masquerade 2 (A's and G's IPv4 entries), orphan-gate 1, layout-damaged 1", code, kinds)
	}
	res, code := ctl(t, b, "repair")
	if code != 0 {
		t.Fatalf("repair: exit %d\n%s%s", code, res.Stdout, res.Stderr)
	}
	if !strings.Contains(res.Stdout, "delete chain inet portguard cond-4-") {
		t.Errorf("repair did not delete G's conditions chain, unused once its gate went:\n%s", res.Stdout)
	}
	if _, code := nftAudit(t, b); code != 0 {
		t.Errorf("audit after repair: exit %d", code)
	}
	tbl := b.MustExec(b.Node, "nft", "list", "table", "inet", "portguard")
	if !strings.Contains(tbl, "masquerade") || strings.Contains(tbl, "cond-4-") {
		t.Errorf("after repair: want the layout's masquerade rules back and no conditions chain:\n%s", tbl)
	}
	for _, f := range families {
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8112, "K")
	}
	expectNoAnswer(t, "tcp", b.Client, b.NodeIP4.String(), 8110) // its element was deleted by hand: repair does not invent claims
	expectAnswer(t, "tcp", b.Client, b.NodeIP6.String(), 8110, "A")
	// Hairpin: A reaches its own host port through the node (needs the masquerade rules).
	if got, err := tb.Dial("tcp", a.NetNS, b.NodeIP6.String(), 8110); err != nil || got != "A" {
		t.Errorf("hairpin of A after the layout was rewritten: %q, %v", got, err)
	}
	if got := foreignTables(t, b); got != foreign {
		t.Errorf("foreign tables changed by repair:\n%s\n---\n%s", foreign, got)
	}

	// gc: K is the only valid attachment of pg; A's remaining (IPv6) claim goes.
	res, code = ctl(t, b, "gc", "--network", pg.Name, "--valid", k.ContainerID)
	if code != 0 || !strings.Contains(res.Stdout, a.ContainerID) {
		t.Fatalf("gc: exit %d\n%s%s", code, res.Stdout, res.Stderr)
	}
	if tbl := b.MustExec(b.Node, "nft", "list", "table", "inet", "portguard"); strings.Contains(tbl, a.ContainerID) || !strings.Contains(tbl, k.ContainerID) {
		t.Errorf("after gc: want K's elements only:\n%s", tbl)
	}
	expectNoAnswer(t, "tcp", b.Client, b.NodeIP6.String(), 8110)
	expectAnswer(t, "tcp", b.Client, b.NodeIP6.String(), 8112, "K")
}

// A claim split between iptables and portguard's table: upstream portmap's iptables backend
// claimed portguard pod P's port after P (it never looks at nftables) and its pod S died
// without DEL; iptables' nat runs first, so the port is dead in both families. audit
// reports the split claim; repair removes S's whole iptables attachment (its chain and
// jumps, as S's DEL would) and nothing else; P answers again.
func TestNFTRepairSplitWithIPTables(t *testing.T) {
	t.Parallel()
	b, pg, _ := nftBed(t)
	if v, _ := b.Exec(b.Node, "iptables", "-V"); v == "" {
		t.Skip("no iptables on this machine")
	}
	ipt := b.Network(tb.NetConfig{PortPlugin: "portmap", Bridge: "cni2"})
	foreign := foreignTables(t, b)
	p, s, k := b.NewPod("P"), b.NewPod("S"), b.NewPod("K")
	for _, x := range []*tb.Pod{p, s, k} {
		x.Serve(80)
	}
	pg.MustAdd(p, tb.TCP(8095, 80))
	ipt.MustAdd(s, tb.TCP(8095, 80))
	ipt.MustAdd(k, tb.TCP(8096, 80))
	for _, f := range families {
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8095, "S")
	}
	s.Kill()
	rep, code := nftAudit(t, b)
	if k := nftKinds(rep); code != 1 || k[plan.KindSplitClaim] != 2 {
		t.Fatalf("audit: exit %d, nftables problems %v; want split-claim in both families", code, k)
	}
	dry, _ := ctl(t, b, "repair", "--dry-run")
	if !strings.Contains(dry.Stdout, "# iptables: remove the attachment of stale owner") {
		t.Errorf("repair --dry-run:\n%s", dry.Stdout)
	}
	res, code := ctl(t, b, "repair")
	if code != 0 {
		t.Fatalf("repair: exit %d\n%s%s", code, res.Stdout, res.Stderr)
	}
	for _, f := range families {
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8095, "P")
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8096, "K")
		if got := jumpsTo(b, f, s.Chain(ipt)); len(got) != 0 || strings.Contains(strings.Join(b.DNChains(f), " "), s.Chain(ipt)) {
			t.Errorf("%s: S's iptables attachment left: %v", f, got)
		}
		if got := jumpsTo(b, f, k.Chain(ipt)); len(got) == 0 {
			t.Errorf("%s: K's iptables attachment went too", f)
		}
	}
	if got := foreignTables(t, b); got != foreign {
		t.Errorf("foreign tables changed by repair:\n%s\n---\n%s", foreign, got)
	}
}
