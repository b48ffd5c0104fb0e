package e2e

import (
	"errors"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	tb "github.com/portguard/portguard/test/testbed"
)

// Packet-level tests of what each configuration key does. Where the behaviour is
// upstream's, the same scenario runs against upstream portmap v1.10.0 too, so the
// expectation is checked against the plugin portguard replaces, not only written down.

// bothPlugins runs scenario as a parallel subtest for portguard and for upstream portmap.
func bothPlugins(t *testing.T, scenario func(t *testing.T, plugin string)) {
	for _, plugin := range []string{"portguard", "portmap"} {
		t.Run(plugin, func(t *testing.T) {
			t.Parallel()
			scenario(t, plugin)
		})
	}
}

// flavour is a port-mapping plugin with one of its backends.
type flavour struct {
	plugin  string // "portguard" or "portmap" (upstream v1.10.0)
	backend string // "" (iptables, the default on this machine) or "nftables"
}

func (f flavour) String() string {
	if f.backend == "" {
		return f.plugin
	}
	return f.plugin + "-" + f.backend
}

// nft: the flavour writes nftables (portguard's inet table, upstream's ip/ip6 cni_hostport).
func (f flavour) nft() bool { return f.backend == "nftables" }

// net is the flavour's network with extra plugin keys.
func (f flavour) net(b *tb.Bed, conf map[string]any) *tb.Network {
	pc := map[string]any{}
	for k, v := range conf {
		pc[k] = v
	}
	if f.backend != "" {
		pc["backend"] = f.backend
	}
	return b.Network(tb.NetConfig{PortPlugin: f.plugin, PortConf: pc})
}

// everyBackend runs scenario as a parallel subtest for portguard and upstream portmap, each
// on the iptables and on the nftables backend: the keys whose meaning is the same on both
// backends are checked on all four, each against the plugin it replaces.
func everyBackend(t *testing.T, scenario func(t *testing.T, fl flavour)) {
	for _, backend := range []string{"", "nftables"} {
		for _, plugin := range []string{"portguard", "portmap"} {
			fl := flavour{plugin, backend}
			t.Run(fl.String(), func(t *testing.T) {
				t.Parallel()
				scenario(t, fl)
			})
		}
	}
}

// expectNoIPTables asserts that a flavour on the nftables backend wrote no CNI chain into
// iptables (portguard: nothing of its own outside its table).
func expectNoIPTables(t *testing.T, b *tb.Bed) {
	t.Helper()
	for _, f := range families {
		if d := b.NAT(f).DNChains(); len(d) != 0 {
			t.Errorf("%s: iptables CNI-DN chains %v on the nftables backend", f, d)
		}
	}
}

// nftSetElems is the element part of `nft list set inet portguard <set>` ("" when empty).
func nftSetElems(t *testing.T, b *tb.Bed, set string) string {
	t.Helper()
	out := b.MustExec(b.Node, "nft", "list", "set", "inet", "portguard", set)
	if _, elems, ok := strings.Cut(out, "elements = "); ok {
		return elems
	}
	return ""
}

// gateway is the bridge's address in a pod subnet (host-local's first address): the
// source masqueraded hairpin and localhost traffic reaches the pod from.
func gateway(n *tb.Network, f tb.Family) net.IP {
	subnet := n.Subnet4
	if f == tb.V6 {
		subnet = n.Subnet6
	}
	ip, _, err := net.ParseCIDR(tb.NthIP(subnet, 1))
	if err != nil {
		panic(err)
	}
	return ip
}

func clientIP(b *tb.Bed, f tb.Family) net.IP {
	if f == tb.V6 {
		return b.ClientIP6
	}
	return b.ClientIP4
}

// expectPeer asserts that tcp from ns to addr:port is answered by pod want, which saw the
// connection come from peer.
func expectPeer(t *testing.T, ns, addr string, port int, want string, peer net.IP) {
	t.Helper()
	ans, err := tb.ConnectTCP(ns, addr, port)
	name, got := tb.PeerOf(ans)
	if err != nil || name != want || !got.Equal(peer) {
		t.Errorf("tcp %s -> %s port %d: answer %q (err %v), want %s seeing the peer %s", ns, addr, port, ans, err, want, peer)
	}
}

// ruleCounter returns the packet counter of the rule of chain (nat table of the node)
// whose text contains part.
func ruleCounter(t *testing.T, b *tb.Bed, f tb.Family, chain, part string) int {
	t.Helper()
	cmd := "iptables-save"
	if f == tb.V6 {
		cmd = "ip6tables-save"
	}
	for _, l := range strings.Split(b.MustExec(b.Node, cmd, "-c", "-t", "nat"), "\n") {
		// "[pkts:bytes] -A CHAIN ..."
		head, rule, ok := strings.Cut(l, " ")
		if !ok || !strings.HasPrefix(rule, "-A "+chain+" ") || !strings.Contains(rule, part) {
			continue
		}
		pkts, _, _ := strings.Cut(strings.Trim(head, "[]"), ":")
		n, err := strconv.Atoi(pkts)
		if err != nil {
			t.Fatalf("counter of %q: %v", l, err)
		}
		return n
	}
	t.Fatalf("%s: no rule of %s with %q", f, chain, part)
	return 0
}

// TestSNATKey: snat (default true) masquerades the traffic that could not come back
// otherwise, and only that. A client's connection reaches the pod from the client's own
// address either way. With snat, a pod reaching its own host port (hairpin), a neighbour
// pod on the bridge and the node through 127.0.0.1 are answered, the pod seeing the
// bridge's address. With snat: false the hairpin and 127.0.0.1 go unanswered (the pod
// would answer itself, bypassing the DNAT; 127.0.0.1 cannot leave the node) and a
// neighbour is not masqueraded, as with upstream.
//
// Each on both backends: portguard's nftables backend does exactly what its iptables
// backend does. Upstream's nftables backend differs in one case, asserted as it is: with
// snat it masquerades only a pod reaching itself (its rule is `ip saddr == ip daddr`), so a
// neighbour pod reaches A from its own address, as without snat.
func TestSNATKey(t *testing.T) {
	t.Parallel()
	for _, snat := range []bool{true, false} {
		t.Run(fmt.Sprintf("snat=%v", snat), func(t *testing.T) {
			t.Parallel()
			everyBackend(t, func(t *testing.T, fl flavour) {
				b := tb.New(t)
				n := fl.net(b, map[string]any{"snat": snat})
				a, nb := b.NewPod("A"), b.NewPod("B")
				n.MustAdd(a, tb.TCP(8080, 80))
				n.MustAdd(nb)
				a.ServePeer(80)
				for _, f := range families {
					node := b.NodeIP(f).String()
					expectPeer(t, b.Client, node, 8080, "A", clientIP(b, f))
					if snat {
						expectPeer(t, a.NetNS, node, 8080, "A", gateway(n, f))
						if fl != (flavour{"portmap", "nftables"}) {
							expectPeer(t, nb.NetNS, node, 8080, "A", gateway(n, f))
						} else if ans, err := tb.ConnectTCP(nb.NetNS, node, 8080); err == nil {
							if _, peer := tb.PeerOf(ans); !peer.Equal(nb.IP(f)) {
								t.Errorf("%s: upstream nftables: neighbour pod reached A as %s, want its own address %s (upstream masquerades hairpin only)", f, peer, nb.IP(f))
							}
						}
					} else {
						expectNoAnswer(t, "tcp", a.NetNS, node, 8080)
						// A neighbour's answer comes back across the bridge: whether the node
						// un-DNATs it depends on br_netfilter, so only "not masqueraded" is
						// certain.
						if ans, err := tb.ConnectTCP(nb.NetNS, node, 8080); err == nil {
							if _, peer := tb.PeerOf(ans); !peer.Equal(nb.IP(f)) {
								t.Errorf("%s: neighbour pod reached A as %s, want its own address %s (no masquerade)", f, peer, nb.IP(f))
							}
						}
					}
				}
				if snat {
					expectPeer(t, b.Node, "127.0.0.1", 8080, "A", gateway(n, tb.V4))
				} else {
					expectNoAnswer(t, "tcp", b.Node, "127.0.0.1", 8080)
					switch {
					case !fl.nft():
						for _, f := range families {
							if st := b.NAT(f); st.HasChain("CNI-HOSTPORT-MASQ") || st.HasChain("CNI-HOSTPORT-SETMARK") {
								t.Errorf("%s: snat false created the masquerade chains: %v", f, st.Chains)
							}
						}
					case fl.plugin == "portguard":
						for _, set := range []string{"snat4", "snat6", "masqall4", "masqall6"} {
							if e := nftSetElems(t, b, set); e != "" {
								t.Errorf("snat false: masquerade entries in %s: %s", set, e)
							}
						}
					}
				}
				if fl.nft() && fl.plugin == "portguard" {
					expectNoIPTables(t, b)
				}
				if err := n.Check(a); err != nil {
					t.Errorf("CHECK: %v", err)
				}
			})
		})
	}
}

// TestMasqAllKey: masqAll masquerades every connection to the host port, so the pod sees
// the bridge's address even for a client from outside (without it, the client's own).
func TestMasqAllKey(t *testing.T) {
	t.Parallel()
	everyBackend(t, func(t *testing.T, fl flavour) {
		b := tb.New(t)
		all := fl.net(b, map[string]any{"masqAll": true})
		a := b.NewPod("A")
		all.MustAdd(a, tb.TCP(8080, 80))
		a.ServePeer(80)
		for _, f := range families {
			expectPeer(t, b.Client, b.NodeIP(f).String(), 8080, "A", gateway(all, f))
			expectPeer(t, a.NetNS, b.NodeIP(f).String(), 8080, "A", gateway(all, f))
		}
		expectPeer(t, b.Node, "127.0.0.1", 8080, "A", gateway(all, tb.V4))
		if err := all.Check(a); err != nil {
			t.Errorf("CHECK: %v", err)
		}
	})
}

// TestExternalSetMarkChainKey: with externalSetMarkChain the per-attachment chain jumps
// to the operator's chain (as kube-proxy's KUBE-MARK-MASQ) instead of
// CNI-HOSTPORT-SETMARK, which is not created, nor is CNI-HOSTPORT-MASQ: hairpin and
// localhost traffic are answered through the operator's mark and masquerade, and stop
// being answered when the operator's chain no longer marks.
func TestExternalSetMarkChainKey(t *testing.T) {
	t.Parallel()
	bothPlugins(t, func(t *testing.T, plugin string) {
		b := tb.New(t)
		externalMarkChain(b)
		n := b.Network(tb.NetConfig{PortPlugin: plugin, PortConf: map[string]any{"externalSetMarkChain": "PG-EXT-MARK"}})
		a := b.NewPod("A")
		n.MustAdd(a, tb.TCP(8080, 80))
		a.ServePeer(80)
		for _, f := range families {
			st := b.NAT(f)
			if st.HasChain("CNI-HOSTPORT-SETMARK") || st.HasChain("CNI-HOSTPORT-MASQ") {
				t.Errorf("%s: portguard's own mark chains exist beside the external one: %v", f, st.Chains)
			}
			if len(st.JumpsTo(a.Chain(n), "PG-EXT-MARK")) == 0 {
				t.Errorf("%s: the attachment's chain does not jump to PG-EXT-MARK: %v", f, st.Rules[a.Chain(n)])
			}
			expectPeer(t, a.NetNS, b.NodeIP(f).String(), 8080, "A", gateway(n, f))
			if c := ruleCounter(t, b, f, "PG-EXT-MARK", "MARK"); c == 0 {
				t.Errorf("%s: hairpin answered but the operator's mark rule counted no packet", f)
			}
		}
		expectPeer(t, b.Node, "127.0.0.1", 8080, "A", gateway(n, tb.V4))
		if err := n.Check(a); err != nil {
			t.Errorf("CHECK: %v", err)
		}
		for _, f := range families {
			b.MustIPTables(f, "-t", "nat", "-F", "PG-EXT-MARK")
			expectNoAnswer(t, "tcp", a.NetNS, b.NodeIP(f).String(), 8080)
		}
	})
}

// TestMarkMasqBitKey: markMasqBit 5 marks hairpin and localhost traffic with bit 5
// (0x20), which CNI-HOSTPORT-MASQ then masquerades: its rule for 0x20 counts the
// connections, none uses the default bit 13, and the traffic is answered as with the
// default bit.
func TestMarkMasqBitKey(t *testing.T) {
	t.Parallel()
	bothPlugins(t, func(t *testing.T, plugin string) {
		b := tb.New(t)
		n := b.Network(tb.NetConfig{PortPlugin: plugin, PortConf: map[string]any{"markMasqBit": 5}})
		a := b.NewPod("A")
		n.MustAdd(a, tb.TCP(8080, 80))
		a.ServePeer(80)
		for _, f := range families {
			before := ruleCounter(t, b, f, "CNI-HOSTPORT-MASQ", "--mark 0x20/0x20")
			expectPeer(t, a.NetNS, b.NodeIP(f).String(), 8080, "A", gateway(n, f))
			if f == tb.V4 {
				expectPeer(t, b.Node, "127.0.0.1", 8080, "A", gateway(n, tb.V4))
			}
			if after := ruleCounter(t, b, f, "CNI-HOSTPORT-MASQ", "--mark 0x20/0x20"); after <= before {
				t.Errorf("%s: masquerade rule for mark 0x20 counted %d packets before and %d after hairpin traffic", f, before, after)
			}
			if save := b.MustSaveNAT(f); strings.Contains(save, "0x2000") {
				t.Errorf("%s: the default mark bit 13 is in use:\n%s", f, save)
			}
		}
		if err := n.Check(a); err != nil {
			t.Errorf("CHECK: %v", err)
		}
	})
}

// TestHostIPKey: a specific hostIP answers on that address only (not the node's other
// address of the family, not 127.0.0.1, not the other family); an unspecified one
// (0.0.0.0 or ::) answers on every address of its own family and on none of the other.
func TestHostIPKey(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		hostIP func(b *tb.Bed) string
		answer func(b *tb.Bed) []string // addresses whose host port answers
	}{
		{"v4", func(b *tb.Bed) string { return b.NodeIP4.String() }, func(b *tb.Bed) []string { return []string{b.NodeIP4.String()} }},
		{"v6", func(b *tb.Bed) string { return b.NodeIP6.String() }, func(b *tb.Bed) []string { return []string{b.NodeIP6.String()} }},
		{"0.0.0.0", func(*tb.Bed) string { return "0.0.0.0" }, func(b *tb.Bed) []string {
			return []string{b.NodeIP4.String(), b.NodeIP4Alt.String(), "127.0.0.1"}
		}},
		{"::", func(*tb.Bed) string { return "::" }, func(b *tb.Bed) []string { return []string{b.NodeIP6.String(), b.NodeIP6Alt.String()} }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			everyBackend(t, func(t *testing.T, fl flavour) {
				b := tb.New(t)
				n := fl.net(b, nil)
				a := b.NewPod("A")
				n.MustAdd(a, tb.TCP(8080, 80).On(c.hostIP(b)), tb.UDP(8080, 80).On(c.hostIP(b)))
				a.Serve(80)
				answers := map[string]bool{}
				for _, addr := range c.answer(b) {
					answers[addr] = true
				}
				for _, addr := range []string{b.NodeIP4.String(), b.NodeIP4Alt.String(), b.NodeIP6.String(), b.NodeIP6Alt.String(), "127.0.0.1"} {
					from := b.Client
					if addr == "127.0.0.1" {
						from = b.Node
					}
					for _, proto := range protos() {
						if answers[addr] {
							expectAnswer(t, proto, from, addr, 8080, "A")
						} else if proto == "tcp" {
							// UDP would only time out; TCP is refused at once.
							expectNoAnswer(t, proto, from, addr, 8080)
						}
					}
				}
				if err := n.Check(a); err != nil {
					t.Errorf("CHECK: %v", err)
				}
			})
		})
	}
}

// sctpUnsupported says why this kernel cannot carry SCTP, or "" when it can.
func sctpUnsupported() string {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, syscall.IPPROTO_SCTP)
	if err != nil {
		if errors.Is(err, syscall.EPROTONOSUPPORT) || errors.Is(err, syscall.ESOCKTNOSUPPORT) {
			return "the kernel has no SCTP sockets here (" + err.Error() + ")"
		}
		return "cannot open an SCTP socket: " + err.Error()
	}
	syscall.Close(fd)
	return ""
}

// TestSCTP: an SCTP host port forwards in both families and CHECK passes.
func TestSCTP(t *testing.T) {
	t.Parallel()
	if why := sctpUnsupported(); why != "" {
		t.Skip(why)
	}
	b, n := pgBed(t)
	a := b.NewPod("A")
	n.MustAdd(a, ports("sctp", 8080, 1)...)
	for _, l := range []string{"SCTP4-LISTEN:80,reuseaddr,fork", "SCTP6-LISTEN:80,ipv6only=1,reuseaddr,fork"} {
		cmd := exec.Command("ip", "netns", "exec", a.NetNS, "socat", l, "EXEC:/bin/echo A")
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); _ = cmd.Wait() })
	}
	for _, f := range families {
		target := fmt.Sprintf("SCTP4:%s:8080", b.NodeIP(f))
		if f == tb.V6 {
			target = fmt.Sprintf("SCTP6:[%s]:8080", b.NodeIP(f))
		}
		var out string
		var err error
		for i := 0; i < 20; i++ { // the listeners start in the background
			if out, err = b.Exec(b.Client, "socat", "-T2", "-", target); err == nil && strings.TrimSpace(out) == "A" {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if strings.TrimSpace(out) != "A" {
			t.Errorf("%s: sctp client -> %s: %q (err %v), want A", f, target, out, err)
		}
	}
	if err := n.Check(a); err != nil {
		t.Errorf("CHECK: %v", err)
	}
}

// TestConditionAddressLists: conditions with address lists (the issue's
// "-d <node>,127.0.0.1" and a source list) forward exactly the listed addresses, each
// through its own kernel rule, and CHECK passes right after ADD, as with upstream.
func TestConditionAddressLists(t *testing.T) {
	t.Parallel()
	bothPlugins(t, func(t *testing.T, plugin string) {
		b := tb.New(t)
		n := b.Network(tb.NetConfig{PortPlugin: plugin, PortConf: map[string]any{
			"conditionsV4": []string{"-d", b.NodeIP4.String() + "/32,127.0.0.1/32"},
			"conditionsV6": []string{"-s", b.ClientIP6.String() + ",2001:db8::/32"},
		}})
		a := b.NewPod("A")
		n.MustAdd(a, tb.TCP(8080, 80), tb.UDP(8080, 80))
		a.Serve(80)
		if err := n.Check(a); err != nil {
			t.Errorf("CHECK right after ADD: %v", err)
		}
		for _, proto := range protos() {
			expectAnswer(t, proto, b.Client, b.NodeIP4.String(), 8080, "A")
			expectAnswer(t, proto, b.Node, "127.0.0.1", 8080, "A")
			expectAnswer(t, proto, b.Client, b.NodeIP6.String(), 8080, "A")
		}
		// Not listed: the node's other IPv4 address; IPv6 from the node itself.
		expectNoAnswer(t, "tcp", b.Client, b.NodeIP4Alt.String(), 8080)
		expectNoAnswer(t, "tcp", b.Node, b.NodeIP6.String(), 8080)
		if plugin == "portguard" {
			n.MustDel(a)
			expectClean(t, b)
		}
	})
}

// TestTransitNotRedirected: traffic through the node to an address that is not the node's
// own (here a connection from the client, routed via the node, to pod B's address on the
// port A claims on the host) reaches its destination untouched, in both families and both
// protocols (plugins#1209: a DNAT without `fib daddr type local` / `--dst-type LOCAL` would
// hijack it, e.g. every DNS query through the node for a pod claiming UDP 53). The host port
// itself still reaches A.
func TestTransitNotRedirected(t *testing.T) {
	t.Parallel()
	everyBackend(t, func(t *testing.T, fl flavour) {
		b := tb.New(t)
		n := fl.net(b, nil)
		a, nb := b.NewPod("A"), b.NewPod("B")
		n.MustAdd(a, tb.TCP(8080, 80), tb.UDP(8080, 80))
		n.MustAdd(nb)
		a.Serve(80)
		nb.Serve(80, 8080)
		b.MustExec(b.Client, "ip", "route", "add", n.Subnet4.String(), "via", b.NodeIP4.String())
		b.MustExec(b.Client, "ip", "-6", "route", "add", n.Subnet6.String(), "via", b.NodeIP6.String())
		for _, f := range families {
			for _, proto := range protos() {
				expectAnswer(t, proto, b.Client, nb.IP(f).String(), 8080, "B")
				expectAnswer(t, proto, b.Client, b.NodeIP(f).String(), 8080, "A")
			}
		}
		if err := n.Check(a); err != nil {
			t.Errorf("CHECK: %v", err)
		}
	})
}
