package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/version"

	tb "github.com/portguard/portguard/test/testbed"
)

// TestSwapUpstreamToPortguard: attachments made by the real upstream portmap, then the binary
// named "portmap" is replaced by portguard in place: CHECK passes on upstream's chains, a new
// pod is added without disturbing them, and DEL removes upstream's chains completely.
func TestSwapUpstreamToPortguard(t *testing.T) {
	t.Parallel()
	b := tb.New(t)
	pg := tb.PortguardBinary(t)
	n := b.Network(tb.NetConfig{PortPlugin: "portmap"}) // upstream is installed as portmap
	a, c := b.NewPod("A"), b.NewPod("B")
	n.MustAdd(a, tb.TCP(8200, 80), tb.UDP(8200, 80))
	n.MustAdd(c, tb.TCP(8201, 80))
	a.Serve()
	c.Serve()

	b.InstallPlugin("portmap", pg)
	for _, p := range []*tb.Pod{a, c} {
		if err := n.Check(p); err != nil {
			t.Errorf("portguard CHECK of upstream's attachment %s: %v", p.Name, err)
		}
	}
	d := b.NewPod("C")
	n.MustAdd(d, tb.TCP(8202, 80))
	d.Serve()
	for _, f := range families {
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8200, "A")
		expectAnswer(t, "udp", b.Client, b.NodeIP(f).String(), 8200, "A")
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8201, "B")
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8202, "C")
	}
	expectAnswer(t, "tcp", b.Node, "127.0.0.1", 8200, "A")

	n.MustDel(a)
	for _, f := range families {
		st := b.NAT(f)
		if st.HasChain(a.Chain(n)) || len(st.JumpsTo("CNI-HOSTPORT-DNAT", a.Chain(n))) != 0 {
			t.Errorf("%s: portguard DEL left upstream's chain or jumps of A", f)
		}
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8201, "B")
	}
	expectNoAnswer(t, "tcp", b.Client, b.NodeIP4.String(), 8200)
	n.MustDel(c)
	n.MustDel(d)
	expectClean(t, b)
}

// TestSwapPortguardToUpstream: attachments made by portguard (installed as "portmap"), then
// the real upstream binary put back: upstream's DEL removes portguard's chains completely.
func TestSwapPortguardToUpstream(t *testing.T) {
	t.Parallel()
	b := tb.New(t)
	b.InstallPlugin("portmap", tb.PortguardBinary(t))
	n := b.Network(tb.NetConfig{PortPlugin: "portmap"})
	a, c := b.NewPod("A"), b.NewPod("B")
	n.MustAdd(a, tb.TCP(8210, 80), tb.UDP(8210, 80))
	n.MustAdd(c, tb.TCP(8211, 80))
	a.Serve()
	c.Serve()

	b.InstallPlugin("portmap", b.Bins.Portmap)
	if err := n.Check(a); err != nil {
		t.Logf("upstream CHECK of portguard's attachment: %v", err)
	} else {
		t.Logf("upstream CHECK of portguard's attachment passes")
	}
	n.MustDel(a)
	for _, f := range families {
		st := b.NAT(f)
		if st.HasChain(a.Chain(n)) || len(st.JumpsTo("CNI-HOSTPORT-DNAT", a.Chain(n))) != 0 {
			t.Errorf("%s: upstream DEL left portguard's chain or jumps of A: %v", f, st.Rules["CNI-HOSTPORT-DNAT"])
		}
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8211, "B")
	}
	n.MustDel(c)
	expectClean(t, b)
}

// exampleConflist adapts a file of conflist-examples/ to the bed: a main plugin that cannot
// run here (flannel, calico) is replaced by bridge + host-local on the bed's subnets, paths
// are moved into the test's directory; every other plugin and key stays as in the file.
func exampleConflist(t *testing.T, b *tb.Bed, file string) ([]byte, []string) {
	t.Helper()
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var conf map[string]any
	if err := json.Unmarshal(raw, &conf); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	plugins, _ := conf["plugins"].([]any)
	if len(plugins) == 0 {
		t.Fatalf("%s: no plugins", file)
	}
	s4, s6 := b.PodSubnets(0)
	ranges := []any{[]any{map[string]any{"subnet": s4}}, []any{map[string]any{"subnet": s6}}}
	routes := []any{map[string]any{"dst": "0.0.0.0/0"}, map[string]any{"dst": "::/0"}}
	var extra []string
	for i, p := range plugins {
		pm, _ := p.(map[string]any)
		switch typ, _ := pm["type"].(string); typ {
		case "flannel":
			// flannel's delegate sets isDefaultGateway: bridge adds the default routes
			br := b.BridgePlugin("cni0", ranges, nil)
			if d, ok := pm["delegate"].(map[string]any); ok {
				for k, v := range d { // flannel hands its delegate keys to bridge
					br[k] = v
				}
			}
			plugins[i] = br
		case "calico":
			plugins[i] = b.BridgePlugin("cni0", ranges, routes)
		case "bridge":
			if ipam, ok := pm["ipam"].(map[string]any); ok && ipam["type"] == "host-local" {
				ipam["dataDir"] = b.IPAMDir
			}
		case "portguard", "portmap":
			if _, ok := pm["logFile"]; ok {
				pm["logFile"] = filepath.Join(b.Dir, "portguard.log")
			}
		case "host-local":
		default:
			extra = append(extra, typ)
		}
	}
	out, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	return out, extra
}

// exampleVersion is a conflist's cniVersion.
func exampleVersion(t *testing.T, raw []byte) string {
	t.Helper()
	var c struct {
		CNIVersion string `json:"cniVersion"`
	}
	if err := json.Unmarshal(raw, &c); err != nil {
		t.Fatal(err)
	}
	return c.CNIVersion
}

// TestConflistExamples runs each conflist of conflist-examples/ end to end.
func TestConflistExamples(t *testing.T) {
	root, err := tb.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	files, _ := filepath.Glob(filepath.Join(root, "conflist-examples", "*.conflist"))
	if len(files) < 3 {
		t.Errorf("conflist-examples/ has %d conflists, want flannel, calico and bridge", len(files))
	}
	for _, file := range files {
		t.Run(strings.TrimSuffix(filepath.Base(file), ".conflist"), func(t *testing.T) {
			t.Parallel()
			b := tb.New(t)
			tb.PortguardBinary(t)
			raw, extra := exampleConflist(t, b, file)
			b.InstallExtraPlugins(extra...)
			n := b.Conflist(raw)
			t.Logf("conflist as run:\n%s", raw)
			p := b.NewPod("example")
			n.MustAdd(p, tb.TCP(8300, 80), tb.UDP(8300, 80))
			p.Serve()
			// CHECK exists from CNI 0.4.0; libcni refuses it for the 0.3.1 examples (flannel's
			// and calico's files keep the version they ship with).
			if ok, _ := version.GreaterThanOrEqualTo(exampleVersion(t, raw), "0.4.0"); ok {
				if err := n.Check(p); err != nil {
					t.Errorf("CHECK: %v", err)
				}
			}
			fams := []tb.Family{tb.V4}
			if p.IP6 != nil {
				fams = append(fams, tb.V6)
			}
			for _, f := range fams {
				for _, proto := range protos() {
					expectAnswer(t, proto, b.Client, b.NodeIP(f).String(), 8300, "example")
				}
				if d := b.DNChains(f); len(d) != 1 || d[0] != p.Chain(n) {
					t.Errorf("%s: chains %v, want [%s]", f, d, p.Chain(n))
				}
			}
			expectAnswer(t, "tcp", b.Node, "127.0.0.1", 8300, "example")
			n.MustDel(p)
			expectClean(t, b)
		})
	}
}
