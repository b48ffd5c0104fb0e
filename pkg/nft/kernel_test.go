package nft

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"reflect"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/state"
)

// These tests run against the kernel in throwaway network namespaces: iptables-restore
// (nft backend) writes the rules, this package reads and deletes them, and iptables-save
// shows the outcome.

// node is a namespace with a table loaded; do runs code inside it (netlink sockets and
// child processes opened there belong to it).
type node struct {
	t    *testing.T
	name string
	ns   ns.NetNS
}

func newNode(t *testing.T, payload string) *node {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces")
	}
	path, err := exec.LookPath("iptables")
	if err != nil {
		t.Skip("iptables not installed")
	}
	b := make([]byte, 4)
	rand.Read(b)
	n := &node{t: t, name: "pgn-" + hex.EncodeToString(b)}
	if out, err := exec.Command("ip", "netns", "add", n.name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", n.name).Run() })
	if n.ns, err = ns.GetNS("/var/run/netns/" + n.name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.ns.Close() })
	usable := false
	n.do(func() { usable = Usable(hostport.V4, path) })
	if !usable {
		t.Skip("iptables here is not the nf_tables backend")
	}
	if payload != "" {
		n.restore(payload)
	}
	return n
}

func (n *node) do(f func()) {
	n.t.Helper()
	if err := n.ns.Do(func(ns.NetNS) error { f(); return nil }); err != nil {
		n.t.Fatal(err)
	}
}

func (n *node) run(stdin string, args ...string) string {
	n.t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", n.name}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		n.t.Fatalf("%v: %v\n%s", args, err, out)
	}
	return string(out)
}

func (n *node) restore(payload string) { n.run(payload, "iptables-restore", "--noflush", "-w") }

// save is the nat table without counters and comments.
func (n *node) save() string {
	var keep []string
	for _, l := range strings.Split(n.run("", "iptables-save", "-t", "nat"), "\n") {
		if !strings.HasPrefix(l, "#") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

func (n *node) conn() *Conn {
	var c *Conn
	var err error
	n.do(func() { c, err = Open() })
	if err != nil {
		n.t.Fatal(err)
	}
	n.t.Cleanup(func() { c.Close() })
	return c
}

const layout = `*nat
:CNI-HOSTPORT-DNAT - [0:0]
:CNI-HOSTPORT-SETMARK - [0:0]
:CNI-HOSTPORT-MASQ - [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A POSTROUTING -m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ
-A CNI-HOSTPORT-SETMARK -m comment --comment "CNI portfwd masquerade mark" -j MARK --set-xmark 0x2000/0x2000
-A CNI-HOSTPORT-MASQ -m mark --mark 0x2000/0x2000 -j MASQUERADE
-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m udp --dport 53 -j DNAT --to-destination 10.244.0.5:53
COMMIT
`

// attachment is the payload portguard's ADD writes: chain, rules, then the jump.
func attachment(owner string, ports string) (chain, payload string) {
	chain = hostport.ChainName(hostport.Owner{Network: "knet", ContainerID: owner})
	var b strings.Builder
	fmt.Fprintf(&b, "*nat\n:%s - [0:0]\n", chain)
	for _, p := range strings.Split(ports, ",") {
		fmt.Fprintf(&b, "-A %s -p tcp --dport %s -s 10.244.0.0/16 -j CNI-HOSTPORT-SETMARK\n", chain, p)
		fmt.Fprintf(&b, "-A %s -p tcp --dport %s -j DNAT --to-destination 10.244.0.9:80\n", chain, p)
	}
	fmt.Fprintf(&b, "-I CNI-HOSTPORT-DNAT 1 -m comment --comment \"dnat name: \\\"knet\\\" id: \\\"%s\\\"\" -m multiport -p tcp --destination-ports %s -j %s\nCOMMIT\n", owner, ports, chain)
	return chain, b.String()
}

func TestKernelRemoveAttachment(t *testing.T) {
	n := newNode(t, layout)
	keepChain, keep := attachment("keep", "8080")
	n.restore(keep)
	before := n.save()
	c := n.conn()
	remove := func(chain string) (done bool) {
		t.Helper()
		var err error
		n.do(func() { done, err = c.RemoveAttachment(hostport.V4, chain) })
		if err != nil {
			t.Fatalf("RemoveAttachment(%s): %v", chain, err)
		}
		return done
	}

	t.Run("written by portguard: found by its handle", func(t *testing.T) {
		chain, p := attachment("pg", "9090,9091")
		n.restore(p)
		if !remove(chain) {
			t.Fatal("declined")
		}
		if got := n.save(); got != before {
			t.Fatalf("table after remove:\n%s\nwant:\n%s", got, before)
		}
	})
	t.Run("written by upstream in many processes: found in CNI-HOSTPORT-DNAT", func(t *testing.T) {
		chain := hostport.ChainName(hostport.Owner{Network: "knet", ContainerID: "up"})
		n.run("", "iptables", "-t", "nat", "-N", chain)
		n.run("", "iptables", "-t", "nat", "-A", chain, "-p", "tcp", "--dport", "7070", "-j", "DNAT", "--to-destination", "10.244.0.7:80")
		n.run("", "iptables", "-t", "nat", "-A", "KUBE-SERVICES", "-d", "10.96.0.11/32", "-j", "RETURN") // takes the next handle
		n.run("", "iptables", "-t", "nat", "-A", "CNI-HOSTPORT-DNAT", "-p", "tcp", "-m", "comment", "--comment", `dnat name: "knet" id: "up"`, "-m", "multiport", "--dports", "7070", "-j", chain)
		n.run("", "iptables", "-t", "nat", "-D", "KUBE-SERVICES", "-d", "10.96.0.11/32", "-j", "RETURN")
		if !remove(chain) {
			t.Fatal("declined")
		}
		if got := n.save(); got != before {
			t.Fatalf("table after remove:\n%s\nwant:\n%s", got, before)
		}
	})
	t.Run("chain absent: nothing to do", func(t *testing.T) {
		if !remove(hostport.ChainName(hostport.Owner{Network: "knet", ContainerID: "never"})) {
			t.Fatal("declined")
		}
		if got := n.save(); got != before {
			t.Fatalf("table changed:\n%s", got)
		}
	})
	t.Run("orphan chain: removed", func(t *testing.T) {
		chain := hostport.ChainName(hostport.Owner{Network: "knet", ContainerID: "orphan"})
		n.restore(fmt.Sprintf("*nat\n:%s - [0:0]\n-A %s -p tcp --dport 6060 -j DNAT --to-destination 10.244.0.6:80\nCOMMIT\n", chain, chain))
		if !remove(chain) {
			t.Fatal("declined")
		}
		if got := n.save(); got != before {
			t.Fatalf("table after remove:\n%s\nwant:\n%s", got, before)
		}
	})
	declines := func(t *testing.T, chain, setup string) {
		t.Helper()
		n.restore(setup)
		mid := n.save()
		if remove(chain) {
			t.Fatal("removed although the chain has another way in")
		}
		if got := n.save(); got != mid {
			t.Fatalf("a declined remove changed the table:\n%s\nwant:\n%s", got, mid)
		}
	}
	t.Run("two jumps: declined, nothing changed", func(t *testing.T) {
		chain, p := attachment("dup", "5050")
		declines(t, chain, p+"*nat\n-A CNI-HOSTPORT-DNAT -p tcp -m multiport --dports 5050 -j "+chain+"\nCOMMIT\n")
		n.restore("*nat\n-D CNI-HOSTPORT-DNAT -p tcp -m multiport --dports 5050 -j " + chain + "\nCOMMIT\n")
		if !remove(chain) {
			t.Fatal("declined after the second jump went")
		}
	})
	t.Run("foreign reference: declined, nothing changed", func(t *testing.T) {
		chain, p := attachment("ref", "4040")
		// The portguard jump's handle is not the guess, and one reference is elsewhere.
		declines(t, chain, p+"*nat\n-D CNI-HOSTPORT-DNAT -m comment --comment \"dnat name: \\\"knet\\\" id: \\\"ref\\\"\" -m multiport -p tcp --destination-ports 4040 -j "+chain+"\n-A KUBE-SERVICES -j "+chain+"\nCOMMIT\n")
		n.restore("*nat\n-D KUBE-SERVICES -j " + chain + "\n-F " + chain + "\n-X " + chain + "\nCOMMIT\n")
	})
	if got := n.save(); got != before || !strings.Contains(got, keepChain) {
		t.Fatalf("table at the end:\n%s\nwant:\n%s", got, before)
	}
}

// recorder is a runner that only records which chains it was asked to list.
type recorder struct {
	iptables.Runner
	listed []string
	inner  iptables.Runner
}

func (r *recorder) List(f hostport.Family, chain string, t *iptables.Table) error {
	r.listed = append(r.listed, chain)
	return r.inner.List(f, chain, t)
}

func TestKernelReaderEqualsIptables(t *testing.T) {
	n := newNode(t, layout)
	for i, ports := range []string{"8080", "9000,9001,9005", "10000:10010,10020"} {
		_, p := attachment(fmt.Sprintf("c%d", i), ports)
		n.restore(p)
	}
	// What upstream writes: -p first, --dports, udp and sctp too.
	n.restore(`*nat
:CNI-DN-aaaaaaaaaaaaaaaaaaaaa - [0:0]
-A CNI-HOSTPORT-DNAT -p udp -m comment --comment "dnat name: \"up\" id: \"u1\"" -m multiport --dports 53 -j CNI-DN-aaaaaaaaaaaaaaaaaaaaa
-A CNI-HOSTPORT-DNAT -p sctp -m comment --comment "dnat name: \"up\" id: \"s\\\"1\"" -m multiport --dports 3868 -j CNI-DN-aaaaaaaaaaaaaaaaaaaaa
COMMIT
`)
	exe := &iptables.Exec{WaitSeconds: 5, Prefix: []string{"ip", "netns", "exec", n.name}}
	want, err := state.Observe(exe, hostport.V4, state.DNATChain)
	if err != nil {
		t.Fatal(err)
	}
	c := n.conn()
	rec := &recorder{inner: exe}
	var got *state.State
	n.do(func() { got, err = state.Observe(&Reader{Runner: rec, Conn: c}, hostport.V4, state.DNATChain) })
	if err != nil {
		t.Fatal(err)
	}
	if len(rec.listed) != 0 {
		t.Fatalf("the reader fell back to iptables for %v", rec.listed)
	}
	if len(want.Jumps) != 5 || !reflect.DeepEqual(got.Jumps, want.Jumps) {
		t.Fatalf("jumps over netlink:\n%#v\nfrom iptables -S:\n%#v", got.Jumps, want.Jumps)
	}

	// A jump with address conditions is decoded too.
	n.restore("*nat\n-A CNI-HOSTPORT-DNAT -d 192.0.2.1/32 -p tcp -m comment --comment \"dnat name: \\\"x\\\" id: \\\"y\\\"\" -m multiport --dports 1234 -j CNI-DN-aaaaaaaaaaaaaaaaaaaaa\nCOMMIT\n")
	want, _ = state.Observe(exe, hostport.V4, state.DNATChain)
	n.do(func() { got, err = state.Observe(&Reader{Runner: rec, Conn: c}, hostport.V4, state.DNATChain) })
	if err != nil || len(rec.listed) != 0 || !reflect.DeepEqual(got.Jumps, want.Jumps) {
		t.Fatalf("with a condition: err %v, fell back for %v, jumps equal %v", err, rec.listed, reflect.DeepEqual(got.Jumps, want.Jumps))
	}
	// A jump with an interface condition is a shape the reader does not know: iptables reads it.
	n.restore("*nat\n-A CNI-HOSTPORT-DNAT -i eth0 -p tcp -m comment --comment \"dnat name: \\\"x\\\" id: \\\"y\\\"\" -m multiport --dports 1234 -j CNI-DN-aaaaaaaaaaaaaaaaaaaaa\nCOMMIT\n")
	want, _ = state.Observe(exe, hostport.V4, state.DNATChain)
	n.do(func() { got, err = state.Observe(&Reader{Runner: rec, Conn: c}, hostport.V4, state.DNATChain) })
	if err != nil || len(rec.listed) != 1 || !reflect.DeepEqual(got.Jumps, want.Jumps) {
		t.Fatalf("with an interface: err %v, fell back for %v, jumps equal %v", err, rec.listed, reflect.DeepEqual(got.Jumps, want.Jumps))
	}

	// A missing chain reads as missing.
	n.run("", "iptables", "-t", "nat", "-F", "CNI-HOSTPORT-DNAT")
	n.run("", "iptables", "-t", "nat", "-F", "PREROUTING")
	n.run("", "iptables", "-t", "nat", "-F", "OUTPUT")
	n.run("", "iptables", "-t", "nat", "-X", "CNI-HOSTPORT-DNAT")
	rec.listed = nil
	n.do(func() { got, err = state.Observe(&Reader{Runner: rec, Conn: c}, hostport.V4, state.DNATChain) })
	if err != nil || len(rec.listed) != 0 || !got.Table.Absent(state.DNATChain) {
		t.Fatalf("missing chain: err %v, fell back for %v, absent %v", err, rec.listed, got.Table.Absent(state.DNATChain))
	}
}

func TestKernelSharedLayout(t *testing.T) {
	n := newNode(t, layout)
	c := n.conn()
	shown := func(masq bool, bit int) bool {
		t.Helper()
		var ok bool
		var err error
		n.do(func() { ok, err = c.SharedLayout(hostport.V4, masq, bit) })
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	if !shown(true, 13) || !shown(false, 13) {
		t.Fatal("the complete layout is not shown")
	}
	if shown(true, 14) {
		t.Fatal("a layout with mark bit 13 is shown for bit 14")
	}
	for _, c := range []struct{ name, remove string }{
		{"MASQ rule", "-D CNI-HOSTPORT-MASQ -m mark --mark 0x2000/0x2000 -j MASQUERADE"},
		{"SETMARK rule", `-D CNI-HOSTPORT-SETMARK -m comment --comment "CNI portfwd masquerade mark" -j MARK --set-xmark 0x2000/0x2000`},
		{"POSTROUTING jump", `-D POSTROUTING -m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ`},
	} {
		n.restore("*nat\n" + c.remove + "\nCOMMIT\n")
		if shown(true, 13) {
			t.Fatalf("shown without the %s", c.name)
		}
		if !shown(false, 13) {
			t.Fatalf("without masquerading, the %s should not matter", c.name)
		}
		n.restore("*nat\n-A" + strings.TrimPrefix(c.remove, "-D") + "\nCOMMIT\n")
		if !shown(true, 13) {
			t.Fatalf("not shown after the %s came back", c.name)
		}
	}
	n.restore("*nat\n-D OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT\nCOMMIT\n")
	if shown(false, 13) {
		t.Fatal("shown without OUTPUT's entry jump")
	}
	n.restore("*nat\n-A OUTPUT -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j CNI-HOSTPORT-DNAT\nCOMMIT\n")
	if shown(false, 13) {
		t.Fatal("an entry jump with another condition is shown as the layout's")
	}
}

// TestKernelUsableGating: netlink stands in for iptables only where every nat rule
// iptables shows is an nf_tables rule.
func TestKernelUsableGating(t *testing.T) {
	n := newNode(t, "")
	nftPath, _ := exec.LookPath("iptables")
	legacy, err := exec.LookPath("iptables-legacy")
	if err != nil {
		t.Skip("iptables-legacy not installed")
	}
	usable := func(paths ...string) (ok bool) {
		n.do(func() { ok = Usable(hostport.V4, paths...) })
		return ok
	}
	if !usable(nftPath) {
		t.Fatal("not usable with iptables-nft and no legacy table")
	}
	if usable(nftPath, legacy) {
		t.Fatal("usable although one of the binaries is iptables-legacy")
	}
	n.run("", "iptables-legacy", "-t", "nat", "-S") // instantiates the legacy nat table here
	if usable(nftPath) {
		t.Fatal("usable although the namespace has a legacy nat table")
	}
	var other bool
	other = Usable(hostport.V4, nftPath) // this thread: the test's own namespace, untouched
	if !other && !hasLegacyNat() {
		t.Fatal("the legacy table of another namespace made this one unusable")
	}
}

func hasLegacyNat() bool {
	b, _ := os.ReadFile("/proc/thread-self/net/ip_tables_names")
	return strings.Contains(string(b), "nat")
}
