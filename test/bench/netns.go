package main

// The outer process: namespaces, temp files, cleanup, and one `ip netns exec` per
// scenario.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

const nsPrefix = "pgb-"

func runOut(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// cleanupStale removes pgb-<pid>-* namespaces whose creating process is gone
// (left behind by a SIGKILLed bench).
func cleanupStale() {
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		name := e.Name()
		if !strings.HasPrefix(name, nsPrefix) {
			continue
		}
		pidStr, _, _ := strings.Cut(strings.TrimPrefix(name, nsPrefix), "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid == os.Getpid() {
			continue
		}
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			runOut("ip", "netns", "del", name)
		}
	}
}

// cleaner remembers what to remove and does it once, from any goroutine.
type cleaner struct {
	mu   sync.Mutex
	ns   []string
	dirs []string
	done bool
}

func (c *cleaner) addNS(n string) { c.mu.Lock(); c.ns = append(c.ns, n); c.mu.Unlock() }

func (c *cleaner) delNS(n string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, x := range c.ns {
		if x == n {
			runOut("ip", "netns", "del", n)
			c.ns = append(c.ns[:i], c.ns[i+1:]...)
			return
		}
	}
}

func (c *cleaner) run() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done {
		return
	}
	c.done = true
	for _, n := range c.ns {
		runOut("ip", "netns", "del", n)
	}
	for _, d := range c.dirs {
		os.RemoveAll(d)
	}
}

// runBench runs every (M, N) scenario and collects the report.
func runBench(opts options) (*report, error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("must run as root (network namespaces, iptables)")
	}
	for _, c := range []string{"ip", "iptables", "iptables-restore", "iptables-save", "ip6tables", "ip6tables-save"} {
		if _, err := exec.LookPath(c); err != nil {
			return nil, fmt.Errorf("%s not found (make deps installs it)", c)
		}
	}
	rep := &report{Opts: opts, Machine: machineInfo(), Plugins: map[string]string{}}
	var plugins []plugin
	candidates := []plugin{{Name: "upstream", Type: "portmap", Path: opts.UpstreamBin}, {Name: "portguard", Type: "portguard", Path: opts.PortguardBin}}
	if opts.Backend == "nftables" {
		if _, err := exec.LookPath("nft"); err != nil {
			return nil, fmt.Errorf("nft not found (make deps installs it)")
		}
		// The comparison first (ratio = upstream-nft / portguard-nft), upstream's iptables
		// backend last, for context.
		candidates = []plugin{
			{Name: "upstream-nft", Type: "portmap", Path: opts.UpstreamBin, Backend: "nftables"},
			{Name: "portguard-nft", Type: "portguard", Path: opts.PortguardBin, Backend: "nftables"},
			{Name: "upstream", Type: "portmap", Path: opts.UpstreamBin},
			// The same build on a node without attachments, interleaved with the others:
			// flatness in N measured within one scenario, not across scenarios run minutes
			// apart on a machine whose load moves.
			{Name: pgNFT0, Type: "portguard", Path: opts.PortguardBin, Backend: "nftables", Empty: true},
		}
	}
	for _, p := range candidates {
		if st, err := os.Stat(p.Path); err != nil || st.Mode()&0o111 == 0 {
			rep.Plugins[p.Name] = "not built (" + p.Path + ")"
			continue
		}
		rep.Plugins[p.Name] = p.Path + ": " + pluginAbout(p.Path)
		plugins = append(plugins, p)
	}
	rep.Present = map[string]bool{}
	for _, p := range plugins {
		rep.Present[p.Name] = true
	}
	if len(plugins) == 0 {
		return nil, fmt.Errorf("neither %s nor %s exists (make deps build)", opts.UpstreamBin, opts.PortguardBin)
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}

	cleanupStale()
	cl := &cleaner{}
	defer cl.run()
	work, err := os.MkdirTemp("", "pgb-bench-")
	if err != nil {
		return nil, err
	}
	cl.dirs = append(cl.dirs, work)
	shimDir := filepath.Join(work, "shim")
	if err := makeShimDir(shimDir, self); err != nil {
		return nil, err
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	go func() {
		if s, ok := <-sigs; ok {
			fmt.Fprintf(os.Stderr, "bench: %v: cleaning up\n", s)
			cancel()
			cl.run()
			os.Exit(130)
		}
	}()

	start := time.Now()
	k := 0
	for _, m := range opts.Ms {
		for _, n := range opts.Ns {
			k++
			res, err := runOneScenario(ctx, cl, opts, plugins, self, work, shimDir, k, m, n)
			if err != nil {
				res = scenarioResult{M: m, N: n, Err: err.Error()}
			}
			if res.Err != "" {
				fmt.Fprintf(os.Stderr, "bench: M=%d N=%d: %s\n", m, n, res.Err)
			}
			rep.Scenarios = append(rep.Scenarios, res)
		}
	}
	rep.Elapsed = time.Since(start)
	return rep, nil
}

func runOneScenario(ctx context.Context, cl *cleaner, opts options, plugins []plugin, self, work, shimDir string, k, m, n int) (scenarioResult, error) {
	node := fmt.Sprintf("%s%d-%d", nsPrefix, os.Getpid(), k)
	pod := node + "-pod"
	names := []string{node, pod}
	if opts.Backend == "nftables" {
		// A node of its own per plugin (nftmode.go); the runner stays in the empty `node`.
		plugins = append([]plugin(nil), plugins...)
		for i := range plugins {
			plugins[i].NS = fmt.Sprintf("%s-%d", node, i)
			names = append(names, plugins[i].NS)
		}
	}
	for _, ns := range names {
		if _, err := runOut("ip", "netns", "add", ns); err != nil {
			return scenarioResult{}, err
		}
		cl.addNS(ns)
		defer cl.delNS(ns)
	}

	dir := filepath.Join(work, fmt.Sprintf("s%d", k))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return scenarioResult{}, err
	}
	ops := opts.Only
	if ops["DRAIN"] && n > opts.DrainMaxN {
		ops = map[string]bool{}
		for op, on := range opts.Only {
			ops[op] = on && op != "DRAIN"
		}
	}
	cfg := scenarioConfig{
		M: m, N: n, Runs: opts.Runs, Services: opts.Services, ConnRuns: opts.ConnRuns, Ops: ops, Drain: opts.Drain, DrainPar: opts.DrainPar, DrainRuns: opts.DrainRuns, Range: opts.Range,
		Plugins: plugins, WorkDir: dir, ResultFile: filepath.Join(dir, "result.json"),
		Env: callEnv{PodNetns: "/var/run/netns/" + pod, LockFile: filepath.Join(dir, "portguard.lock"), ShimDir: shimDir, Self: self, WorkDir: dir},
	}
	b, _ := json.Marshal(cfg)
	cfgPath := filepath.Join(dir, "config.json")
	if err := os.WriteFile(cfgPath, b, 0o644); err != nil {
		return scenarioResult{}, err
	}
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", node, self)
	cmd.Env = append(os.Environ(), envInner+"="+cfgPath)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return scenarioResult{}, fmt.Errorf("scenario runner: %v", err)
	}
	var res scenarioResult
	rb, err := os.ReadFile(cfg.ResultFile)
	if err != nil {
		return res, err
	}
	return res, json.Unmarshal(rb, &res)
}
