package e2e

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	tb "github.com/portguard/portguard/test/testbed"
)

// checkRow is one configuration ADD accepts: conditions in some spelling or one of the
// plugin's keys, and the mappings it gets.
type checkRow struct {
	name string
	// conf gives the plugin's extra keys for a bed (conditions name the bed's addresses).
	conf     func(b *tb.Bed) map[string]any
	mappings func(b *tb.Bed) []tb.PortMapping
	// jumps is how many kernel rules enter the attachment's chain per family: iptables
	// makes one per address pair of a list, and one per 15 ports of a protocol.
	jumps map[tb.Family]int
	// setup runs in the node before the ADD (e.g. the operator's mark chain).
	setup func(b *tb.Bed)
	// ownMarks: snat with portguard's CNI-HOSTPORT-SETMARK/MASQ, whose rules CHECK asserts.
	ownMarks bool
	markBit  int
	// shared: also break the shared layout (entry jump; with ownMarks SETMARK, MASQ and
	// POSTROUTING's jump), which the conditions do not change: only the rows of the keys
	// that decide it.
	shared bool
}

func tcp8080(*tb.Bed) []tb.PortMapping { return []tb.PortMapping{tb.TCP(8080, 80)} }

func both(n int) map[tb.Family]int { return map[tb.Family]int{tb.V4: n, tb.V6: n} }

func conds(v4, v6 []string) func(*tb.Bed) map[string]any {
	return func(*tb.Bed) map[string]any { return map[string]any{"conditionsV4": v4, "conditionsV6": v6} }
}

func ports(proto string, from, n int) []tb.PortMapping {
	var out []tb.PortMapping
	for p := from; p < from+n; p++ {
		out = append(out, tb.PortMapping{HostPort: p, ContainerPort: 80, Protocol: proto})
	}
	return out
}

// checkRows lists every conditions spelling the config accepts and every key.
func checkRows() []checkRow {
	none := func(*tb.Bed) map[string]any { return nil }
	return []checkRow{
		{name: "defaults", conf: none, mappings: tcp8080, jumps: both(1), ownMarks: true, shared: true},
		{name: "dst-list", conf: func(b *tb.Bed) map[string]any {
			return map[string]any{
				"conditionsV4": []string{"-d", "192.0.2.1/32,127.0.0.1/32"},
				"conditionsV6": []string{"-d", b.NodeIP6.String() + "/128,::1/128"},
			}
		}, mappings: tcp8080, jumps: both(2), ownMarks: true},
		{name: "src-list", conf: func(b *tb.Bed) map[string]any {
			return map[string]any{
				"conditionsV4": []string{"-s", b.ClientIP4.String() + ",203.0.113.0/24,198.51.100.7"},
				"conditionsV6": []string{"--source", b.ClientIP6.String() + ",2001:db8::/32"},
			}
		}, mappings: tcp8080, jumps: map[tb.Family]int{tb.V4: 3, tb.V6: 2}, ownMarks: true},
		{name: "src-x-dst-list", conf: conds(
			[]string{"--src", "203.0.113.0/24,198.51.100.7/32", "--dst", "192.0.2.1,192.0.2.2"},
			[]string{"-s", "2001:db8::/32,2001:db8:1::1", "-d", "fd00::1,fd00::2,fd00::3"}),
			mappings: tcp8080, jumps: map[tb.Family]int{tb.V4: 4, tb.V6: 6}, ownMarks: true},
		{name: "negation", conf: conds([]string{"!", "-d", "192.0.2.0/24"}, []string{"!", "--destination", "2001:db8::/32"}),
			mappings: tcp8080, jumps: both(1), ownMarks: true},
		{name: "long-options", conf: func(b *tb.Bed) map[string]any {
			return map[string]any{
				"conditionsV4": []string{"--destination", b.NodeIP4.String() + "/24", "!", "--source", "192.0.2.0/24", "--match", "addrtype", "--dst-type", "LOCAL"},
				"conditionsV6": []string{"--dst", b.NodeIP6.String(), "--sr", "fd00::/8,::1"},
			}
		}, mappings: tcp8080, jumps: map[tb.Family]int{tb.V4: 1, tb.V6: 2}, ownMarks: true},
		{name: "iprange", conf: func(b *tb.Bed) map[string]any {
			return map[string]any{
				"conditionsV4": []string{"-m", "iprange", "--dst-range", b.NodeIP4.String() + "-" + b.NodeIP4Alt.String()},
				"conditionsV6": []string{"-m", "iprange", "!", "--src-range", "2001:db8::1-2001:db8::ff"},
			}
		}, mappings: tcp8080, jumps: both(1), ownMarks: true},
		{name: "several-matches", conf: conds(
			[]string{"-m", "addrtype", "--dst-type", "LOCAL", "!", "-s", "192.0.2.0/24", "-m", "iprange", "--src-range", "198.18.0.0-198.19.255.255"},
			[]string{"-m", "addrtype", "--dst-type", "LOCAL", "-s", "fd00::/8,::1"}),
			mappings: tcp8080, jumps: map[tb.Family]int{tb.V4: 1, tb.V6: 2}, ownMarks: true},
		{name: "comment", conf: conds(
			[]string{"-m", "comment", "--comment", "operator: -d 1.2.3.4,5.6.7.8", "-d", "192.0.2.1,127.0.0.1"},
			[]string{"-m", "comment", "--comment", "operator note"}),
			mappings: tcp8080, jumps: map[tb.Family]int{tb.V4: 2, tb.V6: 1}, ownMarks: true},
		{name: "snat-false", conf: func(*tb.Bed) map[string]any { return map[string]any{"snat": false} },
			mappings: tcp8080, jumps: both(1), shared: true},
		{name: "masqAll", conf: func(*tb.Bed) map[string]any { return map[string]any{"masqAll": true} },
			mappings: tcp8080, jumps: both(1), ownMarks: true, shared: true},
		{name: "externalSetMarkChain", conf: func(*tb.Bed) map[string]any {
			return map[string]any{"externalSetMarkChain": "PG-EXT-MARK"}
		}, setup: externalMarkChain, mappings: tcp8080, jumps: both(1), shared: true},
		{name: "markMasqBit-5", conf: func(*tb.Bed) map[string]any { return map[string]any{"markMasqBit": 5} },
			mappings: tcp8080, jumps: both(1), ownMarks: true, markBit: 5, shared: true},
		{name: "hostIP-v4", conf: none, mappings: func(b *tb.Bed) []tb.PortMapping {
			return []tb.PortMapping{tb.TCP(8080, 80).On(b.NodeIP4.String())}
		}, jumps: map[tb.Family]int{tb.V4: 1}, ownMarks: true},
		{name: "hostIP-v6", conf: none, mappings: func(b *tb.Bed) []tb.PortMapping {
			return []tb.PortMapping{tb.TCP(8080, 80).On(b.NodeIP6.String())}
		}, jumps: map[tb.Family]int{tb.V6: 1}, ownMarks: true},
		{name: "hostIP-0.0.0.0", conf: none, mappings: func(*tb.Bed) []tb.PortMapping {
			return []tb.PortMapping{tb.TCP(8080, 80).On("0.0.0.0")}
		}, jumps: map[tb.Family]int{tb.V4: 1}, ownMarks: true},
		{name: "hostIP-::", conf: none, mappings: func(*tb.Bed) []tb.PortMapping {
			return []tb.PortMapping{tb.TCP(8080, 80).On("::")}
		}, jumps: map[tb.Family]int{tb.V6: 1}, ownMarks: true},
		{name: "udp", conf: none, mappings: func(*tb.Bed) []tb.PortMapping { return []tb.PortMapping{tb.UDP(8080, 80)} },
			jumps: both(1), ownMarks: true},
		{name: "sctp", conf: none, mappings: func(*tb.Bed) []tb.PortMapping { return ports("sctp", 8080, 1) },
			jumps: both(1), ownMarks: true},
		{name: "tcp+udp+sctp", conf: none, mappings: func(*tb.Bed) []tb.PortMapping {
			return append(append(ports("tcp", 8080, 2), ports("udp", 8080, 2)...), ports("sctp", 8080, 1)...)
		}, jumps: both(3), ownMarks: true},
		{name: "20-ports", conf: none, mappings: func(*tb.Bed) []tb.PortMapping { return ports("tcp", 9100, 20) },
			jumps: both(2), ownMarks: true},
		{name: "20-ports-dst-list", conf: conds([]string{"-d", "192.0.2.1,192.0.2.2,192.0.2.3"}, nil),
			mappings: func(*tb.Bed) []tb.PortMapping { return append(ports("tcp", 9100, 20), ports("udp", 9100, 16)...) },
			jumps:    map[tb.Family]int{tb.V4: 12, tb.V6: 4}, ownMarks: true},
	}
}

// externalMarkChain creates the operator's mark chain (as kube-proxy's KUBE-MARK-MASQ with
// its POSTROUTING masquerade) in both families.
func externalMarkChain(b *tb.Bed) {
	for _, f := range families {
		b.MustRestoreNAT(f, ":PG-EXT-MARK - [0:0]\n:PG-EXT-POST - [0:0]\n"+
			"-A PG-EXT-MARK -j MARK --set-xmark 0x4000/0x4000\n"+
			"-A POSTROUTING -j PG-EXT-POST\n"+
			"-A PG-EXT-POST -m mark --mark 0x4000/0x4000 -j MASQUERADE")
	}
}

// TestCheckMatrix: for every accepted configuration, CHECK passes right after ADD and
// fails, naming the problem, for each thing broken behind its back: one of the kernel
// jumps (for an address list, one of the rules iptables made of it), a rule of the
// attachment's chain, a foreign jump into the chain, an entry jump, and portguard's mark
// and MASQUERADE rules. Between breaks a re-ADD repairs the attachment and must leave
// exactly the kernel rules it should (no expanded jump left behind); DEL removes them all.
func TestCheckMatrix(t *testing.T) {
	t.Parallel()
	for _, row := range checkRows() {
		t.Run(row.name, func(t *testing.T) {
			t.Parallel()
			runCheckRow(t, row)
		})
	}
}

func runCheckRow(t *testing.T, row checkRow) {
	b := tb.New(t)
	n := b.Network(tb.NetConfig{PortPlugin: "portguard", PortConf: row.conf(b)})
	if row.setup != nil {
		row.setup(b)
	}
	p := b.NewPod("P")
	maps := row.mappings(b)
	added := n.MustAdd(p, maps...)
	chain := p.Chain(n)
	// call runs portguard alone for the attachment, as the runtime's chain would after
	// bridge (cnitool would re-run bridge, whose ADD refuses an existing veth).
	call := func(verb string) error {
		t.Helper()
		conf := map[string]any{"cniVersion": tb.DefaultCNIVersion, "name": n.Name, "type": "portguard",
			"runtimeConfig": map[string]any{"portMappings": maps}, "prevResult": json.RawMessage(added.Stdout)}
		for k, v := range row.conf(b) {
			conf[k] = v
		}
		stdin, err := json.Marshal(conf)
		if err != nil {
			t.Fatal(err)
		}
		_, err = b.PluginCall("portguard", verb, stdin, "CNI_CONTAINERID="+p.ContainerID, "CNI_NETNS="+p.Path)
		return err
	}
	var fams []tb.Family
	for _, f := range families {
		if row.jumps[f] > 0 {
			fams = append(fams, f)
		}
	}
	first, last := fams[0], fams[len(fams)-1]

	// verify: CHECK passes and each family holds exactly the kernel jumps it should.
	verify := func(stage string) {
		t.Helper()
		if err := call("CHECK"); err != nil {
			t.Errorf("%s: CHECK fails: %v", stage, err)
		}
		for _, f := range families {
			if got := jumpsTo(b, f, chain); len(got) != row.jumps[f] {
				t.Errorf("%s: %s: %d jumps enter %s, want %d: %v", stage, f, len(got), chain, row.jumps[f], got)
			}
		}
	}
	if err := n.Check(p); err != nil {
		t.Errorf("the runtime's CHECK right after ADD fails: %v", err)
	}
	verify("right after ADD")
	if row.markBit != 0 {
		mark := fmt.Sprintf("0x%x/0x%x", 1<<row.markBit, 1<<row.markBit)
		for _, f := range fams {
			st := b.NAT(f)
			if r := st.Rules["CNI-HOSTPORT-MASQ"]; len(r) != 1 || !strings.Contains(r[0], "--mark "+mark) {
				t.Errorf("%s: CNI-HOSTPORT-MASQ does not use mark bit %d (%s): %v", f, row.markBit, mark, r)
			}
		}
	}

	del := func(f tb.Family, rule string) {
		t.Helper()
		if rule == "" {
			t.Fatalf("%s: nothing to break (rule not found)", f)
		}
		b.MustRestoreNAT(f, "-D"+strings.TrimPrefix(rule, "-A"))
	}
	find := func(f tb.Family, chain, part string) string {
		for _, r := range b.NAT(f).Rules[chain] {
			if strings.Contains(r, part) {
				return r
			}
		}
		return ""
	}
	type breakage struct {
		what, want string // what is removed; what CHECK must then say
		do         func()
	}
	breaks := []breakage{
		{"the last kernel jump", "jump rule missing in CNI-HOSTPORT-DNAT", func() {
			js := jumpsTo(b, first, chain)
			del(first, js[len(js)-1])
		}},
		{"the chain's last rule", "rule missing in " + chain, func() {
			rs := b.NAT(last).Rules[chain]
			del(last, rs[len(rs)-1])
		}},
		{"a foreign jump into the chain", "jump rules enter " + chain, func() {
			b.MustRestoreNAT(first, "-A CNI-HOSTPORT-DNAT -p tcp -m tcp --dport 1 -j "+chain)
		}},
	}
	if row.shared {
		breaks = append(breaks, breakage{"OUTPUT's entry jump", "entry jump from OUTPUT", func() {
			del(last, find(last, "OUTPUT", "-j CNI-HOSTPORT-DNAT"))
		}})
	}
	if row.shared && row.ownMarks {
		breaks = append(breaks,
			breakage{"the MASQUERADE rule", "lacks its MASQUERADE rule", func() {
				del(last, find(last, "CNI-HOSTPORT-MASQ", "MASQUERADE"))
			}},
			breakage{"the mark rule", "lacks its mark rule", func() {
				del(first, find(first, "CNI-HOSTPORT-SETMARK", "MARK"))
			}},
			breakage{"POSTROUTING's jump", "POSTROUTING jump", func() {
				del(first, find(first, "POSTROUTING", "-j CNI-HOSTPORT-MASQ"))
			}})
	}
	for _, br := range breaks {
		br.do()
		if err := call("CHECK"); err == nil {
			t.Errorf("CHECK passed with %s removed", br.what)
		} else if !strings.Contains(err.Error(), br.want) {
			t.Errorf("CHECK with %s removed: %v; want it to say %q", br.what, err, br.want)
		}
		if err := call("ADD"); err != nil {
			t.Fatalf("re-ADD after breaking %s: %v", br.what, err)
		}
		verify("re-ADD after breaking " + br.what)
	}
	n.MustDel(p)
	expectClean(t, b)
}
