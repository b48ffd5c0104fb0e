package cri_test

import (
	"testing"

	"github.com/portguard/portguard/pkg/metrics/metricstest"
	"github.com/portguard/portguard/test/cri"
)

func TestCapsExperiment(t *testing.T) {
	r := cri.Start(t)
	gone := forgotten(t, r)
	r.Restart()
	r.RunPod("live", cri.HostPort(8082, 80))
	_ = gone
	for _, caps := range [][]string{{"NET_ADMIN"}, {"NET_ADMIN", "SYS_ADMIN"}, {"NET_ADMIN", "SYS_PTRACE"}, {"NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"}} {
		a := r.StartAgentWithCaps(caps, "--interval", "1s", "--listen", "127.0.0.1:9617", "--dry-run")
		a.Next(passWait, "pass")
		ev := a.Next(passWait, "pass")
		f := scrape(t, a)
		l := metricstest.L("family", "ipv4", "backend", "iptables")
		alive, _ := f.Value("portguard_alive_owner_claims", l)
		stale, _ := f.Value("portguard_stale_owner_claims", l)
		up, _ := f.Value("portguard_audit_up", l)
		t.Logf("%v: audit_up %v alive %v stale %v pass %s", caps, up, alive, stale, ev.Fields["wouldRemove"])
		a.Stop()
		t.Logf("%s", a.Log())
	}
}
