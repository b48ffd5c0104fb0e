// Command portguard-agent is portguard's node agent (README "Running the agent"): every
// interval it audits the node's host-port claims in both backends, asks the container
// runtime over CRI which pod sandboxes exist, and removes through the plugin's own GC code
// path the claims of pods that are gone (seen so twice, an interval apart, and stale by the
// liveness evidence) or whose address another live pod now holds. It serves /metrics
// (Prometheus) and /healthz, and counts the plugin's logFile events.
//
// It runs as the DaemonSet's container (deploy/), in the host's network namespace, as root.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/portguard/portguard/pkg/agent"
	"github.com/portguard/portguard/pkg/buildinfo"
	"github.com/portguard/portguard/pkg/cnicache"
	"github.com/portguard/portguard/pkg/cri"
	"github.com/portguard/portguard/pkg/eventlog"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/lock"
)

const usage = `Usage: portguard-agent [flags]

Every --interval: audits the host-port claims of the iptables backend (both families) and
of the nftables backend, judges each owner (portguard's records and the libcni cache:
netns, a process in it, the address), asks the runtime over CRI which pod sandboxes exist
(ListPodSandbox, every state), and removes, through the plugin's GC code path under the
host-wide lock:
  sandbox-gone    a claim whose container ID the runtime did not list in two passes at
                  least one interval apart, and whose owner is stale
  address-reused  a claim whose owner is not alive and whose destination address now
                  belongs to another, live attachment
A runtime that does not answer means no removal in that pass. Logs: JSON lines on stderr.

Environment: PORTGUARD_LOCK_FILE, PORTGUARD_STATE_DIR, PORTGUARD_CNI_CACHE_DIR, as for the
plugin and portguardctl.

Exit status: 0 on SIGTERM/SIGINT, or with --once when the pass completed; 1 when the
--once pass did not complete; 2 on a usage error.

Flags:
`

type options struct {
	interval    time.Duration
	endpoint    string
	listen      string
	dryRun      bool
	once        bool
	cniCacheDir string
	pluginLog   string
	lockTimeout time.Duration
}

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("portguard-agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, usage)
		fs.PrintDefaults()
	}
	fs.DurationVar(&o.interval, "interval", 60*time.Second, "time between passes (also the least time between the two sightings of a gone sandbox)")
	fs.StringVar(&o.endpoint, "runtime-endpoint", "", "CRI socket, unix:///path (default: the first existing of "+fmt.Sprint(cri.DefaultEndpoints)+")")
	fs.StringVar(&o.listen, "listen", ":9617", `address serving /metrics and /healthz ("" = none)`)
	fs.BoolVar(&o.dryRun, "dry-run", false, "report what would be removed (event would-remove), remove nothing")
	fs.BoolVar(&o.once, "once", false, "run one pass and exit: 0 when it completed, 1 when not (no HTTP server)")
	fs.StringVar(&o.cniCacheDir, "cni-cache-dir", "", "an extra libcni cache directory, like the plugin's cniCacheDir")
	fs.StringVar(&o.pluginLog, "plugin-log", "", "the plugin's logFile, followed to count its events (portguard_plugin_events_total)")
	fs.DurationVar(&o.lockTimeout, "lock-timeout", 60*time.Second, "how long a removal waits for the host-wide lock")
	version := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if *version {
		fmt.Fprintln(stderr, "portguard-agent "+buildinfo.Get().String())
		return o, flag.ErrHelp
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if o.interval <= 0 {
		return o, fmt.Errorf("--interval %v: want a positive duration", o.interval)
	}
	if o.endpoint != "" {
		if err := cri.ValidEndpoint(o.endpoint); err != nil {
			return o, fmt.Errorf("--runtime-endpoint: %w", err)
		}
	}
	if o.cniCacheDir != "" && o.cniCacheDir[0] != '/' {
		return o, fmt.Errorf("--cni-cache-dir %q: want an absolute path", o.cniCacheDir)
	}
	if o.pluginLog != "" && o.pluginLog[0] != '/' {
		return o, fmt.Errorf("--plugin-log %q: want an absolute path", o.pluginLog)
	}
	return o, nil
}

func run(args []string, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "portguard-agent: %v\n", err)
		return 2
	}
	log := eventlog.New(stderr)
	rt, endpoint, err := dialRuntime(o.endpoint)
	if err != nil {
		eventlog.Event(log, slog.LevelError, "error", slog.String("kind", "runtime"), slog.String("error", err.Error()))
		return 2
	}
	defer rt.Close()

	newJudge := func() *liveness.Judge { return liveness.New(o.cniCacheDir) }
	m := agent.NewMetrics()
	a := &agent.Agent{
		Sources: []agent.Source{
			&agent.IPTables{Runner: &iptables.Exec{WaitSeconds: int(o.lockTimeout / time.Second)}, LockTimeout: o.lockTimeout, NewJudge: newJudge},
			&agent.NFTables{LockTimeout: o.lockTimeout, NewJudge: newJudge},
		},
		Runtime:  rt,
		Interval: o.interval,
		DryRun:   o.dryRun,
		NewJudge: newJudge,
		Log:      log,
		Metrics:  m,
	}
	eventlog.Event(log, slog.LevelInfo, "start", slog.String("version", buildinfo.Get().String()),
		slog.String("runtimeEndpoint", endpoint), slog.Duration("interval", o.interval),
		slog.Bool("dryRun", o.dryRun), slog.String("listen", o.listen), slog.String("lockFile", lock.Path()),
		slog.String("stateDir", liveness.StateDir()), slog.String("cniCacheDir", cnicache.Dir()),
		slog.String("extraCNICacheDir", o.cniCacheDir), slog.String("pluginLog", o.pluginLog))

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	if o.once {
		if _, err := a.Pass(ctx, time.Now()); err != nil {
			return 1
		}
		return 0
	}

	h := &health{interval: o.interval, start: time.Now()}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if err := m.Register(reg); err != nil {
		fmt.Fprintf(stderr, "portguard-agent: metrics: %v\n", err)
		return 2
	}
	if o.listen != "" {
		ln, err := net.Listen("tcp", o.listen)
		if err != nil {
			eventlog.Event(log, slog.LevelError, "error", slog.String("kind", "listen"), slog.String("error", err.Error()))
			return 2
		}
		srv := &http.Server{Handler: mux(reg, h), ReadHeaderTimeout: 10 * time.Second}
		go srv.Serve(ln)
		defer srv.Close()
	}
	if o.pluginLog != "" {
		pl := &agent.PluginLog{Path: o.pluginLog,
			OnEvent: m.CountPluginEvent,
			OnError: func(err error) {
				m.Errors.WithLabelValues("plugin-log").Inc()
				eventlog.Event(log, slog.LevelWarn, "error", slog.String("kind", "plugin-log"), slog.String("error", err.Error()))
			}}
		go pl.Run(ctx, time.Second)
	}

	// now before the ticker: its first tick then carries a time at least one interval after
	// the first pass, so a sandbox missed by both is removed on the second pass, not the third.
	now := time.Now()
	tick := time.NewTicker(o.interval)
	defer tick.Stop()
	for {
		if _, err := a.Pass(ctx, now); err == nil {
			h.success(now)
			m.LastSuccess.Set(float64(now.Unix()))
		}
		select {
		case <-ctx.Done():
			eventlog.Event(log, slog.LevelInfo, "stop")
			return 0
		case now = <-tick.C:
			// The tick's time, not the time the pass starts: the ticker spaces ticks by
			// exactly the interval, so two passes an interval apart measure as such.
		}
	}
}

// runtime is the CRI client the agent asks.
type runtime interface {
	agent.Runtime
	Close() error
}

// dialRuntime connects to endpoint, or without one to the first default socket that exists,
// followed when another appears later (cri.Auto).
func dialRuntime(endpoint string) (runtime, string, error) {
	if endpoint != "" {
		c, err := cri.Dial(endpoint)
		return c, endpoint, err
	}
	a, err := cri.DialDefault()
	if err != nil {
		return nil, "", err
	}
	return a, a.Endpoint(), nil
}

// health answers /healthz: 200 while a pass completed within the last 3 intervals (or the
// agent started less than 3 intervals ago), 503 otherwise.
type health struct {
	interval time.Duration
	start    time.Time
	last     atomic.Int64 // Unix nanoseconds of the last completed pass's start; 0: none
}

func (h *health) success(t time.Time) { h.last.Store(t.UnixNano()) }

func (h *health) ok(now time.Time) (bool, string) {
	since := h.start
	if l := h.last.Load(); l != 0 {
		since = time.Unix(0, l)
	}
	if age := now.Sub(since); age > 3*h.interval {
		if h.last.Load() == 0 {
			return false, fmt.Sprintf("no pass completed since the start %s ago (interval %s)", age.Round(time.Second), h.interval)
		}
		return false, fmt.Sprintf("the last completed pass started %s ago (interval %s)", age.Round(time.Second), h.interval)
	}
	return true, "ok"
}

func mux(g prometheus.Gatherer, h *health) *http.ServeMux {
	mx := http.NewServeMux()
	mx.Handle("/metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{}))
	mx.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		ok, msg := h.ok(time.Now())
		if !ok {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		fmt.Fprintln(w, msg)
	})
	return mx
}
