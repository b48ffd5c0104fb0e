// Package metrics turns audits into Prometheus metrics with client_golang, for both
// `portguardctl audit -o prometheus` (one scrape, printed or written as a node-exporter
// textfile) and the node agent's /metrics (the last pass's audit). One collector, so the
// names, labels and help texts are the same wherever they come from (docs/cli.md).
//
// The plugin never imports this package: it must not link Prometheus (test in
// plugins/portguard).
package metrics

import (
	"io"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"

	"github.com/portguard/portguard/pkg/plan"
)

// Backend names, the values of the backend label (plan's, which FamilyAudit.Backend holds).
const (
	BackendIPTables = plan.BackendIPTables
	BackendNFTables = plan.BackendNFTables
)

// Audit is one backend's audit of one family, what the gauges are made of.
type Audit struct {
	Backend string // BackendIPTables or BackendNFTables
	Family  string // "ipv4", "ipv6"
	// Available: the family's table could be read. An unavailable family exports only
	// portguard_audit_up 0.
	Available bool
	Healthy   bool // no problem found
	Summary   plan.AuditSummary
}

// FromReport lists the family audits of a report, each under its backend.
func FromReport(rep plan.AuditReport) []Audit {
	return FromFamilies(rep.Families)
}

// FromFamilies lists family audits, each under its backend (iptables when unset).
func FromFamilies(fas []plan.FamilyAudit) []Audit {
	out := make([]Audit, 0, len(fas))
	for _, fa := range fas {
		b := fa.Backend
		if b == "" {
			b = BackendIPTables
		}
		out = append(out, Audit{Backend: b, Family: fa.Family.String(), Available: fa.Available,
			Healthy: fa.Healthy(), Summary: fa.Summary})
	}
	return out
}

type gauge struct {
	name, help string
	value      func(plan.AuditSummary) int
}

// gauges are the audit's per-family gauges, named as `portguardctl audit -o prometheus`
// has always named them (docs/cli.md).
var gauges = []gauge{
	{"portguard_chains", "CNI-DN chains in the nat table.", func(s plan.AuditSummary) int { return s.Chains }},
	{"portguard_claims", "Host-port claims (jump port x chain mapping) in CNI-HOSTPORT-DNAT.", func(s plan.AuditSummary) int { return s.Claims }},
	{"portguard_host_ports", "Distinct (protocol, host port) pairs claimed.", func(s plan.AuditSummary) int { return s.HostPorts }},
	{"portguard_shadowed_claims", "Claims shadowed by an earlier conflicting claim (problem kind shadowed-claim).", func(s plan.AuditSummary) int { return s.ShadowedClaims }},
	{"portguard_duplicate_claims", "Deprecated alias of portguard_shadowed_claims (same value), removed after one release.", func(s plan.AuditSummary) int { return s.ShadowedClaims }},
	{"portguard_duplicate_jumps", "Jumps repeated in CNI-HOSTPORT-DNAT.", func(s plan.AuditSummary) int { return s.DuplicateJumps }},
	{"portguard_orphan_chains", "CNI-DN chains that no jump enters.", func(s plan.AuditSummary) int { return s.OrphanChains }},
	{"portguard_port_mismatches", "Chains whose jump ports and DNAT ports disagree.", func(s plan.AuditSummary) int { return s.PortMismatches }},
	{"portguard_missing_entry_jumps", "Missing PREROUTING/OUTPUT jumps to CNI-HOSTPORT-DNAT while claims exist.", func(s plan.AuditSummary) int { return s.MissingEntryJumps }},
	{"portguard_missing_masquerade_rules", "Missing SETMARK/MASQ rules or POSTROUTING jump while chains mark packets.", func(s plan.AuditSummary) int { return s.MissingMasquerade }},
	{"portguard_address_reuses", "Claims whose destination address now belongs to another live attachment.", func(s plan.AuditSummary) int { return s.AddressReuses }},
	{"portguard_split_claims", "Claims of a host port also claimed in another backend (nftables backend; problem kind split-claim).", func(s plan.AuditSummary) int { return s.SplitClaims }},
	{"portguard_stale_upstream_rules", "Rules of upstream portmap's cni_hostport tables whose owner is stale (nftables backend).", func(s plan.AuditSummary) int { return s.StaleUpstreamRules }},
	{"portguard_layout_problems", "Differences of portguard's nftables table from its layout.", func(s plan.AuditSummary) int { return s.LayoutProblems }},
	{"portguard_orphan_elements", "Gate elements and masquerade entries of portguard's nftables table without their claim.", func(s plan.AuditSummary) int { return s.OrphanElements }},
	{"portguard_alive_owner_claims", "Claims whose owner was judged alive (netns, process and address present).", func(s plan.AuditSummary) int { return s.AliveOwners }},
	{"portguard_stale_owner_claims", "Claims whose owner was judged stale (no record, or netns, process or address gone).", func(s plan.AuditSummary) int { return s.StaleOwners }},
	{"portguard_problems", "Problems found by the audit.", func(s plan.AuditSummary) int { return s.Problems }},
}

var labels = []string{"family", "backend"}

// AuditCollector exports the audits last given to Set: the gauges above plus
// portguard_audit_up, portguard_audit_healthy (labels family, backend) and
// portguard_audit_timestamp_seconds (when Set was called). Safe for concurrent use.
type AuditCollector struct {
	mu     sync.Mutex
	audits []Audit
	at     time.Time

	descs   []*prometheus.Desc // parallel to gauges
	up      *prometheus.Desc
	healthy *prometheus.Desc
	stamp   *prometheus.Desc
}

// NewAuditCollector returns a collector with no audit yet (it exports nothing until Set).
func NewAuditCollector() *AuditCollector {
	c := &AuditCollector{
		up:      prometheus.NewDesc("portguard_audit_up", "Whether the family's table could be read (1) or not (0).", labels, nil),
		healthy: prometheus.NewDesc("portguard_audit_healthy", "Whether the audit found no problem (1) or some (0).", labels, nil),
		stamp:   prometheus.NewDesc("portguard_audit_timestamp_seconds", "When the audit ran (Unix seconds).", nil, nil),
	}
	for _, g := range gauges {
		c.descs = append(c.descs, prometheus.NewDesc(g.name, g.help, labels, nil))
	}
	return c
}

// Set replaces the exported audits; at is when they were taken.
func (c *AuditCollector) Set(audits []Audit, at time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.audits, c.at = append([]Audit(nil), audits...), at
}

// Describe implements prometheus.Collector.
func (c *AuditCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.up
	ch <- c.healthy
	ch <- c.stamp
	for _, d := range c.descs {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *AuditCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	audits, at := c.audits, c.at
	c.mu.Unlock()
	if at.IsZero() {
		return
	}
	b := func(v bool) float64 {
		if v {
			return 1
		}
		return 0
	}
	for _, a := range audits {
		ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, b(a.Available), a.Family, a.Backend)
		if !a.Available {
			continue
		}
		ch <- prometheus.MustNewConstMetric(c.healthy, prometheus.GaugeValue, b(a.Healthy), a.Family, a.Backend)
		for i, g := range gauges {
			ch <- prometheus.MustNewConstMetric(c.descs[i], prometheus.GaugeValue, float64(g.value(a.Summary)), a.Family, a.Backend)
		}
	}
	ch <- prometheus.MustNewConstMetric(c.stamp, prometheus.GaugeValue, float64(at.Unix()))
}

// Registry returns a registry holding only collectors cs (no Go runtime or process
// metrics: a textfile must not repeat what node-exporter exports itself).
func Registry(cs ...prometheus.Collector) *prometheus.Registry {
	r := prometheus.NewRegistry()
	for _, c := range cs {
		r.MustRegister(c)
	}
	return r
}

// WriteText writes what g gathers in the Prometheus text format (version 0.0.4, the
// node-exporter textfile format).
func WriteText(w io.Writer, g prometheus.Gatherer) error {
	mfs, err := g.Gather()
	if err != nil {
		return err
	}
	enc := expfmt.NewEncoder(w, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, mf := range mfs {
		if err := enc.Encode(mf); err != nil {
			return err
		}
	}
	return nil
}

// WriteTextfile writes what g gathers to path atomically: a temporary file in path's
// directory, renamed over path (prometheus.WriteToTextfile), so node-exporter never reads
// half a file. The file is mode 0644.
func WriteTextfile(path string, g prometheus.Gatherer) error {
	return prometheus.WriteToTextfile(path, g)
}
