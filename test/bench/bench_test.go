package main

import (
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"
)

// mdTables splits markdown into its pipe tables (rows of cells, header first).
func mdTables(md string) [][][]string {
	var tables [][][]string
	var cur [][]string
	for _, line := range strings.Split(md, "\n") {
		if !strings.HasPrefix(line, "|") {
			if cur != nil {
				tables = append(tables, cur)
				cur = nil
			}
			continue
		}
		inner := strings.TrimSuffix(strings.TrimPrefix(line, "|"), "|")
		var cells []string
		for _, c := range strings.Split(inner, " | ") {
			cells = append(cells, strings.TrimSpace(c))
		}
		cur = append(cur, cells)
	}
	if cur != nil {
		tables = append(tables, cur)
	}
	return tables
}

var (
	reSep   = regexp.MustCompile(`^:?-{3,}:?$`)
	reTime  = regexp.MustCompile(`^\d+(\.\d+)? (ms|s)( \(\d+ failed\))?$`)
	reProcs = regexp.MustCompile(`^\d+( \(\d+ v6\))?$`)
	reRatio = regexp.MustCompile(`^(\d+\.\d×|–)$`)
	reMiB   = regexp.MustCompile(`^\d+\.\d MiB$`)
)

// checkReport asserts the report's tables are well-formed: every row as wide as its
// header, a separator row, one main-table row per (M, N, op), and cells that parse.
// present says which plugins must have numbers (the others must say "not built").
func checkReport(t *testing.T, md string, opts options, present map[string]bool) {
	t.Helper()
	tables := mdTables(md)
	if len(tables) == 0 {
		t.Fatalf("no tables in report:\n%s", md)
	}
	for i, tb := range tables {
		if len(tb) < 3 {
			t.Errorf("table %d has no rows: %v", i, tb)
			continue
		}
		for _, c := range tb[1] {
			if !reSep.MatchString(c) {
				t.Errorf("table %d: bad separator cell %q", i, c)
			}
		}
		for _, r := range tb {
			if len(r) != len(tb[0]) {
				t.Errorf("table %d: row %v has %d cells, header has %d", i, r, len(r), len(tb[0]))
			}
		}
	}
	mt := tables[0]
	if mt[0][2] != "op" || mt[0][3] != "upstream median" {
		t.Fatalf("first table is not the main table: %v", mt[0])
	}
	want := 0
	for _, op := range ops {
		if opts.Only[op] {
			want += len(opts.Ms) * len(opts.Ns)
		}
	}
	if got := len(mt) - 2; got != want {
		t.Errorf("main table has %d rows, want %d", got, want)
	}
	check := func(plugin, cell string, re *regexp.Regexp, row []string) {
		if !present[plugin] {
			if cell != "not built" {
				t.Errorf("%s is absent but row %v says %q", plugin, row, cell)
			}
			return
		}
		if !re.MatchString(cell) {
			t.Errorf("%s: cell %q in row %v does not match %s", plugin, cell, row, re)
		}
	}
	for _, r := range mt[2:] {
		if len(r) != 12 {
			continue
		}
		check("upstream", r[3], reTime, r)
		check("upstream", r[4], reTime, r)
		check("portguard", r[5], reTime, r)
		check("portguard", r[6], reTime, r)
		if !reRatio.MatchString(r[7]) {
			t.Errorf("ratio %q in row %v", r[7], r)
		}
		check("upstream", r[8], reProcs, r)
		check("portguard", r[9], reProcs, r)
		check("upstream", r[10], reMiB, r)
		check("portguard", r[11], reMiB, r)
		if present["upstream"] && r[2] == "ADD" && strings.HasPrefix(r[8], "0") {
			t.Errorf("upstream ADD started no iptables process: %v", r)
		}
	}
	for _, s := range []string{"- machine: ", "- command: `", "### Checks"} {
		if !strings.Contains(md, s) {
			t.Errorf("report lacks %q", s)
		}
	}
}

// TestReportWellFormed renders a synthetic report (no root needed).
func TestReportWellFormed(t *testing.T) {
	opts, err := parseFlags([]string{"-quick"})
	if err != nil {
		t.Fatal(err)
	}
	rep := &report{Opts: opts, Machine: machineInfo(), Plugins: map[string]string{"upstream": "x", "portguard": "not built"},
		Present: map[string]bool{"upstream": true}, Elapsed: time.Second}
	for _, m := range opts.Ms {
		for _, n := range opts.Ns {
			s := scenarioResult{M: m, N: n, StateStable: true, ForeignUntouched: true, Verified: map[string]string{"upstream": "ok"}}
			for _, op := range ops {
				st := opStats{Plugin: "upstream", Op: op, Ms: []float64{3, 1, 2}, RSSKiB: 9000, Procs: 20, ProcsV6: 4}
				s.Ops = append(s.Ops, st)
				s.NoMap = append(s.NoMap, st)
			}
			s.Drain = []drainStats{{Plugin: "upstream", Attachments: 20, Par: 10, AddMs: 1000, DelMs: 900, Installed: 20}}
			s.Takeover = []takeoverStats{{Plugin: "portguard", Mappings: opts.Range, VictimMs: 200, Ms: []float64{30, 40}, Verified: "ok"}}
			rep.Scenarios = append(rep.Scenarios, s)
		}
	}
	md := rep.markdown()
	checkReport(t, md, opts, rep.Present)
	if !rep.ok() {
		t.Error("synthetic report not ok")
	}
	if median([]float64{3, 1, 2, 10}) != 2.5 || p90([]float64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}) != 9 {
		t.Error("median/p90")
	}
}

func needRoot(t *testing.T) (upstream, portguard string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces, iptables)")
	}
	for _, c := range []string{"ip", "iptables-restore", "iptables-save"} {
		if _, err := exec.LookPath(c); err != nil {
			t.Skipf("%s not installed (make deps)", c)
		}
	}
	portguard, upstream = defaultBins()
	if _, err := os.Stat(upstream); err != nil {
		t.Skipf("upstream portmap not installed at %s (make deps)", upstream)
	}
	return upstream, portguard
}

func nsExec(t *testing.T, ns string, env []string, stdin string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns, name}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v in %s: %v\n%s", name, args, ns, err, out)
	}
	return string(out)
}

func natSave(t *testing.T, ns string) string {
	var b strings.Builder
	for _, l := range strings.Split(nsExec(t, ns, nil, "", "iptables-save", "-t", "nat"), "\n") {
		if strings.HasPrefix(l, "#") || l == "" {
			continue
		}
		if strings.HasPrefix(l, ":") {
			l = l[:strings.LastIndex(l, " [")]
		}
		b.WriteString(l + "\n")
	}
	return b.String()
}

// TestGeneratorMatchesUpstream restores N attachments from the generator in one
// namespace, lets upstream portmap ADD the same attachments in another, and requires
// identical nat tables: the bench's pre-existing attachments are exactly upstream's.
func TestGeneratorMatchesUpstream(t *testing.T) {
	upstream, _ := needRoot(t)
	const n = 3
	gen, real := fmt.Sprintf("%s%d-gen", nsPrefix, os.Getpid()), fmt.Sprintf("%s%d-up", nsPrefix, os.Getpid())
	pod := real + "-pod"
	for _, ns := range []string{gen, real, pod} {
		if out, err := runOut("ip", "netns", "add", ns); err != nil {
			t.Fatal(out, err)
		}
		defer runOut("ip", "netns", "del", ns)
	}
	payload, _, _ := natPayload(0, n)
	nsExec(t, gen, nil, payload, "iptables-restore", "-w")
	p := plugin{Name: "upstream", Type: "portmap", Path: upstream}
	for i := 0; i < n; i++ {
		a := existingAttachment(i)
		nsExec(t, real, []string{"CNI_COMMAND=ADD", "CNI_CONTAINERID=" + a.ID, "CNI_NETNS=/var/run/netns/" + pod,
			"CNI_IFNAME=eth0", "CNI_PATH=/nonexistent"}, string(netConf(p, a, "/var/run/netns/"+pod, true)), upstream)
	}
	if g, u := natSave(t, gen), natSave(t, real); g != u {
		t.Errorf("generated table differs from upstream's:\n%s", diffSummary(u, g))
	}
}

// TestQuick runs `bench -quick` (both plugins when bin/portguard exists, else upstream
// only) and checks the report's shape and the run's sanity, not its timings.
func TestQuick(t *testing.T) {
	_, portguard := needRoot(t)
	if testing.Short() {
		t.Skip("short mode")
	}
	args := []string{"-quick"}
	opts, err := parseFlags(args)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := runBench(opts)
	if err != nil {
		t.Fatal(err)
	}
	md := rep.markdown()
	t.Logf("\n%s", md)
	present := map[string]bool{"upstream": true}
	if _, err := os.Stat(portguard); err == nil {
		present["portguard"] = true
	}
	for name := range present {
		if !rep.Present[name] {
			t.Errorf("%s exists but the bench did not run it", name)
		}
	}
	checkReport(t, md, opts, present)
	for _, s := range rep.Scenarios {
		if s.Err != "" {
			t.Errorf("M=%d N=%d: %s", s.M, s.N, s.Err)
			continue
		}
		for name := range present {
			if v := s.Verified[name]; v != "ok" {
				t.Errorf("M=%d N=%d %s: %s", s.M, s.N, name, v)
			}
		}
		if !s.ForeignUntouched {
			t.Errorf("M=%d N=%d: foreign rules changed:\n%s", s.M, s.N, s.StateDiff)
		}
		for _, o := range append(s.Ops, s.NoMap...) {
			if o.Failures > 0 {
				t.Errorf("M=%d N=%d %s %s: %d calls failed: %s", s.M, s.N, o.Plugin, o.Op, o.Failures, o.FirstErr)
			}
		}
	}
}
