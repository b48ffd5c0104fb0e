package main

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/portguard/portguard/pkg/metrics/metricstest"
)

// Bad flags are usage errors (exit 2) naming the flag; --help exits 0.
func TestFlags(t *testing.T) {
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--help"}, 0, "runtime-endpoint"},
		{[]string{"--interval", "0s"}, 2, "--interval"},
		{[]string{"--interval", "soon"}, 2, "interval"},
		{[]string{"--runtime-endpoint", "/run/containerd/containerd.sock"}, 2, "--runtime-endpoint"},
		{[]string{"--runtime-endpoint", "tcp://127.0.0.1:1"}, 2, "--runtime-endpoint"},
		{[]string{"--cni-cache-dir", "relative"}, 2, "--cni-cache-dir"},
		{[]string{"--plugin-log", "relative.log"}, 2, "--plugin-log"},
		{[]string{"extra"}, 2, "extra"},
	} {
		var stderr bytes.Buffer
		if code := run(c.args, &stderr); code != c.code || !strings.Contains(stderr.String(), c.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit %d naming %q", c.args, code, stderr.String(), c.code, c.want)
		}
	}
	o, err := parseFlags(nil, &bytes.Buffer{})
	if err != nil || o.interval != time.Minute || o.listen != ":9617" || o.endpoint != "" || o.dryRun || o.once {
		t.Errorf("defaults %+v, %v", o, err)
	}
}

// /healthz: 200 within 3 intervals of the start or of the last completed pass, 503 after.
func TestHealthz(t *testing.T) {
	start := time.Now().Add(-10 * time.Second)
	h := &health{interval: time.Second, start: start}
	if ok, msg := h.ok(start.Add(2 * time.Second)); !ok {
		t.Errorf("2 intervals after the start, no pass yet: %s", msg)
	}
	if ok, msg := h.ok(start.Add(4 * time.Second)); ok || !strings.Contains(msg, "no pass completed") {
		t.Errorf("4 intervals after the start without a pass: ok %v %q", ok, msg)
	}
	h.success(start.Add(5 * time.Second))
	if ok, _ := h.ok(start.Add(7 * time.Second)); !ok {
		t.Error("2 intervals after a completed pass: not ok")
	}
	if ok, _ := h.ok(start.Add(9 * time.Second)); ok {
		t.Error("4 intervals after the last completed pass: ok")
	}

	reg := prometheus.NewRegistry()
	g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "portguard_agent_runtime_up", Help: "x"})
	reg.MustRegister(g)
	srv := httptest.NewServer(mux(reg, h))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("/healthz long after the last pass: %d, want 503", resp.StatusCode)
	}
	h.success(time.Now())
	resp, err = http.Get(srv.URL + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("/healthz right after a pass: %d, want 200", resp.StatusCode)
	}
	resp, err = http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	fams, err := metricstest.Parse(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := fams.Value("portguard_agent_runtime_up", nil); !ok {
		t.Errorf("/metrics lacks the registered gauge: %s", fams.Names())
	}
}
