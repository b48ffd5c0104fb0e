// Package metricstest parses Prometheus text exposition (as /metrics and
// `portguardctl audit -o prometheus` write it) with prometheus/common/expfmt, for tests.
package metricstest

import (
	"fmt"
	"io"
	"sort"
	"strings"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Families is a parsed exposition, by metric name.
type Families map[string]*dto.MetricFamily

// Parse parses the text format; an exposition the parser rejects (a sample before its
// TYPE, a TYPE given twice, a malformed line) is an error.
func Parse(r io.Reader) (Families, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(r)
	return Families(mfs), err
}

// Value returns the value of the sample of metric name whose labels include all of want
// (gauge, counter or untyped; a histogram's sample count); ok is false when there is none.
func (fs Families) Value(name string, want map[string]string) (v float64, ok bool) {
	mf := fs[name]
	if mf == nil {
		return 0, false
	}
	for _, m := range mf.GetMetric() {
		if !matches(m, want) {
			continue
		}
		switch {
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), true
		case m.Counter != nil:
			return m.GetCounter().GetValue(), true
		case m.Untyped != nil:
			return m.GetUntyped().GetValue(), true
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount()), true
		}
	}
	return 0, false
}

// Type returns the metric's type ("GAUGE", "COUNTER", ...), "" when absent.
func (fs Families) Type(name string) string {
	if mf := fs[name]; mf != nil {
		return mf.GetType().String()
	}
	return ""
}

// Names lists the metric names, sorted (for messages).
func (fs Families) Names() string {
	var ns []string
	for n := range fs {
		ns = append(ns, n)
	}
	sort.Strings(ns)
	return strings.Join(ns, " ")
}

func matches(m *dto.Metric, want map[string]string) bool {
	have := map[string]string{}
	for _, l := range m.GetLabel() {
		have[l.GetName()] = l.GetValue()
	}
	for k, v := range want {
		if have[k] != v {
			return false
		}
	}
	return true
}

// L builds a label set from pairs: L("family", "ipv4", "backend", "iptables").
func L(kv ...string) map[string]string {
	if len(kv)%2 != 0 {
		panic(fmt.Sprintf("metricstest.L: odd number of arguments %q", kv))
	}
	m := map[string]string{}
	for i := 0; i < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return m
}
