package main

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

// TestNFTGeneratorMatchesUpstream loads N attachments from the generator in one namespace,
// lets upstream portmap's nftables backend ADD the same attachments in another, and
// requires identical `ip cni_hostport` tables: the bench's pre-existing upstream-nft
// attachments are exactly what upstream writes.
func TestNFTGeneratorMatchesUpstream(t *testing.T) {
	upstream, _ := needRoot(t)
	const n = 3
	gen, real := fmt.Sprintf("%s%d-ngen", nsPrefix, os.Getpid()), fmt.Sprintf("%s%d-nup", nsPrefix, os.Getpid())
	pod := real + "-pod"
	for _, ns := range []string{gen, real, pod} {
		if out, err := runOut("ip", "netns", "add", ns); err != nil {
			t.Fatal(out, err)
		}
		defer runOut("ip", "netns", "del", ns)
	}
	if err := nftLoad(gen, upstreamNFTTable(n)); err != nil {
		t.Fatal(err)
	}
	p := plugin{Name: "upstream-nft", Type: "portmap", Path: upstream, Backend: "nftables"}
	for i := 0; i < n; i++ {
		a := existingAttachment(i)
		nsExec(t, real, []string{"CNI_COMMAND=ADD", "CNI_CONTAINERID=" + a.ID, "CNI_NETNS=/var/run/netns/" + pod,
			"CNI_IFNAME=eth0", "CNI_PATH=/nonexistent"}, string(netConf(p, a, "/var/run/netns/"+pod, true)), upstream)
	}
	list := func(ns string) string { return nsExec(t, ns, nil, "", "nft", "list", "table", "ip", "cni_hostport") }
	if g, u := list(gen), list(real); g != u {
		t.Errorf("generated table differs from upstream's:\n%s", diffSummary(u, g))
	}
}

// TestKubeProxyNFTLoads loads the kube-proxy nftables table the bench generates and checks
// its size: a service chain per service, an endpoint chain per endpoint, and the service
// map holding every service.
func TestKubeProxyNFTLoads(t *testing.T) {
	needRoot(t)
	ns := fmt.Sprintf("%s%d-kp", nsPrefix, os.Getpid())
	if out, err := runOut("ip", "netns", "add", ns); err != nil {
		t.Fatal(out, err)
	}
	defer runOut("ip", "netns", "del", ns)
	script, chains := kubeProxyNFT(30)
	if err := nftLoad(ns, script); err != nil {
		t.Fatal(err)
	}
	out := nsExec(t, ns, nil, "", "nft", "list", "table", "ip", "kube-proxy")
	if got := strings.Count(out, "\tchain "); got != chains {
		t.Errorf("%d chains listed, generator says %d", got, chains)
	}
	if got := strings.Count(out, " : goto service-"); got != 30+3 { // 30 ClusterIPs, 3 NodePorts
		t.Errorf("%d service map entries, want 33:\n%s", got, out)
	}
}

// TestReportWellFormedNFT renders a synthetic -backend nftables report (no root needed).
func TestReportWellFormedNFT(t *testing.T) {
	opts, err := parseFlags([]string{"-backend", "nftables", "-n", "0,1000", "-m", "100"})
	if err != nil {
		t.Fatal(err)
	}
	if !opts.Only["CONN"] || opts.Only["TAKEOVER"] {
		t.Errorf("default ops of -backend nftables: %v", opts.Only)
	}
	names := []string{upNFT, pgNFT, upIPT, pgNFT0}
	rep := &report{Opts: opts, Machine: machineInfo(), Plugins: map[string]string{}, Present: map[string]bool{}, Elapsed: time.Second}
	for _, n := range names {
		rep.Plugins[n], rep.Present[n] = "x", true
	}
	for _, n := range opts.Ns {
		s := scenarioResult{M: 100, N: n, StateStable: true, ForeignUntouched: true, Verified: map[string]string{}}
		for _, p := range names {
			s.Verified[p] = "ok"
			for _, op := range ops {
				s.Ops = append(s.Ops, opStats{Plugin: p, Op: op, Ms: []float64{30, 10, 20}, Procs: 3})
			}
			s.Drain = append(s.Drain, drainStats{Plugin: p, Attachments: 100, Par: 10, AddMs: 1000, DelMs: 900, Installed: 100})
			s.Conn = append(s.Conn, connStats{Plugin: p, Runs: 10, ClaimUs: 30, ClaimP90: 40, DirectUs: 20})
		}
		rep.Scenarios = append(rep.Scenarios, s)
	}
	md := rep.markdown()
	tables := mdTables(md)
	if len(tables) != 5 { // verbs, flatness, drain, conn, checks (the baseline plugin absent: "not built" cells)
		t.Fatalf("%d tables, want 5:\n%s", len(tables), md)
	}
	for i, tb := range tables {
		for _, r := range tb {
			if len(r) != len(tb[0]) {
				t.Errorf("table %d: row %v has %d cells, header %d", i, r, len(r), len(tb[0]))
			}
		}
	}
	if got := len(tables[0]) - 2; got != 2*3 {
		t.Errorf("verbs table has %d rows, want 6", got)
	}
	if r := tables[0][2]; r[3] != "20.0 ms" || r[7] != "1.0×" {
		t.Errorf("first row %v: want median 20.0 ms, ratio 1.0×", r)
	}
	if r := tables[1][2]; r[5] != "1.0×" {
		t.Errorf("flatness row %v: N / none want 1.0×", r)
	}
	if r := tables[3][2]; r[6] != "+10.0" {
		t.Errorf("conn row %v: claim − direct want +10.0", r)
	}
	if !rep.ok() {
		t.Error("synthetic report not ok")
	}
}
