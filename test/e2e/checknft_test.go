package e2e

import (
	"fmt"
	"strings"
	"testing"

	tb "github.com/portguard/portguard/test/testbed"
)

// TestCheckWithoutProcessOnNft: on the nf_tables backend CHECK of an intact attachment
// starts no iptables process in either family (it reads over netlink), and it still fails
// for each piece removed behind its back (a rule of the attachment's chain, a jump, the
// chain, each rule of the shared layout) and for another claim that shadows or
// duplicates it; put back, CHECK passes again without a process.
func TestCheckWithoutProcessOnNft(t *testing.T) {
	t.Parallel()
	b, n := pgBed(t)
	if v, _ := b.Exec(b.Node, "iptables", "-V"); !strings.Contains(v, "nf_tables") {
		t.Skip("iptables here is not the nf_tables backend: " + v)
	}
	other := b.NewPod("other")
	n.MustAdd(other, tb.TCP(8300, 80))
	p := b.NewPod("checked")
	n.MustAdd(p, tb.TCP(8301, 80), tb.UDP(8302, 81))
	p.Serve(80)
	for _, f := range families {
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8301, "checked")
	}
	chain := p.Chain(n)

	passes := func(when string) {
		t.Helper()
		b.ResetShim()
		if err := n.Check(p); err != nil {
			t.Fatalf("CHECK %s: %v", when, err)
		}
		if calls := b.ShimCalls(); len(calls) != 0 {
			t.Errorf("CHECK %s started %d iptables processes, want none:\n%s", when, len(calls), strings.Join(calls, "\n"))
		}
	}
	passes("right after ADD")

	// rule finds the one rule of chain in family f containing all of parts.
	rule := func(f tb.Family, chain string, parts ...string) string {
		t.Helper()
		var found []string
	next:
		for _, r := range b.NAT(f).Rules[chain] {
			for _, p := range parts {
				if !strings.Contains(r, p) {
					continue next
				}
			}
			found = append(found, r)
		}
		if len(found) != 1 {
			t.Fatalf("%s: %d rules of %s contain %q: %q", f, len(found), chain, parts, found)
		}
		return found[0]
	}
	del := func(r string) string { return "-D" + strings.TrimPrefix(r, "-A") }
	podNet := map[tb.Family]string{tb.V4: "-s 198.19.", tb.V6: "-s fd00:"} // the bed's pod subnets

	type piece struct {
		name           string
		remove, revert string // payload bodies
		want           string // in CHECK's error
	}
	for _, f := range families {
		var ps []piece
		removed := func(name, want, chain string, parts ...string) {
			r := rule(f, chain, parts...)
			ps = append(ps, piece{name, del(r), r, want})
		}
		removed("DNAT rule", "rule missing in "+chain, chain, "--dport 8301", "DNAT")
		removed("hairpin mark rule", "rule missing in "+chain, chain, "--dport 8302", podNet[f])
		if f == tb.V4 {
			removed("localhost mark rule", "rule missing in "+chain, chain, "--dport 8301", "127.0.0.1")
		}
		removed("udp jump", "jump rule missing", "CNI-HOSTPORT-DNAT", "-p udp", chain)
		removed("PREROUTING entry jump", "PREROUTING", "PREROUTING", "CNI-HOSTPORT-DNAT")
		removed("OUTPUT entry jump", "OUTPUT", "OUTPUT", "CNI-HOSTPORT-DNAT")
		removed("POSTROUTING jump", "POSTROUTING", "POSTROUTING", "CNI-HOSTPORT-MASQ")
		removed("SETMARK rule", "CNI-HOSTPORT-SETMARK", "CNI-HOSTPORT-SETMARK", "MARK")
		removed("MASQ rule", "MASQUERADE", "CNI-HOSTPORT-MASQ", "MASQUERADE")
		whole := b.NAT(f).Rules[chain]
		tcpJump := rule(f, "CNI-HOSTPORT-DNAT", "-p tcp", chain)
		udpJump := rule(f, "CNI-HOSTPORT-DNAT", "-p udp", chain)
		ps = append(ps, piece{"the chain and its jumps",
			del(tcpJump) + "\n" + del(udpJump) + "\n-F " + chain + "\n-X " + chain,
			":" + chain + " - [0:0]\n" + strings.Join(whole, "\n") + "\n" + tcpJump + "\n" + udpJump, "jump rule missing"})
		claim := func(op string) string {
			return fmt.Sprintf("%s CNI-HOSTPORT-DNAT -p tcp -m comment --comment \"dnat name: \\\"%s\\\" id: \\\"intruder\\\"\" -m multiport --dports 8301 -j CNI-DN-intruder", op, n.Name)
		}
		ps = append(ps,
			piece{"a claim before it", ":CNI-DN-intruder - [0:0]\n" + strings.Replace(claim("-I"), "-I CNI-HOSTPORT-DNAT", "-I CNI-HOSTPORT-DNAT 1", 1),
				claim("-D") + "\n-X CNI-DN-intruder", "is shadowed by"},
			piece{"a claim after it", ":CNI-DN-intruder - [0:0]\n" + claim("-A"), claim("-D") + "\n-X CNI-DN-intruder", "is duplicated by"},
			piece{"a second copy of its jump", tcpJump, del(tcpJump), "jump rules enter"},
			piece{"a foreign rule on its port", "-I CNI-HOSTPORT-DNAT 1 -p tcp -m tcp --dport 8301 -j RETURN", "-D CNI-HOSTPORT-DNAT -p tcp -m tcp --dport 8301 -j RETURN", "is shadowed by"},
		)
		for _, pc := range ps {
			b.MustRestoreNAT(f, pc.remove)
			err := n.Check(p)
			if err == nil || !strings.Contains(err.Error(), pc.want) {
				t.Errorf("%s: CHECK with %s changed: %v (want an error naming %q)", f, pc.name, err, pc.want)
			}
			b.MustRestoreNAT(f, pc.revert)
			passes(fmt.Sprintf("after restoring %s: %s", f, pc.name))
		}
	}
	n.MustDel(p)
	n.MustDel(other)
	expectClean(t, b)
}

// TestCheckConfigsWithoutProcessOnNft: for the configuration keys that shape the rules
// (snat off, masqAll, externalSetMarkChain, markMasqBit, hostIP in either family, udp,
// sctp, more than 15 ports, address conditions), CHECK right after ADD passes on
// nf_tables without starting a process, and still fails once the attachment's DNAT rule
// is gone from the family it serves.
func TestCheckConfigsWithoutProcessOnNft(t *testing.T) {
	t.Parallel()
	b := tb.New(t)
	if v, _ := b.Exec(b.Node, "iptables", "-V"); !strings.Contains(v, "nf_tables") {
		t.Skip("iptables here is not the nf_tables backend: " + v)
	}
	for _, f := range families {
		b.MustRestoreNAT(f, ":OPERATOR-MARK - [0:0]")
	}
	var many []tb.PortMapping
	for i := 0; i < 17; i++ {
		many = append(many, tb.TCP(9500+i, 80))
	}
	cases := []struct {
		name     string
		conf     map[string]any
		mappings []tb.PortMapping
		dnat     map[tb.Family]string // a piece of the DNAT rule to remove, per family it exists in
		// neighbour's claims are ADDed before, by another pod of the network: CHECK reads
		// its chain (host IPs decide whether it conflicts), over netlink too.
		neighbour []tb.PortMapping
	}{
		{"snat off", map[string]any{"snat": false}, []tb.PortMapping{tb.TCP(9401, 80)}, nil, nil},
		{"masqAll", map[string]any{"masqAll": true}, []tb.PortMapping{tb.TCP(9402, 80)}, nil, nil},
		{"externalSetMarkChain", map[string]any{"externalSetMarkChain": "OPERATOR-MARK"}, []tb.PortMapping{tb.TCP(9403, 80)}, nil, nil},
		{"markMasqBit 14", map[string]any{"markMasqBit": 14}, []tb.PortMapping{tb.TCP(9404, 80)}, nil, nil},
		{"hostIP v4", nil, []tb.PortMapping{tb.TCP(9405, 80).On(b.NodeIP(tb.V4).String())}, map[tb.Family]string{tb.V4: "-d " + b.NodeIP(tb.V4).String()},
			[]tb.PortMapping{tb.TCP(9405, 80).On(b.NodeIPAlt(tb.V4).String())}},
		{"hostIP v6", nil, []tb.PortMapping{tb.TCP(9406, 80).On(b.NodeIP(tb.V6).String())}, map[tb.Family]string{tb.V6: "-d " + b.NodeIP(tb.V6).String()}, nil},
		{"udp and sctp", nil, []tb.PortMapping{tb.UDP(9407, 80), {HostPort: 9408, ContainerPort: 80, Protocol: "sctp"}}, map[tb.Family]string{tb.V4: "--dport 9408", tb.V6: "--dport 9407"}, nil},
		{"17 ports", nil, many, map[tb.Family]string{tb.V4: "--dport 9516", tb.V6: "--dport 9500"}, nil},
		{"conditions", map[string]any{"conditionsV4": []string{"-d", b.NodeIP(tb.V4).String() + "/32", "!", "--source", "10.0.0.0/8"},
			"conditionsV6": []string{"-d", b.NodeIP(tb.V6).String()}}, []tb.PortMapping{tb.TCP(9409, 80)}, nil, nil},
	}
	for i, c := range cases {
		n := b.Network(tb.NetConfig{PortPlugin: "portguard", PortConf: c.conf, Bridge: fmt.Sprintf("pgcheck%d", i)})
		var nb *tb.Pod
		if c.neighbour != nil {
			nb = b.NewPod("")
			n.MustAdd(nb, c.neighbour...)
		}
		p := b.NewPod("")
		n.MustAdd(p, c.mappings...)
		b.ResetShim()
		if err := n.Check(p); err != nil {
			t.Errorf("%s: CHECK right after ADD: %v", c.name, err)
		}
		if calls := b.ShimCalls(); len(calls) != 0 {
			t.Errorf("%s: CHECK started %d iptables processes, want none:\n%s", c.name, len(calls), strings.Join(calls, "\n"))
		}
		dnat := c.dnat
		if dnat == nil {
			dnat = map[tb.Family]string{tb.V4: "--dport", tb.V6: "--dport"}
		}
		for f, piece := range dnat {
			var gone string
			for _, r := range b.NAT(f).Rules[p.Chain(n)] {
				if strings.Contains(r, "-j DNAT") && strings.Contains(r, piece) {
					gone = r
					break
				}
			}
			if gone == "" {
				t.Fatalf("%s: %s: no DNAT rule with %q in %v", c.name, f, piece, b.NAT(f).Rules[p.Chain(n)])
			}
			b.MustRestoreNAT(f, "-D"+strings.TrimPrefix(gone, "-A"))
			if err := n.Check(p); err == nil {
				t.Errorf("%s: %s: CHECK passed without %s", c.name, f, gone)
			}
			b.MustRestoreNAT(f, gone)
		}
		n.MustDel(p)
		if nb != nil {
			n.MustDel(nb)
		}
	}
	expectClean(t, b)
}
