package nftcond

import (
	"crypto/rand"
	"encoding/hex"
	"net"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/google/nftables"
	"github.com/google/nftables/expr"

	"github.com/portguard/portguard/pkg/hostport"
)

// The kernel test: two namespaces joined by two veth pairs (A's ina and inb), a rule per
// accepted form with the parsed expressions and a counter, one UDP datagram per probe;
// each rule must count exactly the probes its condition describes, and `nft list` must
// print the condition back in canonical form.

// probe is one datagram to port 9: sent from B to A (counted by A's input chain) or, for
// out probes, from A to B (counted by A's output chain).
type probe struct {
	name     string
	out      bool
	src, dst string
}

var probes = []probe{
	{"p1", false, "10.99.1.2", "10.99.1.1"},
	{"p2", false, "10.99.1.3", "10.99.1.1"}, // marked 0x1234 by A's prerouting
	{"p3", false, "10.99.1.130", "10.99.1.1"},
	{"p4", false, "10.99.2.2", "10.99.2.1"}, // arrives on inb
	{"p5", false, "10.99.1.2", "10.99.1.100"},
	{"q1", false, "fd99:1::2", "fd99:1::1"},
	{"q2", false, "fd99:1::3", "fd99:1::1"}, // marked 0x1234
	{"q3", false, "fd99:1::8002", "fd99:1::1"},
	{"q4", false, "fd99:2::2", "fd99:2::1"}, // arrives on inb
	{"q5", false, "fd99:1::2", "fd99:1::100"},
	{"o1", true, "10.99.1.1", "10.99.1.2"}, // leaves by ina
	{"o2", true, "10.99.2.1", "10.99.2.2"}, // leaves by inb
	{"o3", true, "fd99:1::1", "fd99:1::2"},
	{"o4", true, "fd99:2::1", "fd99:2::2"},
}

type kcase struct {
	f     hostport.Family
	out   bool // in A's output chain (oifname) rather than input
	conds []string
	want  string // the probes it must count, space-separated
}

var kcases = []kcase{
	{hostport.V4, false, []string{"ip", "saddr", "10.99.1.2"}, "p1 p5"},
	{hostport.V4, false, []string{"ip saddr != 10.99.1.2"}, "p2 p3 p4"},
	{hostport.V4, false, []string{"ip saddr 10.99.1.0/25"}, "p1 p2 p5"},
	{hostport.V4, false, []string{"ip saddr != 10.99.1.0/25"}, "p3 p4"},
	{hostport.V4, false, []string{"ip daddr 10.99.2.0/24"}, "p4"},
	{hostport.V4, false, []string{"ip saddr { 10.99.1.3, 10.99.2.0/24 }"}, "p2 p4"},
	{hostport.V4, false, []string{"ip saddr != { 10.99.1.3, 10.99.2.0/24 }"}, "p1 p3 p5"},
	{hostport.V4, false, []string{"ip saddr 10.99.1.2-10.99.1.3"}, "p1 p2 p5"},
	{hostport.V4, false, []string{"ip daddr == 10.99.1.100"}, "p5"},
	{hostport.V4, false, []string{"ip saddr { 10.99.1.0/25, 10.99.1.128/25 }"}, "p1 p2 p3 p5"},
	{hostport.V4, false, []string{"ip saddr { 10.99.1.0/25, 10.99.1.128/26, 10.99.2.2 }"}, "p1 p2 p3 p4 p5"},
	{hostport.V4, false, []string{"ip saddr != { 10.99.1.2/31, 10.99.1.128/26 }"}, "p4"},
	// Matches without an address do not check the family: IPv6 packets count too.
	{hostport.V4, false, []string{"iifname", "inb"}, "p4 q4"},
	{hostport.V4, false, []string{`iifname "in*"`}, "p1 p2 p3 p4 p5 q1 q2 q3 q4 q5"},
	{hostport.V4, false, []string{`iifname != "ina"`}, "p4 q4"},
	{hostport.V6, false, []string{`meta iifname "ina*"`}, "p1 p2 p3 p5 q1 q2 q3 q5"},
	{hostport.V4, false, []string{"meta mark 0x1234"}, "p2 q2"},
	{hostport.V4, false, []string{"meta mark != 0x1234"}, "p1 p3 p4 p5 q1 q3 q4 q5"},
	{hostport.V4, false, []string{"meta mark & 0xff00 == 0x1200"}, "p2 q2"},
	{hostport.V4, false, []string{"meta mark and 0xff00 != 0x1200"}, "p1 p3 p4 p5 q1 q3 q4 q5"},
	{hostport.V4, false, []string{"mark 0", "ip saddr 10.99.1.0/24", "iifname ina"}, "p1 p3 p5"},
	{hostport.V6, false, []string{"ip6 saddr fd99:1::2"}, "q1 q5"},
	{hostport.V6, false, []string{"ip6 saddr != fd99:1::2"}, "q2 q3 q4"},
	{hostport.V6, false, []string{"ip6 saddr fd99:1::/113"}, "q1 q2 q5"},
	{hostport.V6, false, []string{"ip6 daddr fd99:2::/64"}, "q4"},
	{hostport.V6, false, []string{"ip6 saddr { fd99:1::3, fd99:2::/64 }"}, "q2 q4"},
	{hostport.V6, false, []string{"ip6 saddr != { fd99:1::3, fd99:2::/64 }"}, "q1 q3 q5"},
	{hostport.V6, false, []string{"ip6 daddr fd99:1::100"}, "q5"},
	{hostport.V6, false, []string{"ip6 saddr fd99:1::2-fd99:1::3"}, "q1 q2 q5"},
	{hostport.V6, false, []string{"ip6 saddr fd99:1::/64", "ip6 daddr != fd99:1::100", "meta mark 0"}, "q1 q3"},
	{hostport.V4, true, []string{"oifname inb"}, "o2 o4"},
	{hostport.V4, true, []string{`oifname != "inb"`}, "o1 o3"},
	{hostport.V6, true, []string{`oifname "in*"`}, "o1 o2 o3 o4"},
	{hostport.V4, true, []string{"ip daddr 10.99.2.2", "oifname inb"}, "o2"},
}

func randHex() string {
	b := make([]byte, 4)
	rand.Read(b)
	return hex.EncodeToString(b)
}

type netns struct {
	name string
	ns   ns.NetNS
}

func newNetns(t *testing.T, name string) *netns {
	t.Helper()
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v %s", name, err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	h, err := ns.GetNS("/var/run/netns/" + name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return &netns{name: name, ns: h}
}

func (n *netns) run(t *testing.T, stdin string, args ...string) string {
	t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", n.name}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v: %v\n%s", n.name, args, err, out)
	}
	return string(out)
}

// send sends one datagram from src to dst:9 inside the namespace.
func (n *netns) send(t *testing.T, src, dst string) {
	t.Helper()
	err := n.ns.Do(func(ns.NetNS) error {
		c, err := net.DialUDP("udp", &net.UDPAddr{IP: net.ParseIP(src)}, &net.UDPAddr{IP: net.ParseIP(dst), Port: 9})
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write([]byte("pgcond"))
		return err
	})
	if err != nil {
		t.Fatalf("send %s -> %s: %v", src, dst, err)
	}
}

// counters returns the packet counts of a chain's rules, in order.
func counters(t *testing.T, c *nftables.Conn, tab *nftables.Table, chain string) []uint64 {
	t.Helper()
	rules, err := c.GetRules(tab, &nftables.Chain{Name: chain, Table: tab})
	if err != nil {
		t.Fatalf("list %s: %v", chain, err)
	}
	var out []uint64
	for _, r := range rules {
		for _, e := range r.Exprs {
			if ctr, ok := e.(*expr.Counter); ok {
				out = append(out, ctr.Packets)
			}
		}
	}
	return out
}

func TestKernelConditions(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces")
	}
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("nft not installed (used to list the rules back)")
	}
	id := randHex()
	a := newNetns(t, "pgcond-"+id+"-a")
	b := newNetns(t, "pgcond-"+id+"-b")
	for _, pair := range [][2]string{{"ina", "outa"}, {"inb", "outb"}} {
		a.run(t, "", "ip", "link", "add", pair[0], "type", "veth", "peer", "name", pair[1], "netns", b.name)
	}
	for _, x := range []struct {
		n     *netns
		dev   string
		addrs []string
	}{
		{a, "ina", []string{"10.99.1.1/24", "10.99.1.100/24", "fd99:1::1/64", "fd99:1::100/64"}},
		{a, "inb", []string{"10.99.2.1/24", "fd99:2::1/64"}},
		{b, "outa", []string{"10.99.1.2/24", "10.99.1.3/24", "10.99.1.130/24", "fd99:1::2/64", "fd99:1::3/64", "fd99:1::8002/64"}},
		{b, "outb", []string{"10.99.2.2/24", "fd99:2::2/64"}},
	} {
		for _, addr := range x.addrs {
			args := []string{"ip", "addr", "add", addr, "dev", x.dev}
			if strings.Contains(addr, ":") {
				args = append(args, "nodad")
			}
			x.n.run(t, "", args...)
		}
		x.n.run(t, "", "ip", "link", "set", x.dev, "up")
	}
	// Scaffolding in nft text (not under test): marks, and base chains that send only
	// the probes (UDP to port 9, not neighbour discovery) to the chains under test.
	a.run(t, `table inet pgcond {
	chain pre { type filter hook prerouting priority -150; ip saddr 10.99.1.3 meta mark set 0x1234; ip6 saddr fd99:1::3 meta mark set 0x1234; }
	chain in { type filter hook input priority 0; udp dport 9 counter jump probe_in; }
	chain out { type filter hook output priority 0; udp dport 9 counter jump probe_out; }
	chain probe_in { }
	chain probe_out { }
}
`, "nft", "-f", "-")

	c, err := nftables.New(nftables.WithNetNSFd(int(a.ns.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseLasting()
	tab := &nftables.Table{Name: "pgcond", Family: nftables.TableFamilyINet}
	var inCases, outCases []int
	canon := map[int]string{}
	for i, k := range kcases {
		field := map[hostport.Family]string{hostport.V4: "conditionsV4", hostport.V6: "conditionsV6"}[k.f]
		cond, err := Parse(field, k.f, k.conds)
		if err != nil {
			t.Fatalf("%q: %v", k.conds, err)
		}
		canon[i] = cond.String()
		exprs, err := cond.Exprs(tab, c)
		if err != nil {
			t.Fatalf("%q: %v", k.conds, err)
		}
		chain := "probe_in"
		if k.out {
			chain, outCases = "probe_out", append(outCases, i)
		} else {
			inCases = append(inCases, i)
		}
		c.AddRule(&nftables.Rule{Table: tab, Chain: &nftables.Chain{Name: chain, Table: tab}, Exprs: append(exprs, &expr.Counter{})})
	}
	if err := c.Flush(); err != nil {
		t.Fatalf("adding the rules: %v", err)
	}

	// nft prints every condition back as String renders it.
	counterRe := regexp.MustCompile(` counter packets \d+ bytes \d+$`)
	for chain, cases := range map[string][]int{"probe_in": inCases, "probe_out": outCases} {
		var got []string
		for _, line := range strings.Split(a.run(t, "", "nft", "list", "chain", "inet", "pgcond", chain), "\n") {
			line = strings.TrimSpace(line)
			if counterRe.MatchString(line) {
				got = append(got, strings.Join(strings.Fields(counterRe.ReplaceAllString(line, "")), " "))
			}
		}
		if len(got) != len(cases) {
			t.Fatalf("%s: nft lists %d rules, want %d:\n%s", chain, len(got), len(cases), strings.Join(got, "\n"))
		}
		for j, i := range cases {
			if got[j] != canon[i] {
				t.Errorf("%q: nft lists %q, String gives %q", kcases[i].conds, got[j], canon[i])
			}
		}
	}

	// One datagram per probe; a rule's counter rises exactly for the probes it describes.
	matched := map[int][]string{}
	for _, p := range probes {
		from, base, chain, cases := b, "in", "probe_in", inCases
		if p.out {
			from, base, chain, cases = a, "out", "probe_out", outCases
		}
		before := counters(t, c, tab, chain)
		seen := counters(t, c, tab, base)[0]
		from.send(t, p.src, p.dst)
		deadline := time.Now().Add(5 * time.Second)
		for counters(t, c, tab, base)[0] == seen {
			if time.Now().After(deadline) {
				t.Fatalf("probe %s (%s -> %s) never reached A's %s chain", p.name, p.src, p.dst, base)
			}
			time.Sleep(10 * time.Millisecond)
		}
		after := counters(t, c, tab, chain)
		for j, i := range cases {
			switch d := after[j] - before[j]; d {
			case 0:
			case 1:
				matched[i] = append(matched[i], p.name)
			default:
				t.Fatalf("probe %s: rule %q counted %d packets", p.name, kcases[i].conds, d)
			}
		}
	}
	for i, k := range kcases {
		want := strings.Fields(k.want)
		if !slices.Equal(matched[i], want) {
			t.Errorf("%s %q (%s): matched %v, want %v", k.f, k.conds, canon[i], matched[i], want)
		}
	}
	if t.Failed() {
		t.Logf("A's table:\n%s", a.run(t, "", "nft", "list", "table", "inet", "pgcond"))
	}
}
