// Command bench times portguard against upstream portmap v1.10.0 on a throwaway node
// network namespace loaded with kube-proxy-sized nat tables. Run it as root:
//
//	make bench                                  # default: M=20000, N=0,100,1000,5000, 15 runs
//	make bench BENCH_ARGS='-quick'              # CI smoke: M=2000, N=0,100, 5 runs
//	go run ./test/bench -n 1000 -runs 30 -only add,del -o bench.md
//
// Each (M, N) scenario runs in its own namespace `pgb-<pid>-<k>`; namespaces and temp
// files are removed at exit, on errors and on Ctrl-C.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// init dispatches the two helper roles of this binary (also inside the test binary):
// the iptables PATH shim, the plugin launcher and the per-namespace scenario runner.
func init() {
	if isShimName(filepath.Base(os.Args[0])) && os.Getenv(envShimLog) != "" {
		shimMain()
	}
	if f := os.Getenv(envLaunch); f != "" {
		launchMain(f)
	}
	if p := os.Getenv(envInner); p != "" {
		os.Exit(innerMain(p))
	}
}

type options struct {
	Ms, Ns          []int
	Runs            int
	Only            map[string]bool
	Out             string
	Drain, DrainPar int
	DrainRuns       int
	DrainMaxN       int // scenarios with more existing attachments skip the drain
	Range           int // mappings of the TAKEOVER victim
	Quick           bool
	Command         string // how the bench was invoked, for the report
	Payload         string // -payload: write the nat payload and exit
	PortguardBin    string
	UpstreamBin     string
	// Backend "nftables" compares portguard's nftables backend with upstream's
	// (`"backend": "nftables"`), upstream's iptables backend beside them for context, each
	// plugin on a node namespace of its own (see nftmode.go).
	Backend  string
	Services int // kube-proxy nftables-mode services on each node (-backend nftables)
	ConnRuns int // connections per plugin and scenario (-only conn)
}

var allOps = []string{"ADD", "CHECK", "DEL", "DRAIN", "NOMAP", "TAKEOVER", "CONN"}

// defaultOps are the ops run without -only, per backend: TAKEOVER is portguard's iptables
// backend only, CONN the nftables comparison only.
var defaultOps = map[string]string{
	"iptables": "add,check,del,drain,nomap,takeover",
	"nftables": "add,check,del,drain,conn",
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		v, err := strconv.Atoi(f)
		if err != nil || v < 0 {
			return nil, fmt.Errorf("bad number %q", f)
		}
		out = append(out, v)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("empty list")
	}
	return out, nil
}

func parseOps(s string) (map[string]bool, error) {
	m := map[string]bool{}
	for _, f := range strings.Split(s, ",") {
		f = strings.ToUpper(strings.TrimSpace(f))
		ok := false
		for _, o := range allOps {
			ok = ok || o == f
		}
		if !ok {
			return nil, fmt.Errorf("unknown op %q (want a subset of %s)", f, strings.ToLower(strings.Join(allOps, ",")))
		}
		m[f] = true
	}
	return m, nil
}

// repoRoot walks up from the working directory to the directory holding go.mod.
func repoRoot() string {
	dir, _ := os.Getwd()
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d
		}
		if filepath.Dir(d) == d {
			return dir
		}
	}
}

func defaultBins() (portguard, upstream string) {
	pgDir := os.Getenv("PORTGUARD_BIN_DIR")
	if pgDir == "" {
		pgDir = filepath.Join(repoRoot(), "bin")
	}
	upDir := os.Getenv("PORTGUARD_UPSTREAM_DIR")
	if upDir == "" {
		gopath := os.Getenv("GOPATH")
		if gopath == "" {
			if out, err := runOut("go", "env", "GOPATH"); err == nil {
				gopath = strings.TrimSpace(out)
			}
		}
		upDir = filepath.Join(gopath, "bin")
	}
	return filepath.Join(pgDir, "portguard"), filepath.Join(upDir, "portmap")
}

func parseFlags(args []string) (options, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	m := fs.String("m", "20000", "foreign kube-proxy-like nat rules (comma-separated list)")
	n := fs.String("n", "0,100,1000,5000", "existing upstream-format host-port attachments (comma-separated list)")
	runs := fs.Int("runs", 15, "timed ADD/CHECK/DEL runs per plugin and scenario")
	only := fs.String("only", "", "subset of ops: add,check,del,drain,nomap,takeover (iptables), conn (nftables); default: "+defaultOps["iptables"]+" / "+defaultOps["nftables"])
	backendF := fs.String("backend", "iptables", "iptables: portguard vs upstream portmap (iptables); nftables: portguard's nftables backend vs upstream's, upstream iptables for context")
	services := fs.Int("services", 2000, "-backend nftables: services in each node's kube-proxy nftables table")
	connRuns := fs.Int("conn-runs", 2000, "-only conn: new TCP connections timed per plugin and scenario")
	rng := fs.Int("range", maxRange, "TAKEOVER: host-port mappings of the attachment (a podman port range) each timed ADD takes one port from")
	out := fs.String("o", "", "also write the markdown report to this file")
	drainN := fs.Int("drain", 100, "attachments in the drain (ADDed, then DELeted)")
	par := fs.Int("par", 10, "parallel calls in the drain")
	drainRuns := fs.Int("drain-runs", 1, "drains per plugin and scenario (median reported; plugins alternate)")
	// Upstream's drain at N = 5,000 alone takes minutes (100 ADDs of ~1 s each, 10 at a time on 2 cores).
	drainMaxN := fs.Int("drain-max-n", 1000, "drain only in scenarios with at most this many existing attachments")
	quick := fs.Bool("quick", false, "CI smoke mode: M=2000, N=0,100, 5 runs, drain of 20 (-backend nftables: 200 services, 200 connects)")
	payload := fs.String("payload", "", "only write the iptables-restore payload for the first -m and -n to this file, and exit")
	pgBin, upBin := defaultBins()
	fs.StringVar(&pgBin, "portguard", pgBin, "portguard plugin binary ($PORTGUARD_BIN_DIR/portguard)")
	fs.StringVar(&upBin, "upstream", upBin, "upstream portmap binary ($PORTGUARD_UPSTREAM_DIR/portmap)")
	if err := fs.Parse(args); err != nil {
		return options{}, err
	}
	if fs.NArg() > 0 {
		return options{}, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if *quick {
		if !set["m"] {
			*m = "2000"
		}
		if !set["n"] {
			*n = "0,100"
		}
		if !set["runs"] {
			*runs = 5
		}
		if !set["drain"] {
			*drainN = 20
		}
		if !set["range"] {
			*rng = 2000
		}
		if !set["services"] {
			*services = 200
		}
		if !set["conn-runs"] {
			*connRuns = 200
		}
	}
	if *backendF != "iptables" && *backendF != "nftables" {
		return options{}, fmt.Errorf("-backend: iptables or nftables, not %q", *backendF)
	}
	if *only == "" {
		*only = defaultOps[*backendF]
	}
	o := options{Backend: *backendF, Services: *services, ConnRuns: *connRuns, Runs: *runs, Out: *out, Drain: *drainN, DrainPar: *par, DrainRuns: *drainRuns, DrainMaxN: *drainMaxN, Range: *rng, Quick: *quick, PortguardBin: pgBin, UpstreamBin: upBin}
	var err error
	if o.Ms, err = parseInts(*m); err != nil {
		return o, fmt.Errorf("-m: %v", err)
	}
	if o.Ns, err = parseInts(*n); err != nil {
		return o, fmt.Errorf("-n: %v", err)
	}
	for _, v := range o.Ns {
		if v > maxExisting {
			return o, fmt.Errorf("-n: at most %d", maxExisting)
		}
	}
	if o.Only, err = parseOps(*only); err != nil {
		return o, fmt.Errorf("-only: %v", err)
	}
	if o.Runs < 1 {
		return o, fmt.Errorf("-runs: at least 1")
	}
	if o.Drain < 1 || o.Drain > maxDrain || o.DrainPar < 1 || o.DrainRuns < 1 {
		return o, fmt.Errorf("-drain must be in 1..%d, -par and -drain-runs at least 1", maxDrain)
	}
	if o.Backend == "nftables" && o.Only["TAKEOVER"] {
		return o, fmt.Errorf("-only takeover: iptables backend only")
	}
	if o.Backend == "iptables" && o.Only["CONN"] {
		return o, fmt.Errorf("-only conn: with -backend nftables")
	}
	if o.Services < 0 || o.Services > maxServices || o.ConnRuns < 1 {
		return o, fmt.Errorf("-services must be in 0..%d, -conn-runs at least 1", maxServices)
	}
	if o.Only["TAKEOVER"] {
		if o.Range < 2 || o.Range > maxRange {
			return o, fmt.Errorf("-range must be in 2..%d", maxRange)
		}
		for _, v := range o.Ns {
			if v > maxRangeExisting {
				return o, fmt.Errorf("-n: at most %d with the takeover op (its port range follows the existing attachments' ports)", maxRangeExisting)
			}
		}
	}
	o.Payload = *payload
	o.Command = "go run ./test/bench"
	if len(args) > 0 {
		o.Command += " " + strings.Join(args, " ")
	}
	return o, nil
}

func main() {
	opts, err := parseFlags(os.Args[1:])
	if err == flag.ErrHelp {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	if opts.Payload != "" {
		p, foreign, cni := natPayload(opts.Ms[0], opts.Ns[0])
		if err := os.WriteFile(opts.Payload, []byte(p), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		fmt.Fprintf(os.Stderr, "bench: wrote %s: %d foreign + %d CNI nat rules (load with: iptables-restore -w < %s)\n", opts.Payload, foreign, cni, opts.Payload)
		return
	}
	rep, err := runBench(opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
	md := rep.markdown()
	fmt.Print(md)
	if opts.Out != "" {
		if err := os.WriteFile(opts.Out, []byte(md), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
	}
	if !rep.ok() {
		fmt.Fprintln(os.Stderr, "bench: some calls failed or the node state changed; see the report")
		os.Exit(1)
	}
}
