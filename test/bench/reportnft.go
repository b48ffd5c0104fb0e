package main

// The report of `-backend nftables`.

import (
	"fmt"
	"math"
	"strings"
	"time"
)

const (
	upNFT  = "upstream-nft"
	pgNFT  = "portguard-nft"
	upIPT  = "upstream"
	pgNFT0 = "portguard-nft-n0" // portguard-nft on a node with no existing attachment
)

func (r *report) markdownNFT() string {
	var b strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	w("## portguard's nftables backend vs upstream portmap's nftables backend\n\n")
	w("- machine: %d CPUs (%s), kernel %s, %s, %s; load average %s at start, %s at end\n",
		r.Machine.NProc, r.Machine.CPU, r.Machine.Kernel, r.Machine.IPTables, r.Machine.Go, r.Machine.LoadAvg, loadAvg())
	w("- command: `%s` (as root; `make bench BENCH_NFT_ARGS='...'` runs the same flags after the iptables comparison)\n", r.Opts.Command)
	w("- %s: %s\n- %s: %s\n- %s (context): %s\n- %s: the portguard-nft build on a node without attachments (the flatness baseline)\n", upNFT, r.Plugins[upNFT], pgNFT, r.Plugins[pgNFT], upIPT, r.Plugins[upIPT], pgNFT0)
	w("- %s, total %s\n", time.Now().UTC().Format("2006-01-02 15:04 UTC"), r.Elapsed.Round(time.Second))
	w("- Each plugin runs on a node namespace of its own, loaded alike: M kube-proxy-like iptables-nft nat rules and kube-proxy's "+
		"nftables-mode table (`ip kube-proxy`, %d services, verdict maps, a chain per service and per endpoint), plus N existing "+
		"attachments in that plugin's own format (upstream-nft: rules of `ip cni_hostport`; portguard-nft: elements of `inet portguard`; "+
		"upstream: CNI-DN chains). Each call adds/checks/deletes one more attachment with 2 TCP mappings (config `\"backend\": \"nftables\"` "+
		"for the first two). %d timed runs per op, the plugins interleaved, order alternating. ratio = upstream-nft median / portguard-nft median; "+
		"vs iptables = upstream (iptables) median / portguard-nft median. procs = nft/iptables processes per call (PATH shim, separate untimed call). "+
		"RSS = peak ru_maxrss of the plugin.\n\n", r.Opts.Services, r.Opts.Runs)

	med := func(st *opStats) float64 {
		if st == nil || len(st.Ms) == 0 || st.Failures >= len(st.Ms) {
			return math.NaN()
		}
		return median(st.Ms)
	}
	get := func(s scenarioResult, list []opStats, plugin, op string) *opStats {
		if !r.Present[plugin] {
			return nil
		}
		if st := find(list, plugin, op); st != nil {
			return st
		}
		return &opStats{Plugin: plugin, Op: op}
	}
	msCell := func(st *opStats, f func([]float64) float64) string {
		return r.cell(st, func(o *opStats) string { return fmtMs(f(o.Ms)) })
	}

	w("### ADD / CHECK / DEL of one attachment\n\n")
	b.WriteString(row("M", "N", "op", upNFT+" median", upNFT+" p90", pgNFT+" median", pgNFT+" p90", "ratio",
		upIPT+" (iptables) median", "vs iptables", "procs "+upNFT, "procs "+pgNFT, "procs "+upIPT, "RSS "+pgNFT))
	b.WriteString(row("---:", "---:", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:"))
	for _, s := range r.Scenarios {
		if s.Err != "" {
			b.WriteString(row(fmt.Sprint(s.M), fmt.Sprint(s.N), "ERROR", "", "", "", "", "", "", "", "", "", "", ""))
			continue
		}
		for _, op := range ops {
			if !r.Opts.Only[op] {
				continue
			}
			un, pg, ui := get(s, s.Ops, upNFT, op), get(s, s.Ops, pgNFT, op), get(s, s.Ops, upIPT, op)
			b.WriteString(row(fmt.Sprint(s.M), fmt.Sprint(s.N), op,
				msCell(un, median), msCell(un, p90), msCell(pg, median), msCell(pg, p90), fmtRatio(med(un), med(pg)),
				msCell(ui, median), fmtRatio(med(ui), med(pg)),
				r.cell(un, fmtProcs), r.cell(pg, fmtProcs), r.cell(ui, fmtProcs),
				r.cell(pg, func(o *opStats) string { return fmtMiB(o.RSSKiB) })))
		}
	}

	// Flatness: each verb's median against the same build's on a node without attachments,
	// in the same scenario (interleaved), and, across scenarios, against the first N's.
	w("\n### Flat in N? portguard-nft at N / the same build on a node with no attachment (%s), same rounds\n\n", pgNFT0)
	w("Both nodes carry the same kube-proxy rules and table; the calls alternate round by round, so the machine's load hits both. Target: within 1.2× at N = 5,000. The last columns compare medians across scenarios (minutes apart).\n\n")
	b.WriteString(row("M", "N", "op", pgNFT+" median", pgNFT0+" median", "N / none", pgNFT+" vs first N", upNFT+" vs first N"))
	b.WriteString(row("---:", "---:", "---", "---:", "---:", "---:", "---:", "---:"))
	for _, s := range r.Scenarios {
		if s.Err != "" {
			continue
		}
		var s0 *scenarioResult
		for i := range r.Scenarios {
			if r.Scenarios[i].M == s.M && r.Scenarios[i].Err == "" && s0 == nil {
				s0 = &r.Scenarios[i]
			}
		}
		for _, op := range ops {
			if !r.Opts.Only[op] {
				continue
			}
			pg, pg0 := get(s, s.Ops, pgNFT, op), get(s, s.Ops, pgNFT0, op)
			b.WriteString(row(fmt.Sprint(s.M), fmt.Sprint(s.N), op, msCell(pg, median), msCell(pg0, median), fmtRatio(med(pg), med(pg0)),
				fmtRatio(med(pg), med(get(*s0, s0.Ops, pgNFT, op))), fmtRatio(med(get(s, s.Ops, upNFT, op)), med(get(*s0, s0.Ops, upNFT, op)))))
		}
	}

	if r.Opts.Only["DRAIN"] {
		samples := "one sample"
		if r.Opts.DrainRuns > 1 {
			samples = fmt.Sprintf("median of %d", r.Opts.DrainRuns)
		}
		w("\n### Drain: %d attachments ADDed, then DELeted, %d calls in parallel (wall time, %s)\n\n", r.Opts.Drain, r.Opts.DrainPar, samples)
		b.WriteString(row("M", "N", "phase", upNFT, pgNFT, "ratio", upIPT+" (iptables)", "vs iptables", "failed calls "+upNFT+" / "+pgNFT+" / "+upIPT))
		b.WriteString(row("---:", "---:", "---", "---:", "---:", "---:", "---:", "---:", "---"))
		for _, s := range r.Scenarios {
			if s.Err != "" || len(s.Drain) == 0 {
				continue
			}
			for _, phase := range []string{"ADD", "DEL"} {
				t := map[string]float64{}
				var cells, fails []string
				for _, name := range []string{upNFT, pgNFT, upIPT} {
					d := findDrain(s.Drain, name)
					if !r.Present[name] {
						d = nil
					}
					t[name] = math.NaN()
					if d == nil {
						cells = append(cells, "not built")
						fails = append(fails, "–")
						continue
					}
					v, f := d.AddMs, d.AddFail
					if phase == "DEL" {
						v, f = d.DelMs, d.DelFail
					}
					t[name] = v
					cells = append(cells, fmtMs(v))
					fs := fmt.Sprint(f)
					if phase == "ADD" && d.Installed != d.Attachments {
						fs += fmt.Sprintf(" (%d/%d installed)", d.Installed, d.Attachments)
					}
					fails = append(fails, fs)
				}
				b.WriteString(row(fmt.Sprint(s.M), fmt.Sprint(s.N), phase, cells[0], cells[1], fmtRatio(t[upNFT], t[pgNFT]),
					cells[2], fmtRatio(t[upIPT], t[pgNFT]), strings.Join(fails, " / ")))
			}
		}
	}

	if r.Opts.Only["CONN"] {
		w("\n### A new connection through a claim (µs, median of %d connects)\n\n", r.Opts.ConnRuns)
		w("From the node's namespace to its cni0 address, host port %d, DNATed in the output hook to a real pod (veth on cni0) "+
			"whose listener completes the handshake; `direct` is the same connect straight to the pod (no DNAT), alternating with the first. claim − direct is "+
			"what the plugin's rules add to every new connection (blocking connect(2) on one thread, socket closed with RST).\n\n", connPort)
		b.WriteString(row("M", "N", "plugin", "through the claim", "p90", "direct", "claim − direct"))
		b.WriteString(row("---:", "---:", "---", "---:", "---:", "---:", "---:"))
		for _, s := range r.Scenarios {
			for _, c := range s.Conn {
				if c.Err != "" {
					b.WriteString(row(fmt.Sprint(s.M), fmt.Sprint(s.N), c.Plugin, "failed: "+strings.ReplaceAll(c.Err, "|", "/"), "", "", ""))
					continue
				}
				b.WriteString(row(fmt.Sprint(s.M), fmt.Sprint(s.N), c.Plugin, fmt.Sprintf("%.1f", c.ClaimUs), fmt.Sprintf("%.1f", c.ClaimP90),
					fmt.Sprintf("%.1f", c.DirectUs), fmt.Sprintf("%+.1f", c.ClaimUs-c.DirectUs)))
			}
		}
	}

	w("\n### Checks\n\n")
	b.WriteString(row("M", "N", "loaded on each node", "load time (all nodes)", "ADD/DEL effects", "state after runs = after warm-up", "foreign rules untouched"))
	b.WriteString(row("---:", "---:", "---", "---:", "---", "---", "---"))
	for _, s := range r.Scenarios {
		if s.Err != "" {
			b.WriteString(row(fmt.Sprint(s.M), fmt.Sprint(s.N), "ERROR: "+strings.ReplaceAll(s.Err, "|", "/"), "", "", "", ""))
			continue
		}
		var eff []string
		for _, name := range []string{upNFT, pgNFT, upIPT, pgNFT0} {
			if v, ok := s.Verified[name]; ok {
				eff = append(eff, name+" "+v)
			}
		}
		if len(eff) == 0 {
			eff = []string{"–"}
		}
		b.WriteString(row(fmt.Sprint(s.M), fmt.Sprint(s.N),
			fmt.Sprintf("%d nat rules, kube-proxy table of %d chains, %d attachments", s.ForeignRules, s.KubeChains, s.N), fmtMs(s.SetupMs),
			strings.Join(eff, ", "), yesNo(s.StateStable), yesNo(s.ForeignUntouched)))
	}
	r.problemsAndProcs(&b)
	return b.String()
}
