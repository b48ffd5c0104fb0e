package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/lock"
	"github.com/portguard/portguard/pkg/metrics/metricstest"
	"github.com/portguard/portguard/pkg/plan"
)

var (
	net1    = "cbr0"
	stale   = hostport.Owner{Network: net1, ContainerID: "0f1e2d3c4b5a69788796a5b4c3d2e1f0stale"}
	live    = hostport.Owner{Network: net1, ContainerID: "9a8b7c6d5e4f30211203f4e5d6c7b8a9live"}
	wrong   = hostport.Owner{Network: net1, ContainerID: "5555aaaa6666bbbb7777cccc8888wrong"}
	other   = hostport.Owner{Network: "podman", ContainerID: "abcdef0123456789other"}
	auditV4 = []string{"audit", "--family", "4", "-o", "json"}
)

func auditJSON(t *testing.T, ns string, args ...string) (plan.AuditReport, int) {
	t.Helper()
	r := ctl(t, ns, append([]string{"audit", "-o", "json"}, args...)...)
	if r.code == 2 {
		t.Fatalf("audit: exit 2: %s", r.stderr)
	}
	var rep plan.AuditReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("audit -o json: %v\n%s", err, r.stdout)
	}
	return rep, r.code
}

func problemKinds(rep plan.AuditReport) map[string]int {
	out := map[string]int{}
	for _, fa := range rep.Families {
		for _, p := range fa.Problems {
			out[p.Kind]++
		}
	}
	return out
}

// TestEachFindingDetectedAndRepaired builds each problem with upstream-format rules next to
// non-CNI rules, checks that audit reports exactly it (exit 1), that repair fixes it (exit
// 0, audit healthy afterwards), and that the non-CNI rules stay byte-identical.
func TestEachFindingDetectedAndRepaired(t *testing.T) {
	needRoot(t)
	cases := []struct {
		name  string
		f     hostport.Family
		build func(u *upstream)
		want  map[string]int
	}{
		{"healthy upstream node", hostport.V4, func(u *upstream) {
			u.attach(live, 8080, 8080, "10.88.0.0/24", "10.88.0.3", 80)
			u.attach(other, 9090, 9090, "10.88.0.0/24", "10.88.0.4", 90)
		}, map[string]int{}},
		{"shadowed claim", hostport.V4, func(u *upstream) {
			u.attach(stale, 8080, 8080, "10.88.0.0/24", "10.88.0.2", 80)
			u.attach(live, 8080, 8080, "10.88.0.0/24", "10.88.0.3", 80)
		}, map[string]int{plan.KindShadowedClaim: 1}},
		{"shadowed claim ipv6", hostport.V6, func(u *upstream) {
			u.attach(stale, 8080, 8080, "fd00:88::/64", "fd00:88::2", 80)
			u.attach(live, 8080, 8080, "fd00:88::/64", "fd00:88::3", 80)
		}, map[string]int{plan.KindShadowedClaim: 1}},
		{"duplicate jump", hostport.V4, func(u *upstream) {
			u.attach(live, 8080, 8080, "10.88.0.0/24", "10.88.0.3", 80)
			u.jump(live, 8080)
		}, map[string]int{plan.KindDuplicateJump: 1}},
		{"orphan chains", hostport.V4, func(u *upstream) {
			u.attach(live, 8080, 8080, "10.88.0.0/24", "10.88.0.3", 80)
			ch := u.attach(stale, 9090, 9090, "10.88.0.0/24", "10.88.0.2", 90)
			ipt(t, u.ns, u.f, "-D", "CNI-HOSTPORT-DNAT", "-m", "comment", "--comment",
				fmt.Sprintf(`dnat name: "%s" id: "%s"`, stale.Network, stale.ContainerID),
				"-m", "multiport", "-p", "tcp", "--destination-ports", "9090", "-j", ch)
			// upstream leaks an empty chain when a rule fails half-way (hostPort 70000)
			ipt(t, u.ns, u.f, "-N", hostport.ChainName(other))
		}, map[string]int{plan.KindOrphanChain: 2}},
		{"port mismatch (blog post)", hostport.V4, func(u *upstream) {
			u.attach(wrong, 8080, 8086, "10.88.0.0/24", "10.88.0.5", 80)
			u.attach(live, 8080, 8080, "10.88.0.0/24", "10.88.0.3", 80)
		}, map[string]int{plan.KindPortMismatch: 1}},
		{"missing entry jumps", hostport.V4, func(u *upstream) {
			u.attach(live, 8080, 8080, "10.88.0.0/24", "10.88.0.3", 80)
			for _, ch := range []string{"PREROUTING", "OUTPUT"} {
				ipt(t, u.ns, u.f, "-D", ch, "-m", "addrtype", "--dst-type", "LOCAL", "-j", "CNI-HOSTPORT-DNAT")
			}
		}, map[string]int{plan.KindMissingEntryJump: 2}},
		{"missing setmark", hostport.V4, func(u *upstream) {
			u.attach(live, 8080, 8080, "10.88.0.0/24", "10.88.0.3", 80)
			ipt(t, u.ns, u.f, "-F", "CNI-HOSTPORT-SETMARK")
		}, map[string]int{plan.KindMissingSetMark: 1}},
		{"missing masq chain and jump", hostport.V4, func(u *upstream) {
			u.attach(live, 8080, 8080, "10.88.0.0/24", "10.88.0.3", 80)
			ipt(t, u.ns, u.f, "-D", "POSTROUTING", "-m", "comment", "--comment", "CNI portfwd requiring masquerade", "-j", "CNI-HOSTPORT-MASQ")
			ipt(t, u.ns, u.f, "-F", "CNI-HOSTPORT-MASQ")
			ipt(t, u.ns, u.f, "-X", "CNI-HOSTPORT-MASQ")
		}, map[string]int{plan.KindMissingMasq: 1, plan.KindMissingMasqJump: 1}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ns := newNS(t)
			foreign(t, ns, tc.f)
			tc.build(newUpstream(t, ns, tc.f))
			before := saveNat(t, ns, tc.f)
			fam := fmt.Sprint(int(tc.f))

			rep, code := auditJSON(t, ns, "--family", fam)
			got := problemKinds(rep)
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Fatalf("audit problems %v, want %v\n%s", got, tc.want, before)
			}
			wantCode := 1
			if len(tc.want) == 0 {
				wantCode = 0
			}
			if code != wantCode || rep.Healthy != (wantCode == 0) {
				t.Fatalf("audit exit %d healthy %v, want exit %d", code, rep.Healthy, wantCode)
			}
			validateShape(t, []byte(mustJSON(t, rep)))

			r := ctl(t, ns, "repair", "--family", fam)
			if r.code != 0 || !strings.Contains(r.stdout, "audit after repair: healthy") {
				t.Fatalf("repair: exit %d\n%s\n%s\n%s", r.code, r.stdout, r.stderr, saveNat(t, ns, tc.f))
			}
			rep, code = auditJSON(t, ns, "--family", fam)
			if code != 0 || !rep.Healthy {
				t.Fatalf("audit after repair: exit %d: %+v", code, rep.Families)
			}
			after := saveNat(t, ns, tc.f)
			if a, b := foreignRules(before), foreignRules(after); a != b || a == "" {
				t.Fatalf("non-CNI rules changed:\nbefore:\n%s\nafter:\n%s", a, b)
			}
			if len(tc.want) == 0 && before != after {
				t.Fatalf("repair changed a healthy table:\n%s\n---\n%s", before, after)
			}
			// A second repair has nothing to do.
			if r := ctl(t, ns, "repair", "--family", fam); r.code != 0 || !strings.Contains(r.stdout, "nothing to repair") {
				t.Fatalf("second repair: exit %d: %s", r.code, r.stdout)
			}
		})
	}
}

func mustJSON(t *testing.T, v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestDryRunChangesNothing: --dry-run prints the payload and the table stays identical;
// the printed payload, fed to iptables-restore by hand, is the repair.
func TestDryRunChangesNothing(t *testing.T) {
	needRoot(t)
	ns := newNS(t)
	foreign(t, ns, hostport.V4)
	u := newUpstream(t, ns, hostport.V4)
	u.attach(wrong, 8080, 8086, "10.88.0.0/24", "10.88.0.5", 80)
	u.attach(stale, 8080, 8080, "10.88.0.0/24", "10.88.0.2", 80)
	u.attach(live, 8080, 8080, "10.88.0.0/24", "10.88.0.3", 80)
	ipt(t, ns, hostport.V4, "-N", hostport.ChainName(other))
	before := saveNat(t, ns, hostport.V4)
	before6 := saveNat(t, ns, hostport.V6)

	r := ctl(t, ns, "repair", "--dry-run")
	if r.code != 0 {
		t.Fatalf("dry-run: exit %d: %s", r.code, r.stderr)
	}
	if after := saveNat(t, ns, hostport.V4); after != before {
		t.Fatalf("--dry-run changed the table:\n%s\n---\n%s", before, after)
	}
	if after := saveNat(t, ns, hostport.V6); after != before6 {
		t.Fatalf("--dry-run changed the ipv6 table")
	}
	for _, want := range []string{"*nat", "COMMIT", "-X " + hostport.ChainName(other), "-X " + hostport.ChainName(wrong), "-X " + hostport.ChainName(stale), "# ipv6: nothing to repair"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("dry-run output lacks %q:\n%s", want, r.stdout)
		}
	}
	// The payload is exact: applying it by hand is the repair.
	var payload []string
	for _, l := range strings.Split(r.stdout, "\n") {
		if strings.HasPrefix(l, "# ipv6") {
			break
		}
		payload = append(payload, l)
	}
	cmd := exec.Command("ip", "netns", "exec", ns, "iptables-restore", "--noflush")
	cmd.Stdin = strings.NewReader(strings.Join(payload, "\n"))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("iptables-restore of the dry-run payload: %v: %s\n%s", err, out, strings.Join(payload, "\n"))
	}
	rep, code := auditJSON(t, ns)
	if code != 0 {
		t.Fatalf("audit after applying the dry-run payload: %d %+v", code, rep)
	}
	if foreignRules(before) != foreignRules(saveNat(t, ns, hostport.V4)) {
		t.Fatal("non-CNI rules changed")
	}
}

// podNet connects a pod namespace to the node namespace with a veth: node 10.88.0.1/24,
// pod IP/24 with a default route via the node. socat in the pod answers with its name.
func podNet(t *testing.T, node, podIP, name string) {
	pod := newNS(t)
	host := "veth" + strings.ReplaceAll(podIP, ".", "")[4:]
	mustNS(t, node, "ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", pod)
	mustNS(t, node, "ip", "link", "set", host, "up")
	mustNS(t, node, "ip", "route", "add", podIP+"/32", "dev", host)
	mustNS(t, node, "sysctl", "-qw", "net.ipv4.conf."+host+".proxy_arp=1")
	mustNS(t, pod, "ip", "addr", "add", podIP+"/24", "dev", "eth0")
	mustNS(t, pod, "ip", "link", "set", "eth0", "up")
	mustNS(t, pod, "ip", "route", "add", "10.88.0.1/32", "dev", "eth0")
	mustNS(t, pod, "ip", "route", "add", "default", "via", "10.88.0.1", "dev", "eth0")
	cmd := exec.Command("ip", "netns", "exec", pod, "socat", "TCP-LISTEN:80,fork,reuseaddr", "SYSTEM:echo "+name)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if out := inNS(t, pod, nil, "ss", "-Htln", "sport", "= :80"); strings.Contains(out.stdout, ":80") {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("socat in %s did not listen", pod)
}

// connect opens addr from the namespace and returns what the server said ("" on failure),
// bounded by 2 seconds.
func connect(t *testing.T, ns, addr string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Second)
	defer cancel()
	out, _ := exec.CommandContext(ctx, "ip", "netns", "exec", ns, "socat", "-T2", "-", "TCP:"+addr+",connect-timeout=2").Output()
	return strings.TrimSpace(string(out))
}

// TestBlogPostStateReachesLivePod: the post's node (a jump on 8080 whose chain DNATs
// --dport 8086, plus a stale claim on 8080 that upstream's append order lets win over the
// live pod's). Packets to the node's IP:8080 go to the dead pod; audit says why; repair
// --keep the live pod removes the stale claim and the mismatched chain, and the packet
// reaches the live pod.
func TestBlogPostStateReachesLivePod(t *testing.T) {
	needRoot(t)
	if _, err := exec.LookPath("socat"); err != nil {
		t.Skip("socat not installed")
	}
	node := newNS(t)
	mustNS(t, node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	mustNS(t, node, "ip", "addr", "add", "198.51.100.1/32", "dev", "lo") // the node's own IP
	mustNS(t, node, "ip", "addr", "add", "10.88.0.1/32", "dev", "lo")
	podNet(t, node, "10.88.0.3", "live-pod")
	foreign(t, node, hostport.V4)
	u := newUpstream(t, node, hostport.V4)
	u.attach(stale, 8080, 8080, "10.88.0.0/24", "10.88.0.2", 80) // pod gone: nothing at .2
	u.attach(wrong, 8080, 8086, "10.88.0.0/24", "10.88.0.3", 80) // the post's dpt:8086
	u.attach(live, 8080, 8080, "10.88.0.0/24", "10.88.0.3", 80)  // appended last: shadowed
	before := saveNat(t, node, hostport.V4)

	if got := connect(t, node, "10.88.0.3:80"); got != "live-pod" {
		t.Fatalf("pod not reachable directly: %q", got)
	}
	if got := connect(t, node, "198.51.100.1:8080"); got != "" {
		t.Fatalf("before repair the stale claim should blackhole 8080, got %q", got)
	}
	r := ctl(t, node, "audit", "--family", "4")
	if r.code != 1 {
		t.Fatalf("audit exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	for _, want := range []string{"shadowed-claim", "port-mismatch", "tcp/8086", "shadowed by " + hostport.ChainName(stale), "no-dnat", "--keep " + live.String()} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("audit table lacks %q:\n%s", want, r.stdout)
		}
	}
	t.Logf("audit before repair:\n%s", r.stdout)

	r = ctl(t, node, "repair", "--keep", live.String())
	if r.code != 0 {
		t.Fatalf("repair: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	t.Logf("repair:\n%s", r.stdout)
	if got := connect(t, node, "198.51.100.1:8080"); got != "live-pod" {
		t.Fatalf("after repair node:8080 answered %q, want live-pod\n%s", got, saveNat(t, node, hostport.V4))
	}
	r = ctl(t, node, "audit")
	if r.code != 0 {
		t.Fatalf("audit after repair: exit %d\n%s", r.code, r.stdout)
	}
	t.Logf("audit after repair:\n%s", r.stdout)
	if foreignRules(before) != foreignRules(saveNat(t, node, hostport.V4)) {
		t.Fatal("non-CNI rules changed")
	}
	for _, gone := range []string{hostport.ChainName(stale), hostport.ChainName(wrong)} {
		if strings.Contains(saveNat(t, node, hostport.V4), gone) {
			t.Errorf("%s still present", gone)
		}
	}
}

// TestRepairDefaultKeepsTheLastAdded: without --keep, repair keeps the last claim on a
// port (the last jump in CNI-HOSTPORT-DNAT), so traffic moves off the claim that wins
// today. Upstream appends each new jump, so the last claim on a port is the last added:
// the live pod's, in the blog post's story.
func TestRepairDefaultKeepsTheLastAdded(t *testing.T) {
	needRoot(t)
	ns := newNS(t)
	u := newUpstream(t, ns, hostport.V4)
	u.attach(stale, 8080, 8080, "10.88.0.0/24", "10.88.0.2", 80)
	u.attach(live, 8080, 8080, "10.88.0.0/24", "10.88.0.3", 80)
	if r := ctl(t, ns, "repair"); r.code != 0 {
		t.Fatalf("repair: %d %s %s", r.code, r.stdout, r.stderr)
	}
	rep, _ := auditJSON(t, ns, "--family", "4")
	cl := rep.Families[0].Ports[0].Claims
	if len(cl) != 1 || cl[0].ContainerID != live.ContainerID || cl[0].Status != plan.StatusWins {
		t.Fatalf("claims after repair: %+v", cl)
	}
	// --keep for an owner that has no claim is a usage error, and changes nothing.
	if r := ctl(t, ns, "repair", "--keep", "cbr0/nosuchcontainer"); r.code != 2 || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
		t.Fatalf("unknown --keep: exit %d stderr %q", r.code, r.stderr)
	}
}

func TestGC(t *testing.T) {
	needRoot(t)
	ns := newNS(t)
	u := newUpstream(t, ns, hostport.V4)
	u.attach(stale, 8080, 8080, "10.88.0.0/24", "10.88.0.2", 80)
	u.attach(live, 8081, 8081, "10.88.0.0/24", "10.88.0.3", 80)
	u.attach(other, 8082, 8082, "10.88.0.0/24", "10.88.0.4", 80)
	r := ctl(t, ns, "gc", "--network", net1, "--valid", live.ContainerID+"/eth0")
	if r.code != 0 || !strings.Contains(r.stdout, "removed "+stale.String()) {
		t.Fatalf("gc: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	save := saveNat(t, ns, hostport.V4)
	if strings.Contains(save, hostport.ChainName(stale)) || !strings.Contains(save, hostport.ChainName(live)) || !strings.Contains(save, hostport.ChainName(other)) {
		t.Fatalf("gc removed the wrong chains:\n%s", save)
	}
	if r := ctl(t, ns, "gc", "--network", net1); r.code != 2 {
		t.Fatalf("gc without --valid: exit %d", r.code)
	}
}

func TestPrometheusOutput(t *testing.T) {
	needRoot(t)
	ns := newNS(t)
	u := newUpstream(t, ns, hostport.V4)
	u.attach(stale, 8080, 8080, "10.88.0.0/24", "10.88.0.2", 80)
	u.attach(live, 8080, 8080, "10.88.0.0/24", "10.88.0.3", 80)
	ipt(t, ns, hostport.V4, "-N", hostport.ChainName(other))
	r := ctl(t, ns, "audit", "-o", "prometheus")
	// An exporter exits 0 when it could collect; the problems are in the metrics.
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	fams, err := metricstest.Parse(strings.NewReader(r.stdout))
	if err != nil {
		t.Fatalf("exposition does not parse: %v\n%s", err, r.stdout)
	}
	checkAuditMetrics(t, fams)

	// --textfile: the same metrics in a file written atomically; nothing on stdout, no
	// temporary file left behind.
	dir := t.TempDir()
	path := filepath.Join(dir, "portguard.prom")
	if err := os.WriteFile(path, []byte("old\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	r = ctl(t, ns, "audit", "-o", "prometheus", "--textfile", path)
	if r.code != 0 || r.stdout != "" {
		t.Fatalf("--textfile: exit %d stdout %q stderr %s", r.code, r.stdout, r.stderr)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fams, err = metricstest.Parse(f)
	if err != nil {
		t.Fatalf("textfile does not parse: %v", err)
	}
	checkAuditMetrics(t, fams)
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o644 {
		t.Errorf("textfile mode %v, want 0644 (node-exporter reads it as another user)", st.Mode().Perm())
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("textfile dir holds %d entries, want only portguard.prom", len(ents))
	}
	if r := ctl(t, ns, "audit", "--textfile", path); r.code != 2 {
		t.Errorf("--textfile without -o prometheus: exit %d, want 2", r.code)
	}
}

// checkAuditMetrics checks the metrics of TestPrometheusOutput's node: a stale and a live
// claim on one port (one shadowed), one orphan chain, IPv6 empty.
func checkAuditMetrics(t *testing.T, fams metricstest.Families) {
	t.Helper()
	v4 := metricstest.L("family", "ipv4", "backend", "iptables")
	v6 := metricstest.L("family", "ipv6", "backend", "iptables")
	for _, w := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"portguard_claims", v4, 2}, {"portguard_shadowed_claims", v4, 1}, {"portguard_duplicate_claims", v4, 1},
		{"portguard_audit_healthy", v4, 0}, {"portguard_orphan_chains", v4, 1}, {"portguard_port_mismatches", v4, 0},
		{"portguard_claims", v6, 0}, {"portguard_audit_up", v4, 1},
	} {
		got, ok := fams.Value(w.name, w.labels)
		if !ok || got != w.want {
			t.Errorf("%s%v = %v (present %v), want %v", w.name, w.labels, got, ok, w.want)
		}
	}
	if typ := fams.Type("portguard_claims"); typ != "GAUGE" {
		t.Errorf("portguard_claims has type %q, want GAUGE", typ)
	}
	if _, ok := fams.Value("portguard_audit_timestamp_seconds", nil); !ok {
		t.Error("no portguard_audit_timestamp_seconds")
	}
}

// TestKilledRepairKeepsTheLockUntilItsPayloadLands: repair's iptables-restore inherits the
// host-wide lock, so a repair SIGKILLed while its payload is pending keeps the lock held
// until the payload has landed: no plugin call can read the half-written moment.
func TestKilledRepairKeepsTheLockUntilItsPayloadLands(t *testing.T) {
	needRoot(t)
	ns := newNS(t)
	u := newUpstream(t, ns, hostport.V4)
	u.attach(stale, 8080, 8080, "10.88.0.0/24", "10.88.0.2", 80)
	u.attach(live, 8080, 8080, "10.88.0.0/24", "10.88.0.3", 80)

	// An iptables-restore that says when it starts, waits, runs the real one and says so.
	dir := t.TempDir()
	real, err := exec.LookPath("iptables-restore")
	if err != nil {
		t.Fatal(err)
	}
	mark := filepath.Join(dir, "mark")
	script := fmt.Sprintf("#!/bin/sh\necho s >>%s\nsleep 2\n'%s' \"$@\"\nrc=$?\necho d >>%s\nexit $rc\n", mark, real, mark)
	if err := os.WriteFile(filepath.Join(dir, "iptables-restore"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	lockFile := filepath.Join(dir, "portguard.lock")
	cmd := exec.Command("ip", "netns", "exec", ns, ctlBin, "repair", "--family", "4")
	cmd.Env = append(os.Environ(), "PORTGUARD_LOCK_FILE="+lockFile, "PATH="+dir+":"+os.Getenv("PATH"))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	marks := func() string { b, _ := os.ReadFile(mark); return string(b) }
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(marks(), "s") {
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatal("repair started no iptables-restore")
		}
		time.Sleep(5 * time.Millisecond)
	}
	cmd.Process.Kill() // portguardctl only; its iptables-restore goes on
	cmd.Wait()

	if l, err := lock.Acquire(lockFile, lock.Exclusive, 300*time.Millisecond); err == nil {
		l.Release()
		t.Fatalf("the lock was free while the killed repair's payload was pending (marks %q)", marks())
	}
	l, err := lock.Acquire(lockFile, lock.Exclusive, 20*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Release()
	if !strings.Contains(marks(), "d") {
		t.Fatalf("the lock came free before the payload landed (marks %q)", marks())
	}
	if save := saveNat(t, ns, hostport.V4); strings.Contains(save, hostport.ChainName(stale)) {
		t.Fatalf("the payload did not land:\n%s", save)
	}
}
