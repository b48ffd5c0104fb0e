package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/doctor"
	"github.com/portguard/portguard/pkg/hostport"
)

// doctorNode is a namespace where host ports can work: forwarding on, and (the sysctl is
// per namespace) bridge-nf-call-iptables on when br_netfilter is loaded.
func doctorNode(t *testing.T) string {
	ns := newNS(t)
	mustNS(t, ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	if r := inNS(t, ns, nil, "test", "-e", "/proc/sys/net/bridge/bridge-nf-call-iptables"); r.code == 0 {
		mustNS(t, ns, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1")
	}
	return ns
}

// confAndBins writes conf into a temp conf dir and an executable stub for every plugin
// type it names (except those in missing) into a temp bin dir.
func confAndBins(t *testing.T, name string, conf []byte, missing ...string) (string, string) {
	confDir, binDir := t.TempDir(), t.TempDir()
	if err := os.WriteFile(filepath.Join(confDir, name), conf, 0o644); err != nil {
		t.Fatal(err)
	}
	var list struct {
		Plugins []struct {
			Type string `json:"type"`
		} `json:"plugins"`
	}
	if err := json.Unmarshal(conf, &list); err != nil {
		t.Fatal(err)
	}
	for _, p := range list.Plugins {
		skip := false
		for _, m := range missing {
			skip = skip || m == p.Type
		}
		if !skip {
			// Each fake prints the about line a real plugin prints without CNI_COMMAND, which
			// doctor reads to identify it.
			about := "CNI " + p.Type + " plugin v1.10.0"
			if doctor.PortPlugins[p.Type] {
				about = "portguard v0.1.0 (commit 0123456789ab, go1.26.8): CNI host ports without stale claims"
			}
			if err := os.WriteFile(filepath.Join(binDir, p.Type), []byte("#!/bin/sh\necho '"+about+"' >&2\nexit 1\n"), 0o755); err != nil {
				t.Fatal(err)
			}
		}
	}
	return confDir, binDir
}

func TestDoctorOnConflistExamples(t *testing.T) {
	needRoot(t)
	paths, _ := filepath.Glob("../../conflist-examples/*.conflist")
	if len(paths) == 0 {
		t.Fatal("no conflist examples")
	}
	for _, p := range paths {
		t.Run(filepath.Base(p), func(t *testing.T) {
			data, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			ns := doctorNode(t)
			u := newUpstream(t, ns, hostport.V4)
			u.attach(live, 8080, 8080, "10.88.0.0/24", "10.88.0.3", 80)
			confDir, binDir := confAndBins(t, "10-"+filepath.Base(p), data)
			r := ctl(t, ns, "doctor", "--conf-dir", confDir, "--bin-dir", binDir)
			if r.code != 0 || strings.Contains(r.stdout, "[ERROR]") {
				t.Fatalf("doctor: exit %d\n%s%s", r.code, r.stdout, r.stderr)
			}
			for _, want := range []string{"[ok]      conflist", "with the portMappings capability", "ipv4: 1 claims on 1 host ports"} {
				if !strings.Contains(r.stdout, want) {
					t.Errorf("doctor output lacks %q:\n%s", want, r.stdout)
				}
			}
		})
	}
}

func TestDoctorBrokenVariants(t *testing.T) {
	needRoot(t)
	data, err := os.ReadFile("../../conflist-examples/flannel.conflist")
	if err != nil {
		t.Fatal(err)
	}
	var conf map[string]any
	if err := json.Unmarshal(data, &conf); err != nil {
		t.Fatal(err)
	}
	variant := func(edit func(plugins []any) []any) []byte {
		var c map[string]any
		json.Unmarshal(data, &c)
		c["plugins"] = edit(c["plugins"].([]any))
		b, _ := json.MarshalIndent(c, "", "  ")
		return b
	}
	cases := []struct {
		name    string
		conf    []byte
		missing []string
		want    []string
	}{
		{"missing capability", variant(func(ps []any) []any {
			delete(ps[1].(map[string]any), "capabilities")
			return ps
		}), nil, []string{`lacks "capabilities": {"portMappings": true}`, `fix: add "capabilities": {"portMappings": true} to the portguard entry`}},
		{"missing binary", data, []string{"portguard"}, []string{"plugin portguard not found", "fix: make install"}},
		{"no portmap in the chain", variant(func(ps []any) []any { return ps[:1] }), nil, []string{"chains no portmap or portguard plugin", `fix: add {"type": "portguard", "capabilities": {"portMappings": true}}`}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ns := doctorNode(t)
			confDir, binDir := confAndBins(t, "10-flannel.conflist", tc.conf, tc.missing...)
			r := ctl(t, ns, "doctor", "--conf-dir", confDir, "--bin-dir", binDir)
			if r.code != 1 {
				t.Fatalf("doctor: exit %d\n%s%s", r.code, r.stdout, r.stderr)
			}
			if n := strings.Count(r.stdout, "[ERROR]"); n != 1 {
				t.Errorf("%d errors, want 1:\n%s", n, r.stdout)
			}
			for _, w := range tc.want {
				if !strings.Contains(r.stdout, w) {
					t.Errorf("doctor output lacks %q:\n%s", w, r.stdout)
				}
			}
		})
	}
	t.Run("unreadable conf dir", func(t *testing.T) {
		ns := doctorNode(t)
		r := ctl(t, ns, "doctor", "--conf-dir", "/nonexistent/pgc", "--bin-dir", t.TempDir())
		if r.code != 1 || !strings.Contains(r.stdout, "cannot read the CNI config directory") {
			t.Fatalf("exit %d\n%s", r.code, r.stdout)
		}
	})
}

// TestDoctorSeesTheOtherBackend: CNI chains written with iptables-legacy in a namespace
// whose iptables is nft are invisible to iptables but found by doctor.
func TestDoctorSeesTheOtherBackend(t *testing.T) {
	needRoot(t)
	out, err := exec.Command("iptables", "-V").Output()
	if err != nil || !strings.Contains(string(out), "nf_tables") {
		t.Skip("iptables is not the nft backend")
	}
	if _, err := exec.LookPath("iptables-legacy"); err != nil {
		t.Skip("iptables-legacy not installed")
	}
	data, _ := os.ReadFile("../../conflist-examples/bridge.conflist")
	ns := doctorNode(t)
	confDir, binDir := confAndBins(t, "10-bridge.conflist", data)
	mustNS(t, ns, "iptables-legacy", "-w", "-t", "nat", "-N", "CNI-HOSTPORT-DNAT")
	mustNS(t, ns, "iptables-legacy", "-w", "-t", "nat", "-A", "PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "CNI-HOSTPORT-DNAT")
	mustNS(t, ns, "iptables-legacy", "-w", "-t", "nat", "-N", hostport.ChainName(stale))
	mustNS(t, ns, "iptables-legacy", "-w", "-t", "nat", "-A", hostport.ChainName(stale), "-p", "tcp", "--dport", "8080", "-j", "DNAT", "--to-destination", "10.88.0.2:80")
	mustNS(t, ns, "iptables-legacy", "-w", "-t", "nat", "-A", "CNI-HOSTPORT-DNAT", "-m", "comment", "--comment", `dnat name: "cbr0" id: "x"`, "-m", "multiport", "-p", "tcp", "--destination-ports", "8080", "-j", hostport.ChainName(stale))
	r := ctl(t, ns, "doctor", "--conf-dir", confDir, "--bin-dir", binDir)
	if r.code != 1 {
		t.Fatalf("doctor: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	for _, want := range []string{"the legacy backend holds 2 CNI chains (1 claims in CNI-HOSTPORT-DNAT)", "iptables-legacy -t nat -D PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT", "iptables-legacy -t nat -X " + hostport.ChainName(stale)} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("doctor output lacks %q:\n%s", want, r.stdout)
		}
	}
}
