package doctor

import (
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables/iptablestest"
)

// fakeEnv serves /etc/cni/net.d and /opt/cni/bin from memory, sysctls from a map and
// commands from canned output.
type fakeEnv struct {
	files    fstest.MapFS
	sysctls  map[string]string
	commands map[string]string // "name args" -> stdout
	tables   map[hostport.Family]string
	ifaces   map[netip.Addr]string
}

func newFake() *fakeEnv {
	return &fakeEnv{
		files:    fstest.MapFS{},
		sysctls:  map[string]string{"net.ipv4.ip_forward": "1", "net.bridge.bridge-nf-call-iptables": "1"},
		commands: map[string]string{"iptables -V": "iptables v1.8.9 (nf_tables)\n"},
		tables:   map[hostport.Family]string{},
		ifaces:   map[netip.Addr]string{},
	}
}

func (f *fakeEnv) conf(name, text string) {
	f.files["etc/cni/net.d/"+name] = &fstest.MapFile{Data: []byte(text)}
}

// bin installs plugins that print their about line: portguard under the names portguard
// and portmap (a drop-in), a generic CNI plugin line for the others. fakeEnv.About returns
// a file's content, so aboutBin can install anything else.
func (f *fakeEnv) bin(names ...string) {
	for _, n := range names {
		about := "CNI " + n + " plugin v1.10.0"
		if PortPlugins[n] {
			about = guardAbout
		}
		f.aboutBin(n, about)
	}
}

func (f *fakeEnv) aboutBin(name, about string) {
	f.files["opt/cni/bin/"+name] = &fstest.MapFile{Data: []byte(about), Mode: 0o755}
}

const guardAbout = "portguard v0.1.0 (commit 0123456789ab, go1.26.8): CNI host ports without stale claims"

func (f *fakeEnv) env() Env {
	strip := func(p string) string { return strings.TrimPrefix(p, "/") }
	return Env{
		ConfDir:  "/etc/cni/net.d",
		BinDirs:  []string{"/opt/cni/bin"},
		ReadDir:  func(d string) ([]fs.DirEntry, error) { return fs.ReadDir(f.files, strip(d)) },
		ReadFile: func(p string) ([]byte, error) { return fs.ReadFile(f.files, strip(p)) },
		Stat:     func(p string) (fs.FileInfo, error) { return fs.Stat(f.files, strip(p)) },
		Sysctl: func(n string) (string, error) {
			if v, ok := f.sysctls[n]; ok {
				return v, nil
			}
			return "", os.ErrNotExist
		},
		Command: func(name string, args ...string) (string, error) {
			if out, ok := f.commands[strings.Join(append([]string{name}, args...), " ")]; ok {
				return out, nil
			}
			return "", fmt.Errorf("%s: %w", name, errors.New("executable file not found"))
		},
		RouteIface: func(a netip.Addr) (string, error) {
			if n, ok := f.ifaces[a]; ok {
				return n, nil
			}
			return "", errors.New("no route")
		},
		About: func(p string) (string, error) {
			b, err := fs.ReadFile(f.files, strip(p))
			return string(b), err
		},
		Runner: iptablestest.MustNew(f.tables),
	}
}

func errorsOf(r Report) []string {
	var out []string
	for _, f := range r.Findings {
		if f.Severity != OK {
			out = append(out, fmt.Sprintf("%s %s: %s | fix: %s", f.Severity, f.Check, f.What, f.Fix))
		}
	}
	sort.Strings(out)
	return out
}

func pluginTypes(t *testing.T, data []byte) []string {
	l, err := parseConf(data, true)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, p := range l.Plugins {
		out = append(out, p.Type)
	}
	return out
}

// Every shipped example is healthy when its plugins are installed.
func TestConflistExamplesHealthy(t *testing.T) {
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
			f := newFake()
			f.conf("10-"+filepath.Base(p), string(data))
			f.bin(pluginTypes(t, data)...)
			rep := Run(f.env())
			if !rep.Healthy() || len(errorsOf(rep)) > 0 {
				t.Fatalf("findings: %v", errorsOf(rep))
			}
		})
	}
}

const goodList = `{"cniVersion": "1.1.0", "name": "cbr0", "plugins": [
  {"type": "flannel", "delegate": {"hairpinMode": true}},
  {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}]}`

func only(t *testing.T, rep Report, check string, wants ...string) {
	t.Helper()
	errs := errorsOf(rep)
	if len(errs) != 1 || !strings.Contains(errs[0], check) {
		t.Fatalf("want one %s finding, got %v", check, errs)
	}
	for _, w := range wants {
		if !strings.Contains(errs[0], w) {
			t.Errorf("finding lacks %q: %s", w, errs[0])
		}
	}
}

func TestBrokenVariants(t *testing.T) {
	t.Run("missing capability", func(t *testing.T) {
		f := newFake()
		f.conf("10-flannel.conflist", strings.Replace(goodList, `"capabilities": {"portMappings": true}, `, "", 1))
		f.bin("flannel", "portmap")
		only(t, Run(f.env()), "port-mapping", `lacks "capabilities": {"portMappings": true}`, `add "capabilities": {"portMappings": true} to the portmap entry of /etc/cni/net.d/10-flannel.conflist`)
	})
	t.Run("missing binary", func(t *testing.T) {
		f := newFake()
		f.conf("10-flannel.conflist", goodList)
		f.bin("flannel")
		only(t, Run(f.env()), "binary", "plugin portmap not found", "/opt/cni/bin/portmap")
	})
	t.Run("binary not executable", func(t *testing.T) {
		f := newFake()
		f.conf("10-flannel.conflist", goodList)
		f.bin("flannel")
		f.files["opt/cni/bin/portmap"] = &fstest.MapFile{Data: []byte("x"), Mode: 0o644}
		only(t, Run(f.env()), "binary", "not an executable", "chmod 0755 /opt/cni/bin/portmap")
	})
	t.Run("no portmap in the chain", func(t *testing.T) {
		f := newFake()
		f.conf("10-flannel.conflist", `{"cniVersion": "1.1.0", "name": "cbr0", "plugins": [{"type": "flannel"}]}`)
		f.bin("flannel")
		only(t, Run(f.env()), "port-mapping", "chains no portmap or portguard", `{"type": "portguard", "capabilities": {"portMappings": true}}`)
	})
	t.Run("lexically first file wins", func(t *testing.T) {
		f := newFake()
		f.conf("10-flannel.conflist", goodList)
		f.conf("05-old.conf", `{"cniVersion": "0.3.1", "name": "old", "type": "bridge"}`)
		f.conf("README.md", "not a config")
		f.bin("flannel", "portmap", "bridge")
		rep := Run(f.env())
		if rep.Conflist != "/etc/cni/net.d/05-old.conf" {
			t.Fatalf("picked %s", rep.Conflist)
		}
		only(t, rep, "port-mapping", "05-old.conf chains no portmap")
	})
	t.Run("unparsable first file", func(t *testing.T) {
		f := newFake()
		f.conf("00-broken.conflist", `{"name": "x", "plugins": [`)
		f.conf("10-flannel.conflist", goodList)
		only(t, Run(f.env()), "conflist", "does not parse", "ignored: 10-flannel.conflist")
	})
	t.Run("empty dir", func(t *testing.T) {
		f := newFake()
		f.files["etc/cni/net.d/.keep"] = &fstest.MapFile{}
		only(t, Run(f.env()), "conflist", "no .conflist")
	})
	t.Run("ip_forward off", func(t *testing.T) {
		f := newFake()
		f.conf("10-flannel.conflist", goodList)
		f.bin("flannel", "portmap")
		f.sysctls["net.ipv4.ip_forward"] = "0"
		only(t, Run(f.env()), "sysctl", "ip_forward", "sysctl -w net.ipv4.ip_forward=1")
	})
	t.Run("br_netfilter not loaded", func(t *testing.T) {
		f := newFake()
		f.conf("10-flannel.conflist", goodList)
		f.bin("flannel", "portmap")
		delete(f.sysctls, "net.bridge.bridge-nf-call-iptables")
		only(t, Run(f.env()), "sysctl", "br_netfilter", "modprobe br_netfilter")
	})
	t.Run("bridge-nf irrelevant for calico", func(t *testing.T) {
		f := newFake()
		f.conf("10-calico.conflist", strings.Replace(goodList, `"flannel"`, `"calico"`, 1))
		f.bin("calico", "portmap")
		delete(f.sysctls, "net.bridge.bridge-nf-call-iptables")
		if errs := errorsOf(Run(f.env())); len(errs) != 0 {
			t.Fatal(errs)
		}
	})
	t.Run("ip6tables unusable is a warning", func(t *testing.T) {
		f := newFake()
		f.conf("10-flannel.conflist", goodList)
		f.bin("flannel", "portmap")
		e := f.env()
		k := iptablestest.MustNew(nil)
		k.Unusable = map[hostport.Family]bool{hostport.V6: true}
		e.Runner = k
		rep := Run(e)
		if !rep.Healthy() {
			t.Fatal(errorsOf(rep))
		}
		only(t, rep, "iptables", "ipv6")
	})
}

const upstreamV4 = `*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
:CNI-HOSTPORT-SETMARK - [0:0]
:CNI-HOSTPORT-MASQ - [0:0]
:CNI-DN-1111111111111111111aa - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A POSTROUTING -m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ
-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"cbr0\" id: \"abc\"" -m multiport --dports 8080 -j CNI-DN-1111111111111111111aa
-A CNI-DN-1111111111111111111aa -s 10.88.0.0/24 -p tcp -m tcp --dport 8080 -j CNI-HOSTPORT-SETMARK
-A CNI-DN-1111111111111111111aa -s 127.0.0.1/32 -p tcp -m tcp --dport 8080 -j CNI-HOSTPORT-SETMARK
-A CNI-DN-1111111111111111111aa -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.88.0.2:80
-A CNI-HOSTPORT-SETMARK -m comment --comment "CNI portfwd masquerade mark" -j MARK --set-xmark 0x2000/0x2000
-A CNI-HOSTPORT-MASQ -m mark --mark 0x2000/0x2000 -j MASQUERADE
COMMIT
`

func TestRouteLocalnet(t *testing.T) {
	f := newFake()
	f.conf("10-flannel.conflist", goodList)
	f.bin("flannel", "portmap")
	f.tables[hostport.V4] = upstreamV4
	f.ifaces[netip.MustParseAddr("10.88.0.2")] = "cni0"
	f.sysctls["net.ipv4.conf.cni0.route_localnet"] = "0"
	rep := Run(f.env())
	errs := errorsOf(rep)
	if len(errs) != 1 || !strings.HasPrefix(errs[0], "warning sysctl") || !strings.Contains(errs[0], "sysctl -w net.ipv4.conf.cni0.route_localnet=1") {
		t.Fatalf("%v", errs)
	}
	if !rep.Healthy() {
		t.Fatal("a warning must not fail doctor")
	}
	f.sysctls["net.ipv4.conf.cni0.route_localnet"] = "1"
	if errs := errorsOf(Run(f.env())); len(errs) != 0 {
		t.Fatal(errs)
	}
}

func TestOtherBackendAndAudit(t *testing.T) {
	f := newFake()
	f.conf("10-flannel.conflist", goodList)
	f.bin("flannel", "portmap")
	f.files["proc/net/ip_tables_names"] = &fstest.MapFile{Data: []byte("nat\nfilter\n")}
	f.commands["iptables-legacy-save -t nat"] = upstreamV4
	// the current backend shows a shadowed claim too
	f.tables[hostport.V4] = strings.Replace(upstreamV4, "COMMIT", `:CNI-DN-2222222222222222222bb - [0:0]
-A CNI-DN-2222222222222222222bb -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.88.0.3:80
-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"cbr0\" id: \"def\"" -m multiport --dports 8080 -j CNI-DN-2222222222222222222bb
COMMIT`, 1)
	e := f.env() // the fake copies the tables
	rep := Run(e)
	errs := errorsOf(rep)
	if len(errs) != 2 {
		t.Fatalf("%v", errs)
	}
	if !strings.Contains(errs[1], "backend") || !strings.Contains(errs[1], "legacy backend holds 4 CNI chains (1 claims") ||
		!strings.Contains(errs[1], "iptables-legacy -t nat -D PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT") ||
		!strings.Contains(errs[1], "iptables-legacy -t nat -X CNI-DN-1111111111111111111aa") {
		t.Errorf("backend finding: %s", errs[1])
	}
	if !strings.Contains(errs[0], "audit") || !strings.Contains(errs[0], "shadowed-claim") || !strings.Contains(errs[0], "portguardctl repair") {
		t.Errorf("audit finding: %s", errs[0])
	}
	if rep.Audit.Healthy {
		t.Error("audit report healthy")
	}
}
