package main

// One scenario (M foreign rules, N existing attachments) runs in its own node network
// namespace: this file is the part that runs inside it (started by `ip netns exec`).

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
)

const envInner = "PGB_INNER" // path of the scenarioConfig JSON

type scenarioConfig struct {
	M, N, Runs      int
	Services        int // -backend nftables: kube-proxy nftables services per node
	ConnRuns        int
	Ops             map[string]bool
	Drain, DrainPar int
	DrainRuns       int
	Range           int // TAKEOVER victim's mappings
	Plugins         []plugin
	Env             callEnv
	WorkDir         string
	ResultFile      string
}

// opStats aggregates one (plugin, op).
type opStats struct {
	Plugin, Op  string
	Ms          []float64 // timed runs, no shim
	RSSKiB      int64     // max wait4 ru_maxrss over timed runs
	Procs       int       // iptables* processes in the counting call
	ProcsV6     int       // of which ip6tables*
	ProcMs      float64   // wall time those processes took
	ChildRSSKiB int64     // largest iptables child
	CountMs     float64   // duration of the counting call (with the shim)
	Cmds        []string  // commands of the counting call
	Failures    int
	FirstErr    string
}

type drainStats struct {
	Plugin           string
	Attachments, Par int
	AddRuns, DelRuns []float64 // wall time of each run's phase
	AddMs, DelMs     float64   // medians
	AddFail, DelFail int       // failed calls, all runs
	Installed        int       // fewest attachments whose DNAT rules were present after an ADD phase
	FirstErr         string
}

type scenarioResult struct {
	M, N             int
	ForeignRules     int
	CNIRules         int
	SetupMs          float64
	Ops              []opStats
	NoMap            []opStats
	Drain            []drainStats
	Takeover         []takeoverStats
	Conn             []connStats
	KubeChains       int               // chains of kube-proxy's nftables table on each node (-backend nftables)
	Verified         map[string]string // plugin -> "ok" or what was wrong with ADD/DEL effects
	StateStable      bool              // nat tables after all runs == after the warm-up round
	ForeignUntouched bool              // foreign (KUBE-*) lines unchanged from setup to end
	StateDiff        string
	Err              string
}

var ops = []string{"ADD", "CHECK", "DEL"}

func innerMain(cfgPath string) int {
	b, err := os.ReadFile(cfgPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench inner:", err)
		return 2
	}
	var cfg scenarioConfig
	if err := json.Unmarshal(b, &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "bench inner:", err)
		return 2
	}
	res := runScenario(cfg)
	out, _ := json.MarshalIndent(res, "", " ")
	if err := os.WriteFile(cfg.ResultFile, out, 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "bench inner:", err)
		return 2
	}
	return 0
}

func logf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "[bench %s] %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, a...))
}

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// setupNode brings up lo and a cni0 bridge owning the pod CIDR (so upstream finds the
// host interface for route_localnet), and loads the nat table with one restore.
func setupNode(cfg scenarioConfig, res *scenarioResult) error {
	for _, args := range [][]string{
		{"link", "set", "lo", "up"},
		{"link", "add", "cni0", "type", "bridge"},
		{"addr", "add", "10.244.0.1/16", "dev", "cni0"},
		{"link", "set", "cni0", "up"},
	} {
		if err := run("ip", args...); err != nil {
			return err
		}
	}
	payload, foreign, cni := natPayload(cfg.M, cfg.N)
	res.ForeignRules, res.CNIRules = foreign, cni
	start := time.Now()
	cmd := exec.Command("iptables-restore", "-w")
	cmd.Stdin = strings.NewReader(payload)
	if out, err := cmd.CombinedOutput(); err != nil {
		os.WriteFile(filepath.Join(cfg.WorkDir, "failed-payload.txt"), []byte(payload), 0o644)
		return fmt.Errorf("iptables-restore: %v: %s", err, out)
	}
	// Make sure the v6 nat table exists, as on any node with ip6tables loaded.
	if err := run("ip6tables", "-w", "-t", "nat", "-S", "OUTPUT"); err != nil {
		return err
	}
	res.SetupMs = ms(time.Since(start))
	return nil
}

// natStateIn returns iptables-save + ip6tables-save of the nat table of node namespace
// name ("" the runner's) without comments and counters.
func natStateIn(name string) (string, error) {
	var b strings.Builder
	for _, c := range []string{"iptables-save", "ip6tables-save"} {
		out, err := inNS(name, c, "-t", "nat").Output()
		if err != nil {
			return "", fmt.Errorf("%s: %v", c, err)
		}
		for _, l := range strings.Split(string(out), "\n") {
			if l == "" || strings.HasPrefix(l, "#") {
				continue
			}
			if strings.HasPrefix(l, ":") {
				if i := strings.LastIndex(l, " ["); i > 0 {
					l = l[:i]
				}
			}
			b.WriteString(l)
			b.WriteByte('\n')
		}
	}
	return b.String(), nil
}

func foreignLines(state string) string {
	var b strings.Builder
	for _, l := range strings.Split(state, "\n") {
		if strings.Contains(l, "KUBE-") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

// diffSummary names the first lines present in only one of a and b.
func diffSummary(a, b string) string {
	inA, inB := map[string]bool{}, map[string]bool{}
	for _, l := range strings.Split(a, "\n") {
		inA[l] = true
	}
	for _, l := range strings.Split(b, "\n") {
		inB[l] = true
	}
	var out []string
	for _, l := range strings.Split(a, "\n") {
		if !inB[l] && len(out) < 10 {
			out = append(out, "- "+l)
		}
	}
	for _, l := range strings.Split(b, "\n") {
		if !inA[l] && len(out) < 20 {
			out = append(out, "+ "+l)
		}
	}
	if len(out) == 0 {
		return "same lines, different order"
	}
	return strings.Join(out, "\n")
}

func runScenario(cfg scenarioConfig) (res scenarioResult) {
	res.M, res.N = cfg.M, cfg.N
	res.Verified = map[string]string{}
	fail := func(err error) scenarioResult { res.Err = err.Error(); return res }

	nftMode := false
	var nodes []string // distinct node namespaces, "" the runner's
	for _, p := range cfg.Plugins {
		nftMode = nftMode || p.NS != ""
		if !slices.Contains(nodes, p.NS) {
			nodes = append(nodes, p.NS)
		}
	}
	if nftMode {
		start := time.Now()
		for _, p := range cfg.Plugins {
			logf("M=%d N=%d: loading %s's node %s", cfg.M, cfg.N, p.Name, p.NS)
			foreign, cni, chains, err := setupPluginNode(cfg, p)
			if err != nil {
				return fail(fmt.Errorf("%s's node: %w", p.Name, err))
			}
			res.ForeignRules, res.KubeChains = foreign, chains
			res.CNIRules = max(res.CNIRules, cni)
		}
		res.SetupMs = ms(time.Since(start))
	} else {
		logf("M=%d N=%d: loading the nat table", cfg.M, cfg.N)
		if err := setupNode(cfg, &res); err != nil {
			return fail(err)
		}
	}
	logf("M=%d N=%d: %d foreign + %d CNI rules restored in %.0f ms", cfg.M, cfg.N, res.ForeignRules, res.CNIRules, res.SetupMs)
	snapshot := func(withForeign bool) (all, foreign map[string]string, err error) {
		all, foreign = map[string]string{}, map[string]string{}
		for _, n := range nodes {
			if all[n], foreign[n], err = nodeState(n, nftMode, withForeign); err != nil {
				return nil, nil, err
			}
		}
		return all, foreign, nil
	}
	_, foreign0, err := snapshot(true)
	if err != nil {
		return fail(err)
	}

	timedOps := cfg.Ops["ADD"] || cfg.Ops["CHECK"] || cfg.Ops["DEL"]
	stats := map[string]*opStats{}
	nomap := map[string]*opStats{}
	for _, p := range cfg.Plugins {
		for _, op := range ops {
			stats[p.Name+op] = &opStats{Plugin: p.Name, Op: op}
			nomap[p.Name+op] = &opStats{Plugin: p.Name, Op: op}
		}
	}
	record := func(st *opStats, r callResult, timed bool) {
		if r.failed() {
			st.Failures++
			if st.FirstErr == "" {
				st.FirstErr = fmt.Sprintf("rc=%d: %s", r.RC, r.Out)
			}
		}
		if timed {
			st.Ms = append(st.Ms, r.Ms)
			st.RSSKiB = max(st.RSSKiB, r.RSSKiB)
			return
		}
		st.CountMs = r.Ms
		st.Procs = len(r.Procs)
		for _, pr := range r.Procs {
			if strings.HasPrefix(pr.Name, "ip6") {
				st.ProcsV6++
			}
			st.ProcMs += pr.Ms
			st.ChildRSSKiB = max(st.ChildRSSKiB, pr.RSSKiB)
			st.Cmds = append(st.Cmds, fmt.Sprintf("%s %s  (%.1f ms, rc %d)", pr.Name, strings.Join(pr.Args, " "), pr.Ms, pr.RC))
			for _, l := range strings.Split(strings.TrimRight(pr.Stdin, "\n"), "\n") {
				if l != "" {
					st.Cmds = append(st.Cmds, "  < "+l)
				}
			}
		}
	}
	shimLog := filepath.Join(cfg.WorkDir, fmt.Sprintf("shim-%d-%d.log", cfg.M, cfg.N))

	// Warm-up: one untimed round per plugin, so that the shared chains exist (as on any
	// node that ran a host-port pod before) and the counting round and the drains see the
	// steady state. (Parallel first ADDs on a fresh node make upstream duplicate its entry
	// jumps: a check-then-insert race, not what this bench measures.)
	{
		for _, p := range cfg.Plugins {
			a := measureAttachment(p.Name, -1)
			for _, op := range ops {
				invoke(p, op, a, cfg.Env, true, "")
			}
		}
	}
	// Round 0: with the shim on PATH, counting processes and verifying effects.
	if timedOps {
		for _, p := range cfg.Plugins {
			a := measureAttachment(p.Name, 0)
			r := invoke(p, "ADD", a, cfg.Env, true, shimLog)
			record(stats[p.Name+"ADD"], r, false)
			verdict := "ok"
			if st, err := pluginState(p); err != nil {
				return fail(err)
			} else if !installedIn(st, a) {
				verdict = "ADD did not install the DNAT rules"
			}
			record(stats[p.Name+"CHECK"], invoke(p, "CHECK", a, cfg.Env, true, shimLog), false)
			record(stats[p.Name+"DEL"], invoke(p, "DEL", a, cfg.Env, true, shimLog), false)
			if st, err := pluginState(p); err != nil {
				return fail(err)
			} else if leftIn(st, a) {
				verdict = strings.TrimPrefix(verdict+"; DEL left rules behind", "ok; ")
			}
			res.Verified[p.Name] = verdict
		}
	}
	if cfg.Ops["NOMAP"] {
		for _, p := range cfg.Plugins {
			a := nomapAttachment(p.Name, 0)
			for _, op := range ops {
				record(nomap[p.Name+op], invoke(p, op, a, cfg.Env, false, shimLog), false)
			}
		}
	}
	snapA, _, err := snapshot(false)
	if err != nil {
		return fail(err)
	}

	// Timed rounds, plugins interleaved; the order alternates between rounds.
	if timedOps || cfg.Ops["NOMAP"] {
		logf("M=%d N=%d: %d timed rounds", cfg.M, cfg.N, cfg.Runs)
	}
	for round := 1; round <= cfg.Runs && (timedOps || cfg.Ops["NOMAP"]); round++ {
		order := append([]plugin(nil), cfg.Plugins...)
		if round%2 == 0 {
			for i, j := 0, len(order)-1; i < j; i, j = i+1, j-1 {
				order[i], order[j] = order[j], order[i]
			}
		}
		for _, p := range order {
			if timedOps {
				a := measureAttachment(p.Name, round)
				for _, op := range ops {
					if op == "CHECK" && !cfg.Ops["CHECK"] {
						continue
					}
					record(stats[p.Name+op], invoke(p, op, a, cfg.Env, true, ""), true)
				}
			}
			if cfg.Ops["NOMAP"] {
				a := nomapAttachment(p.Name, round)
				for _, op := range ops {
					record(nomap[p.Name+op], invoke(p, op, a, cfg.Env, false, ""), true)
				}
			}
		}
	}
	for _, p := range cfg.Plugins {
		for _, op := range ops {
			if cfg.Ops[op] {
				res.Ops = append(res.Ops, *stats[p.Name+op])
			}
			if cfg.Ops["NOMAP"] {
				res.NoMap = append(res.NoMap, *nomap[p.Name+op])
			}
		}
	}

	if cfg.Ops["DRAIN"] {
		var drainers []plugin // not the flatness baseline: its drain would repeat portguard's
		for _, p := range cfg.Plugins {
			if !p.Empty {
				drainers = append(drainers, p)
			}
		}
		ds := make([]drainStats, len(drainers))
		for i, p := range drainers {
			ds[i] = drainStats{Plugin: p.Name, Attachments: cfg.Drain, Par: cfg.DrainPar, Installed: cfg.Drain}
		}
		for run := 0; run < cfg.DrainRuns; run++ {
			for k := range drainers {
				i := k
				if run%2 == 1 { // alternate which plugin drains first
					i = len(drainers) - 1 - k
				}
				logf("M=%d N=%d: drain %d/%d, %d attachments, %d at a time: %s", cfg.M, cfg.N, run+1, cfg.DrainRuns, cfg.Drain, cfg.DrainPar, drainers[i].Name)
				if err := drain(cfg, drainers[i], &ds[i]); err != nil {
					return fail(err)
				}
			}
		}
		for i := range ds {
			ds[i].AddMs, ds[i].DelMs = median(ds[i].AddRuns), median(ds[i].DelRuns)
		}
		res.Drain = ds
	}

	snapB, foreignB, err := snapshot(true)
	if err != nil {
		return fail(err)
	}
	res.StateStable, res.ForeignUntouched = true, true
	for _, n := range nodes {
		if snapA[n] != snapB[n] {
			res.StateStable = false
			res.StateDiff += diffSummary(snapA[n], snapB[n])
		}
		if foreign0[n] != foreignB[n] {
			res.ForeignUntouched = false
			res.StateDiff += diffSummary(foreign0[n], foreignB[n])
		}
	}

	// After the comparison: the connections' pod and attachment come and go.
	if cfg.Ops["CONN"] {
		for _, p := range cfg.Plugins {
			logf("M=%d N=%d: %d new connections through a claim of %s", cfg.M, cfg.N, cfg.ConnRuns, p.Name)
			res.Conn = append(res.Conn, runConn(cfg, p))
		}
	}

	// Last, after the state comparison: a portguard-only op (upstream takes nothing over).
	if cfg.Ops["TAKEOVER"] {
		for _, p := range cfg.Plugins {
			if p.portguard() {
				logf("M=%d N=%d: takeover of one port from a %d-mapping attachment, %d runs", cfg.M, cfg.N, cfg.Range, cfg.Runs)
				res.Takeover = append(res.Takeover, runTakeover(cfg, p))
			}
		}
	}
	return res
}

// drain ADDs cfg.Drain attachments, cfg.DrainPar at a time, then DELs them the same
// way, adding each phase's wall clock to d.
func drain(cfg scenarioConfig, p plugin, d *drainStats) error {
	var mu sync.Mutex
	phase := func(verb string) (float64, int) {
		jobs := make(chan int)
		var wg sync.WaitGroup
		failures := 0
		start := time.Now()
		for w := 0; w < cfg.DrainPar; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range jobs {
					r := invoke(p, verb, drainAttachment(p.Name, i), cfg.Env, true, "")
					if r.failed() {
						mu.Lock()
						failures++
						if d.FirstErr == "" {
							d.FirstErr = fmt.Sprintf("%s rc=%d: %s", verb, r.RC, r.Out)
						}
						mu.Unlock()
					}
				}
			}()
		}
		for i := 0; i < cfg.Drain; i++ {
			jobs <- i
		}
		close(jobs)
		wg.Wait()
		return ms(time.Since(start)), failures
	}
	t, f := phase("ADD")
	d.AddRuns, d.AddFail = append(d.AddRuns, t), d.AddFail+f
	st, err := pluginState(p)
	if err != nil {
		return err
	}
	n := 0
	for i := 0; i < cfg.Drain; i++ {
		if installedIn(st, drainAttachment(p.Name, i)) {
			n++
		}
	}
	d.Installed = min(d.Installed, n)
	t, f = phase("DEL")
	d.DelRuns, d.DelFail = append(d.DelRuns, t), d.DelFail+f
	return nil
}
