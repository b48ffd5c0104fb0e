package nftables

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/nft"
	"github.com/portguard/portguard/test/testbed"
)

// iptablesClaim writes, through iptables-nft, what upstream portmap's iptables backend
// writes for pod p of network net1 on tcp ports (each to the pod's port 80), in its
// order: the chain, its DNAT rules (with hostIP: -d hostIP), then one multiport jump per
// 15 ports. It returns the chain's name.
func (k *kbed) iptablesClaim(f testbed.Family, p *testbed.Pod, hostIP net.IP, ports ...int) string {
	k.T.Helper()
	chain := testbed.ChainName("net1", p.ContainerID)
	dest := p.IP(f).String() + ":80"
	if f == testbed.V6 {
		dest = "[" + p.IP(f).String() + "]:80"
	}
	var b strings.Builder
	if _, err := k.IPTables(f, "-t", "nat", "-S", "CNI-HOSTPORT-DNAT"); err != nil {
		// Declared in a --noflush payload, an existing chain would be flushed.
		fmt.Fprintf(&b, ":CNI-HOSTPORT-DNAT - [0:0]\n")
		fmt.Fprintf(&b, "-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT\n")
	}
	fmt.Fprintf(&b, ":%s - [0:0]\n", chain)
	d := ""
	if hostIP != nil {
		d = "-d " + hostIP.String() + " "
	}
	for _, port := range ports {
		fmt.Fprintf(&b, "-A %s %s-p tcp -m tcp --dport %d -j DNAT --to-destination %s\n", chain, d, port, dest)
	}
	for i := 0; i < len(ports); i += 15 {
		var ps []string
		for _, port := range ports[i:min(i+15, len(ports))] {
			ps = append(ps, itoa(port))
		}
		fmt.Fprintf(&b, "-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment \"dnat name: \\\"net1\\\" id: \\\"%s\\\"\" -m multiport --dports %s -j %s\n",
			p.ContainerID, strings.Join(ps, ","), chain)
	}
	k.MustRestoreNAT(f, b.String())
	return chain
}

// iptPlanned observes and plans the iptables side of claims for owner o, in tx.
func (k *kbed) iptPlanned(tx *Tx, o hostport.Owner, claims []hostport.Claim) iptPlan {
	k.T.Helper()
	var all iptPlan
	for _, f := range hostport.Families {
		cs := claimsOf(claims, f)
		if len(cs) == 0 {
			continue
		}
		v, err := k.tab.observeIptables(f, o, cs)
		if err != nil {
			k.T.Fatal(err)
		}
		p, err := k.tab.planIptables(v, o, cs)
		if err != nil {
			k.T.Fatal(err)
		}
		tx.RemoveIptables(p.ops...)
		all.ops = append(all.ops, p.ops...)
		all.takeovers = append(all.takeovers, p.takeovers...)
		all.conflicts = append(all.conflicts, p.conflicts...)
	}
	return all
}

// The removal of an iptables claim and the creation of the new element are one
// transaction: when the element is refused, the iptables rules stay exactly as they were
// (and keep answering); when it is not, the new pod answers in both families at once and
// the victim's chain is gone.
func TestKernelIptablesTakeoverIsOneBatch(t *testing.T) {
	t.Parallel()
	k := newKBed(t)
	a, b, x := k.pod("A"), k.pod("B"), k.pod("X")
	var chain string
	for _, f := range []testbed.Family{testbed.V4, testbed.V6} {
		chain = k.iptablesClaim(f, a, nil, 8080)
	}
	k.mustAdd(k.attachment(x, claim(hostport.V4, "tcp", 9090)))
	k.expect("tcp", k.NodeIP4, 8080, "A")
	k.expect("tcp", k.NodeIP6, 8080, "A")
	save := func() string {
		return testbed.Normalize(k.MustSaveNAT(testbed.V4)) + testbed.Normalize(k.MustSaveNAT(testbed.V6))
	}
	before := save()

	// 9090 is X's element, which this transaction does not remove: refused whole.
	want := append(both("tcp", 8080), claim(hostport.V4, "tcp", 9090))
	tx, err := k.tab.Begin()
	if err != nil {
		t.Fatal(err)
	}
	p := k.iptPlanned(tx, owner(b), want)
	if len(p.takeovers) != 2 || len(p.conflicts) != 2 || len(p.ops) == 0 {
		t.Fatalf("planned takeovers %+v conflicts %+v ops %d", p.takeovers, p.conflicts, len(p.ops))
	}
	for _, tk := range p.takeovers {
		if tk.From != owner(a) || !tk.ChainRemoved || !strings.HasSuffix(tk.Chain, " nat "+chain) || len(tk.Claims) != 1 || tk.Claims[0].HostPort != 8080 {
			t.Errorf("takeover %+v", tk)
		}
	}
	if err := tx.AddAttachment(noMasq(k.attachment(b, want...))); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); !errors.Is(err, ErrClaimed) {
		t.Fatalf("commit beside X's claim: %v, want ErrClaimed", err)
	}
	if after := save(); after != before {
		t.Errorf("a refused batch changed iptables:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	k.expect("tcp", k.NodeIP4, 8080, "A")
	k.expect("tcp", k.NodeIP6, 8080, "A")

	tx, _ = k.tab.Begin()
	k.iptPlanned(tx, owner(b), both("tcp", 8080))
	if err := tx.AddAttachment(k.attachment(b, both("tcp", 8080)...)); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	k.expect("tcp", k.NodeIP4, 8080, "B")
	k.expect("tcp", k.NodeIP6, 8080, "B")
	for _, f := range []testbed.Family{testbed.V4, testbed.V6} {
		if d := k.DNChains(f); len(d) != 0 {
			t.Errorf("%s: chains left %v", f, d)
		}
	}
	// Nothing conflicts any more: an observation plans nothing.
	tx, _ = k.tab.Begin()
	if p := k.iptPlanned(tx, owner(b), both("tcp", 8080)); len(p.ops)+len(p.takeovers) != 0 {
		t.Errorf("after the takeover: %+v", p)
	}
}

// A commit refused because the ruleset changed after the observation (ERESTART) changes
// nothing, iptables included: the observation is checked by the batch's generation.
func TestKernelIptablesTakeoverChecksGeneration(t *testing.T) {
	t.Parallel()
	k := newKBed(t)
	a, b := k.pod("A"), k.pod("B")
	k.iptablesClaim(testbed.V4, a, nil, 8080)
	tx, _ := k.tab.Begin()
	k.iptPlanned(tx, owner(b), []hostport.Claim{claim(hostport.V4, "tcp", 8080)})
	if err := tx.AddAttachment(noMasq(k.attachment(b, claim(hostport.V4, "tcp", 8080)))); err != nil {
		t.Fatal(err)
	}
	k.MustIPTables(testbed.V4, "-t", "nat", "-N", "SOMEONE-ELSE")
	before := testbed.Normalize(k.MustSaveNAT(testbed.V4))
	if err := tx.Commit(); !errors.Is(err, ErrChanged) {
		t.Fatalf("commit after another writer: %v, want ErrChanged", err)
	}
	if after := testbed.Normalize(k.MustSaveNAT(testbed.V4)); after != before {
		t.Errorf("a refused batch changed iptables:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	k.expect("tcp", k.NodeIP4, 8080, "A")
}

// A victim with many ports (two multiport jumps), read only for the contested port
// (nft.TakenRules, forced here by a small nft.MinProbedRules): taking one port rewrites
// the one jump that names it and deletes that port's rule; the victim keeps every other
// port, and a hostIP claim of another pod on another port is not touched.
func TestKernelIptablesPartialTakeoverOfBigVictim(t *testing.T) {
	// Not parallel: it sets a package variable of pkg/nft (parallel tests start after it).
	old := nft.MinProbedRules
	nft.MinProbedRules = 4
	defer func() { nft.MinProbedRules = old }()
	k := newKBed(t)
	a, b, c := k.pod("A"), k.pod("B"), k.pod("C")
	var ports []int
	for p := 8100; p < 8120; p++ {
		ports = append(ports, p)
	}
	chain := k.iptablesClaim(testbed.V4, a, nil, ports...)
	k.iptablesClaim(testbed.V4, c, k.NodeIP4Alt, 8105)
	k.expect("tcp", k.NodeIP4, 8105, "A")

	tx, _ := k.tab.Begin()
	want := []hostport.Claim{claim(hostport.V4, "tcp", 8105, k.NodeIP4)}
	if v, err := k.tab.observeIptables(hostport.V4, owner(b), want); err != nil || !v.s.Attachments[chain].Partial {
		t.Fatalf("observation of the big victim: %v; want it read in part", err)
	}
	p := k.iptPlanned(tx, owner(b), want)
	if len(p.takeovers) != 1 || p.takeovers[0].From != owner(a) || p.takeovers[0].ChainRemoved {
		t.Fatalf("takeovers %+v, want one partial of A", p.takeovers)
	}
	if err := tx.AddAttachment(noMasq(k.attachment(b, want...))); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	k.expect("tcp", k.NodeIP4, 8105, "B")
	k.expect("tcp", k.NodeIP4, 8104, "A")
	k.expect("tcp", k.NodeIP4, 8119, "A")
	k.expect("tcp", k.NodeIP4Alt, 8105, "C")
	nat := k.NAT(testbed.V4)
	js := nat.JumpsTo("CNI-HOSTPORT-DNAT", chain)
	if len(js) != 2 || strings.Contains(strings.Join(js, "\n"), "8105") {
		t.Errorf("jumps into %s:\n%s", chain, strings.Join(js, "\n"))
	}
	if rules := strings.Join(nat.Rules[chain], "\n"); strings.Contains(rules, "8105") || len(nat.Rules[chain]) != len(ports)-1 {
		t.Errorf("rules of %s:\n%s", chain, rules)
	}
}

// A rule of CNI-HOSTPORT-DNAT whose shape the decoder does not know may claim any port:
// the observation of ADD and CHECK refuses (ErrIptablesUnreadable) rather than miss a
// claim, and DEL's removal of the attachment's own leftover goes on without reading it.
func TestKernelIptablesUnreadableRuleRefuses(t *testing.T) {
	t.Parallel()
	k := newKBed(t)
	a, b := k.pod("A"), k.pod("B")
	k.iptablesClaim(testbed.V4, a, nil, 8080)
	k.MustIPTables(testbed.V4, "-t", "nat", "-I", "CNI-HOSTPORT-DNAT", "-m", "conntrack", "--ctstate", "NEW", "-j", "RETURN")
	cs := []hostport.Claim{claim(hostport.V4, "tcp", 8080)}
	if _, err := k.tab.observeIptables(hostport.V4, owner(b), cs); !errors.Is(err, ErrIptablesUnreadable) {
		t.Fatalf("observation with an unknown rule: %v, want ErrIptablesUnreadable", err)
	}
	// The attachment's own chain is found by name and removed without reading the rest.
	own := k.iptablesClaim(testbed.V4, b, nil, 8081)
	ops, err := k.tab.iptLeftoverOps(hostport.V4, owner(b))
	if err != nil || len(ops) == 0 {
		t.Fatalf("leftover of B beside an unknown rule: %d ops, %v", len(ops), err)
	}
	tx, _ := k.tab.Begin()
	tx.RemoveIptables(ops...)
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if d := k.DNChains(testbed.V4); slices.Contains(d, own) || len(d) != 1 {
		t.Errorf("chains after removing B's leftover: %v", d)
	}
}
