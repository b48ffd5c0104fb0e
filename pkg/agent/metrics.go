package agent

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/portguard/portguard/pkg/metrics"
)

// Metrics are the agent's own metrics, next to the audit's gauges (Audit, shared with
// `portguardctl audit -o prometheus`). Names and meanings: README "Running the agent".
type Metrics struct {
	Audit         *metrics.AuditCollector
	Removals      *prometheus.CounterVec // reason: sandbox-gone, address-reused
	Errors        *prometheus.CounterVec // kind: observe, runtime, remove, plugin-log
	PassDuration  prometheus.Histogram
	LastSuccess   prometheus.Gauge
	RuntimeUp     prometheus.Gauge
	Sandboxes     prometheus.Gauge
	Suspects      prometheus.Gauge
	PluginEvents  *prometheus.CounterVec // event: the plugin's logFile event names
	registerables []prometheus.Collector
}

// NewMetrics returns the agent's metrics, not yet registered.
func NewMetrics() *Metrics {
	m := &Metrics{
		Audit: metrics.NewAuditCollector(),
		Removals: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "portguard_agent_removals_total",
			Help: "Attachments whose claims the agent removed, by reason (sandbox-gone, address-reused)."}, []string{"reason"}),
		Errors: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "portguard_agent_errors_total",
			Help: "Errors of the agent, by kind: observe (a backend could not be read), runtime (CRI did not answer), remove (a removal failed), plugin-log (the plugin's log could not be read)."}, []string{"kind"}),
		PassDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "portguard_agent_pass_duration_seconds",
			Help:    "Duration of one pass (audit of every backend, liveness, CRI, removals).",
			Buckets: []float64{.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}}),
		LastSuccess: prometheus.NewGauge(prometheus.GaugeOpts{Name: "portguard_agent_last_success_timestamp_seconds",
			Help: "When the last pass that completed started (Unix seconds); a pass whose runtime did not answer completes too."}),
		RuntimeUp: prometheus.NewGauge(prometheus.GaugeOpts{Name: "portguard_agent_runtime_up",
			Help: "Whether the container runtime answered ListPodSandbox in the last pass (1) or not (0)."}),
		Sandboxes: prometheus.NewGauge(prometheus.GaugeOpts{Name: "portguard_agent_runtime_sandboxes",
			Help: "Pod sandboxes the runtime listed in the last pass that it answered (every state)."}),
		Suspects: prometheus.NewGauge(prometheus.GaugeOpts{Name: "portguard_agent_unknown_sandbox_owners",
			Help: "Owners of claims whose container ID the runtime does not list (removed once seen so twice an interval apart and stale)."}),
		PluginEvents: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "portguard_plugin_events_total",
			Help: "Events in the plugin's logFile since the agent started, by event (takeover, refused, gc; other for any other name)."}, []string{"event"}),
	}
	for _, r := range []string{ReasonSandboxGone, ReasonAddressReused} {
		m.Removals.WithLabelValues(r)
	}
	for _, k := range []string{"observe", "runtime", "remove", "plugin-log"} {
		m.Errors.WithLabelValues(k)
	}
	for _, e := range PluginEventNames {
		m.PluginEvents.WithLabelValues(e)
	}
	m.registerables = []prometheus.Collector{m.Audit, m.Removals, m.Errors, m.PassDuration, m.LastSuccess,
		m.RuntimeUp, m.Sandboxes, m.Suspects, m.PluginEvents}
	return m
}

// Register registers every metric with r.
func (m *Metrics) Register(r prometheus.Registerer) error {
	for _, c := range m.registerables {
		if err := r.Register(c); err != nil {
			return err
		}
	}
	return nil
}

// PluginEventNames are the events the plugin writes to its logFile; CountPluginEvent counts
// any other name as "other", so a hostile or garbled line cannot grow the label set.
var PluginEventNames = []string{"takeover", "refused", "gc"}

// CountPluginEvent counts one plugin logFile event by name (PluginEventNames, else "other").
func (m *Metrics) CountPluginEvent(name string) {
	for _, e := range PluginEventNames {
		if e == name {
			m.PluginEvents.WithLabelValues(e).Inc()
			return
		}
	}
	m.PluginEvents.WithLabelValues("other").Inc()
}
