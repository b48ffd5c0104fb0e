package main

// Statistics and the markdown report.

import (
	"fmt"
	"math"
	"os"
	"runtime"
	"sort"
	"strings"
	"time"
)

type report struct {
	Opts      options
	Machine   machine
	Plugins   map[string]string // name -> path and version, or "not built (...)"
	Present   map[string]bool
	Scenarios []scenarioResult
	Elapsed   time.Duration
}

type machine struct {
	NProc    int
	CPU      string
	Kernel   string
	IPTables string
	Go       string
	FloorKiB int64  // ru_maxrss of /bin/true started by the launcher
	LoadAvg  string // 1-minute load average at start and end
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return "?"
	}
	return f[0]
}

func machineInfo() machine {
	m := machine{NProc: runtime.NumCPU(), Go: runtime.Version(), LoadAvg: loadAvg()}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if self, err := os.Executable(); err == nil {
		dir, _ := os.MkdirTemp("", "pgb-floor-")
		r := invoke(plugin{Path: "/bin/true", Type: "none"}, "VERSION", attachment{ID: containerID("floor", 0)}, callEnv{Self: self, WorkDir: dir}, false, "")
		m.FloorKiB = r.RSSKiB
		os.RemoveAll(dir)
	}
	if out, err := runOut("iptables", "-V"); err == nil {
		m.IPTables = strings.TrimSpace(out)
	}
	return m
}

// median and p90 (nearest rank) of xs.
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func p90(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return s[int(math.Ceil(0.9*float64(len(s))))-1]
}

func fmtMs(v float64) string {
	switch {
	case math.IsNaN(v):
		return "–"
	case v >= 10000:
		return fmt.Sprintf("%.1f s", v/1000)
	case v >= 100:
		return fmt.Sprintf("%.0f ms", v)
	default:
		return fmt.Sprintf("%.1f ms", v)
	}
}

func fmtRatio(up, pg float64) string {
	if math.IsNaN(up) || math.IsNaN(pg) || pg <= 0 {
		return "–"
	}
	return fmt.Sprintf("%.1f×", up/pg)
}

func fmtMiB(kib int64) string {
	if kib <= 0 {
		return "–"
	}
	return fmt.Sprintf("%.1f MiB", float64(kib)/1024)
}

func fmtProcs(s *opStats) string {
	if s.ProcsV6 > 0 {
		return fmt.Sprintf("%d (%d v6)", s.Procs, s.ProcsV6)
	}
	return fmt.Sprint(s.Procs)
}

// cell returns the formatted value for a plugin, or its absence reason.
func (r *report) cell(s *opStats, f func(*opStats) string) string {
	if s == nil {
		return "not built"
	}
	if s.Failures > 0 && len(s.Ms) > 0 && s.Failures >= len(s.Ms) {
		return "FAILED"
	}
	v := f(s)
	if s.Failures > 0 {
		v += fmt.Sprintf(" (%d failed)", s.Failures)
	}
	return v
}

func find(list []opStats, plugin, op string) *opStats {
	for i := range list {
		if list[i].Plugin == plugin && list[i].Op == op {
			return &list[i]
		}
	}
	return nil
}

func findDrain(list []drainStats, plugin string) *drainStats {
	for i := range list {
		if list[i].Plugin == plugin {
			return &list[i]
		}
	}
	return nil
}

func (r *report) ok() bool {
	for _, s := range r.Scenarios {
		if s.Err != "" || !s.ForeignUntouched || !s.StateStable {
			return false
		}
		for _, v := range s.Verified {
			if v != "ok" {
				return false
			}
		}
		for _, list := range [][]opStats{s.Ops, s.NoMap} {
			for _, o := range list {
				if strings.HasPrefix(o.Plugin, "portguard") && o.Failures > 0 {
					return false
				}
			}
		}
		for _, d := range s.Drain {
			if strings.HasPrefix(d.Plugin, "portguard") && (d.AddFail > 0 || d.DelFail > 0 || d.Installed != d.Attachments) {
				return false
			}
		}
		for _, c := range s.Conn {
			if c.Err != "" {
				return false
			}
		}
		for _, t := range s.Takeover {
			if t.VictimErr != "" || t.Failures > 0 || t.Verified != "ok" {
				return false
			}
		}
	}
	return true
}

func row(cells ...string) string { return "| " + strings.Join(cells, " | ") + " |\n" }

func (r *report) markdown() string {
	if r.Opts.Backend == "nftables" {
		return r.markdownNFT()
	}
	var b strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	w("## portguard vs upstream portmap\n\n")
	w("- machine: %d CPUs (%s), kernel %s, %s, %s; load average %s at start, %s at end\n",
		r.Machine.NProc, r.Machine.CPU, r.Machine.Kernel, r.Machine.IPTables, r.Machine.Go, r.Machine.LoadAvg, loadAvg())
	w("- command: `%s` (as root; `make bench BENCH_ARGS='...'` runs the same)\n", r.Opts.Command)
	w("- upstream: %s\n- portguard: %s\n", r.Plugins["upstream"], r.Plugins["portguard"])
	w("- %s, total %s\n", time.Now().UTC().Format("2006-01-02 15:04 UTC"), r.Elapsed.Round(time.Second))
	w("- M = foreign kube-proxy-like nat rules, N = existing host-port attachments (upstream format); each call adds/checks/deletes one more attachment with 2 TCP mappings. "+
		"%d timed runs per op, the two plugins interleaved in the same namespace. Ratio = upstream median / portguard median. "+
		"procs = iptables*/ip6tables* processes per call (counted by a PATH shim in a separate, untimed warm-up call). "+
		"RSS = peak ru_maxrss of the plugin from wait4, which also covers the iptables children it waited for "+
		"(each plugin is started by a small launcher so the bench's own memory does not leak into the number; "+
		"/bin/true started the same way measures %s, the floor).\n\n", r.Opts.Runs, fmtMiB(r.Machine.FloorKiB))

	names := []string{"upstream", "portguard"}
	stat := func(s scenarioResult, list []opStats, plugin, op string) *opStats {
		if !r.Present[plugin] {
			return nil
		}
		if st := find(list, plugin, op); st != nil {
			return st
		}
		return &opStats{Plugin: plugin, Op: op, Failures: 0}
	}

	w("### ADD / CHECK / DEL of one attachment\n\n")
	b.WriteString(row("M", "N", "op", "upstream median", "upstream p90", "portguard median", "portguard p90", "ratio", "procs upstream", "procs portguard", "RSS upstream", "RSS portguard"))
	b.WriteString(row("---:", "---:", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:"))
	for _, s := range r.Scenarios {
		if s.Err != "" {
			b.WriteString(row(fmt.Sprint(s.M), fmt.Sprint(s.N), "ERROR", "", "", "", "", "", "", "", "", ""))
			continue
		}
		for _, op := range ops {
			if !r.Opts.Only[op] {
				continue
			}
			cells := []string{fmt.Sprint(s.M), fmt.Sprint(s.N), op}
			var med [2]float64
			for i, name := range names {
				st := stat(s, s.Ops, name, op)
				med[i] = math.NaN()
				if st != nil && st.Failures < len(st.Ms) {
					med[i] = median(st.Ms)
				}
				cells = append(cells,
					r.cell(st, func(o *opStats) string { return fmtMs(median(o.Ms)) }),
					r.cell(st, func(o *opStats) string { return fmtMs(p90(o.Ms)) }))
			}
			cells = append(cells, fmtRatio(med[0], med[1]))
			for _, name := range names {
				cells = append(cells, r.cell(stat(s, s.Ops, name, op), fmtProcs))
			}
			for _, name := range names {
				cells = append(cells, r.cell(stat(s, s.Ops, name, op), func(o *opStats) string { return fmtMiB(o.RSSKiB) }))
			}
			b.WriteString(row(cells...))
		}
	}

	if r.Opts.Only["DRAIN"] {
		samples := "one sample"
		if r.Opts.DrainRuns > 1 {
			samples = fmt.Sprintf("median of %d", r.Opts.DrainRuns)
		}
		w("\n### Drain: %d attachments ADDed, then DELeted, %d calls in parallel (wall time, %s)\n\n", r.Opts.Drain, r.Opts.DrainPar, samples)
		b.WriteString(row("M", "N", "phase", "upstream", "portguard", "ratio", "failed calls upstream", "failed calls portguard"))
		b.WriteString(row("---:", "---:", "---", "---:", "---:", "---:", "---:", "---:"))
		for _, s := range r.Scenarios {
			if s.Err != "" || len(s.Drain) == 0 {
				continue // failed, or N above -drain-max-n
			}
			for _, phase := range []string{"ADD", "DEL"} {
				cells := []string{fmt.Sprint(s.M), fmt.Sprint(s.N), phase}
				var t [2]float64
				var fails [2]string
				for i, name := range names {
					d := findDrain(s.Drain, name)
					t[i] = math.NaN()
					if d == nil {
						cells = append(cells, "not built")
						fails[i] = "–"
						continue
					}
					v, f := d.AddMs, d.AddFail
					if phase == "DEL" {
						v, f = d.DelMs, d.DelFail
					}
					t[i] = v
					cells = append(cells, fmtMs(v))
					fails[i] = fmt.Sprint(f)
					if phase == "ADD" && d.Installed != d.Attachments {
						fails[i] += fmt.Sprintf(" (%d/%d installed)", d.Installed, d.Attachments)
					}
				}
				cells = append(cells, fmtRatio(t[0], t[1]), fails[0], fails[1])
				b.WriteString(row(cells...))
			}
		}
	}

	if r.Opts.Only["TAKEOVER"] {
		w("\n### Takeover of one port from a %d-mapping attachment (portguard; upstream takes nothing over)\n\n", r.Opts.Range)
		w("A dead container's podman-style port range (one attachment, %d TCP mappings, ADDed by the plugin); each timed ADD claims one of its ports (and is DELeted again, untimed).\n\n", r.Opts.Range)
		b.WriteString(row("M", "N", "range ADD", "takeover median", "takeover p90", "runs", "failed", "last takeover"))
		b.WriteString(row("---:", "---:", "---:", "---:", "---:", "---:", "---:", "---"))
		for _, s := range r.Scenarios {
			for _, t := range s.Takeover {
				if t.VictimErr != "" {
					b.WriteString(row(fmt.Sprint(s.M), fmt.Sprint(s.N), "failed: "+t.VictimErr, "", "", "", "", ""))
					continue
				}
				b.WriteString(row(fmt.Sprint(s.M), fmt.Sprint(s.N), fmtMs(t.VictimMs), fmtMs(median(t.Ms)), fmtMs(p90(t.Ms)),
					fmt.Sprint(len(t.Ms)), fmt.Sprint(t.Failures), t.Verified))
			}
		}
	}

	if r.Opts.Only["NOMAP"] {
		w("\n### Calls without port mappings\n\n")
		b.WriteString(row("M", "N", "op", "procs upstream", "procs portguard", "upstream median", "portguard median"))
		b.WriteString(row("---:", "---:", "---", "---:", "---:", "---:", "---:"))
		for _, s := range r.Scenarios {
			if s.Err != "" {
				continue
			}
			for _, op := range ops {
				up, pg := stat(s, s.NoMap, "upstream", op), stat(s, s.NoMap, "portguard", op)
				b.WriteString(row(fmt.Sprint(s.M), fmt.Sprint(s.N), op,
					r.cell(up, fmtProcs), r.cell(pg, fmtProcs),
					r.cell(up, func(o *opStats) string { return fmtMs(median(o.Ms)) }),
					r.cell(pg, func(o *opStats) string { return fmtMs(median(o.Ms)) })))
			}
		}
	}

	w("\n### Checks\n\n")
	b.WriteString(row("M", "N", "nat rules loaded", "load time", "ADD/DEL effects", "state after runs = after warm-up", "foreign rules untouched"))
	b.WriteString(row("---:", "---:", "---:", "---:", "---", "---", "---"))
	for _, s := range r.Scenarios {
		if s.Err != "" {
			b.WriteString(row(fmt.Sprint(s.M), fmt.Sprint(s.N), "ERROR: "+strings.ReplaceAll(s.Err, "|", "/"), "", "", "", ""))
			continue
		}
		var eff []string
		for _, name := range names {
			if v, ok := s.Verified[name]; ok {
				eff = append(eff, name+" "+v)
			}
		}
		if len(eff) == 0 {
			eff = []string{"–"}
		}
		b.WriteString(row(fmt.Sprint(s.M), fmt.Sprint(s.N), fmt.Sprintf("%d + %d CNI", s.ForeignRules, s.CNIRules), fmtMs(s.SetupMs),
			strings.Join(eff, ", "), yesNo(s.StateStable), yesNo(s.ForeignUntouched)))
	}

	r.problemsAndProcs(&b)
	return b.String()
}

// problemsAndProcs writes the problems of every scenario and the processes each plugin
// ran in the last one (the largest N).
func (r *report) problemsAndProcs(b *strings.Builder) {
	w := func(format string, a ...any) { fmt.Fprintf(b, format, a...) }
	var problems []string
	for _, s := range r.Scenarios {
		if s.StateDiff != "" {
			problems = append(problems, fmt.Sprintf("M=%d N=%d nat table changed:\n%s", s.M, s.N, s.StateDiff))
		}
		for _, list := range [][]opStats{s.Ops, s.NoMap} {
			for _, o := range list {
				if o.FirstErr != "" {
					problems = append(problems, fmt.Sprintf("M=%d N=%d %s %s: %d failed; first: %s", s.M, s.N, o.Plugin, o.Op, o.Failures, o.FirstErr))
				}
			}
		}
		for _, d := range s.Drain {
			if d.FirstErr != "" {
				problems = append(problems, fmt.Sprintf("M=%d N=%d %s drain: %s", s.M, s.N, d.Plugin, d.FirstErr))
			}
		}
		for _, c := range s.Conn {
			if c.Err != "" {
				problems = append(problems, fmt.Sprintf("M=%d N=%d %s conn: %s", s.M, s.N, c.Plugin, c.Err))
			}
		}
	}
	if len(problems) > 0 {
		w("\n### Problems\n\n```\n%s\n```\n", strings.Join(problems, "\n"))
	}
	if n := len(r.Scenarios); n > 0 && len(r.Scenarios[n-1].Ops) > 0 {
		s := r.Scenarios[n-1]
		w("\n### Processes per call (M=%d, N=%d, warm-up call with the shim)\n\n```\n", s.M, s.N)
		var list []opStats
		list = append(list, s.Ops...)
		for _, o := range s.NoMap {
			if o.Procs > 0 {
				o.Op += " without mappings"
				list = append(list, o)
			}
		}
		for _, o := range list {
			w("%s %s: %d processes, %.0f ms of %.0f ms in them, largest child %s\n", o.Plugin, o.Op, o.Procs, o.ProcMs, o.CountMs, fmtMiB(o.ChildRSSKiB))
			for _, c := range o.Cmds {
				if len(c) > 160 {
					c = c[:160] + "…"
				}
				w("    %s\n", c)
			}
		}
		w("```\n")
	}
}

func yesNo(v bool) string {
	if v {
		return "yes"
	}
	return "NO"
}
