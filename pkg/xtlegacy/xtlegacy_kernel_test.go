package xtlegacy

import (
	"fmt"
	"os"
	"os/exec"
	"slices"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/test/testbed"
)

func TestMain(m *testing.M) { os.Exit(testbed.Main(m)) }

// inNode runs f on a thread in the bed's node namespace.
func inNode(t *testing.T, b *testbed.Bed, f func() error) {
	t.Helper()
	h, err := ns.GetNS("/var/run/netns/" + b.Node)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if err := h.Do(func(ns.NetNS) error { return f() }); err != nil {
		t.Fatal(err)
	}
}

// The jumps iptables-legacy writes for portmap's format are read back with their chains,
// owners, protocols and ports (lists and ranges), in both families; rules of
// CNI-HOSTPORT-DNAT that do not enter a CNI-DN chain, and CNI-DN chains entered from
// elsewhere, are not jumps. A namespace without a legacy nat table has none, and reading
// it does not create one. A Reader reads the namespace it was opened in, from any thread.
func TestKernelLegacyJumps(t *testing.T) {
	for _, tool := range []string{"iptables-legacy-restore", "ip6tables-legacy-restore"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s: %v", tool, err)
		}
	}
	t.Parallel()
	b := testbed.New(t)
	// Opened in the node; read from this goroutine's thread, in the machine's namespace.
	var r *Reader
	inNode(t, b, func() (err error) { r, err = Open(); return err })
	defer r.Close()
	for _, f := range hostport.Families {
		js, err := r.Jumps(f)
		if err != nil || len(js) != 0 {
			t.Fatalf("%s before any legacy rule: %v, %v", f, js, err)
		}
		if ok, err := r.Present(f); ok || err != nil {
			t.Fatalf("%s: the read created the legacy nat table (%v, %v)", f, ok, err)
		}
	}
	a := hostport.Owner{Network: "net1", ContainerID: "ctr-a"}
	c := hostport.Owner{Network: "net1", ContainerID: "ctr-c"}
	for _, f := range hostport.Families {
		tool, dest := "iptables-legacy-restore", "10.0.0.2:80"
		if f == hostport.V6 {
			tool, dest = "ip6tables-legacy-restore", "[fd00::2]:80"
		}
		payload := fmt.Sprintf(`*nat
:CNI-HOSTPORT-DNAT - [0:0]
:%[1]s - [0:0]
:%[2]s - [0:0]
:OTHER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A PREROUTING -j %[2]s
-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"net1\" id: \"ctr-a\"" -m multiport --dports 8080,8081 -j %[1]s
-A CNI-HOSTPORT-DNAT -p udp -m comment --comment "dnat name: \"net1\" id: \"ctr-c\"" -m multiport --dports 9000:9002,53 -j %[2]s
-A CNI-HOSTPORT-DNAT -p tcp -m multiport --dports 7000 -j OTHER
-A CNI-HOSTPORT-DNAT -j RETURN
-A %[1]s -p tcp -m tcp --dport 8080 -j DNAT --to-destination %[3]s
-A %[1]s -p tcp -m tcp --dport 8081 -j DNAT --to-destination %[3]s
COMMIT
`, hostport.ChainName(a), hostport.ChainName(c), dest)
		if _, err := b.Exec(b.Node, "sh", "-c", tool+" --noflush <<'EOF'\n"+payload+"EOF\n"); err != nil {
			t.Fatal(err)
		}
		if ok, err := r.Present(f); !ok || err != nil {
			t.Fatalf("%s: Present %v, %v", f, ok, err)
		}
		js, err := r.Jumps(f)
		if err != nil {
			t.Fatal(err)
		}
		want := []Jump{
			{Family: f, Chain: hostport.ChainName(a), Owner: a, Proto: "tcp", Ports: []int{8080, 8081}},
			{Family: f, Chain: hostport.ChainName(c), Owner: c, Proto: "udp", Ports: []int{9000, 9001, 9002, 53}},
		}
		if !slices.EqualFunc(js, want, func(x, y Jump) bool {
			return x.Family == y.Family && x.Chain == y.Chain && x.Owner == y.Owner && x.Proto == y.Proto && slices.Equal(x.Ports, y.Ports)
		}) {
			t.Fatalf("%s: jumps %+v, want %+v", f, js, want)
		}
		if !js[0].HasPort("tcp", 8081) || js[0].HasPort("udp", 8081) || !js[1].HasPort("udp", 9001) {
			t.Errorf("HasPort of %+v", js)
		}
	}
}
