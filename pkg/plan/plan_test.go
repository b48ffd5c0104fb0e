package plan

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/config"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/state"
)

// upstream writes one attachment the way upstream portmap leaves it (as iptables -S
// prints it): hostIP "" means any.
func upstream(net, id, pod, hostIP string, ports ...int) (chain string, jump string, rules []string) {
	o := hostport.Owner{Network: net, ContainerID: id}
	chain = hostport.ChainName(o)
	var ps []string
	for _, p := range ports {
		ps = append(ps, fmt.Sprint(p))
		d := ""
		if hostIP != "" {
			d = "-d " + hostIP + "/32 "
		}
		rules = append(rules,
			fmt.Sprintf("-A %s -s %s/24 %s-p tcp -m tcp --dport %d -j CNI-HOSTPORT-SETMARK", chain, pod, d, p),
			fmt.Sprintf("-A %s %s-p tcp -m tcp --dport %d -j DNAT --to-destination %s:80", chain, d, p, pod))
	}
	jump = fmt.Sprintf(`-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"%s\" id: \"%s\"" -m multiport --dports %s -j %s`, net, id, strings.Join(ps, ","), chain)
	return
}

// table builds a state whose listed chains were read; chain texts are -S lines.
func table(t *testing.T, read []string, lines ...string) *state.State {
	t.Helper()
	tab := iptables.NewTable()
	if err := tab.Parse(strings.Join(lines, "\n")); err != nil {
		t.Fatal(err)
	}
	for _, c := range read {
		if !tab.Has(c) {
			tab.Missing[c] = true
		}
	}
	// Chains that were not asked for are forgotten, like a partial read.
	for name := range tab.Chains {
		if !contains(read, name) {
			delete(tab.Chains, name)
		}
	}
	var order []string
	for _, n := range tab.Order {
		if tab.Has(n) {
			order = append(order, n)
		}
	}
	tab.Order = order
	return state.New(hostport.V4, tab)
}

func desired(t *testing.T, id string, mappings string) Desired {
	t.Helper()
	c, err := config.Parse([]byte(`{"cniVersion":"1.0.0","name":"net","type":"portguard","runtimeConfig":{"portMappings":[`+mappings+`]}}`), "eth0")
	if err != nil {
		t.Fatal(err)
	}
	return DesiredFor(c, hostport.Owner{Network: "net", ContainerID: id}, hostport.V4, netip.MustParsePrefix("10.88.0.9/16"))
}

const m8080 = `{"hostPort":8080,"containerPort":80,"protocol":"tcp"}`

func render(t *testing.T, tx *iptables.Tx) string {
	t.Helper()
	p, err := tx.Render()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestAddOnFreshNodeCreatesTheSharedLayout(t *testing.T) {
	s := table(t, append([]string{state.DNATChain}, state.SharedChains...),
		"-P PREROUTING ACCEPT", "-P OUTPUT ACCEPT", "-P POSTROUTING ACCEPT",
		"-A POSTROUTING -s 10.88.0.0/16 -j MASQUERADE")
	d := desired(t, "new", m8080)
	res := Add(s, d, config.PolicyTakeover)
	if len(res.Need) > 0 {
		t.Fatalf("needs %v", res.Need)
	}
	p := render(t, res.Tx)
	for _, want := range []string{
		":CNI-HOSTPORT-DNAT - [0:0]", ":CNI-HOSTPORT-SETMARK - [0:0]", ":CNI-HOSTPORT-MASQ - [0:0]", ":" + d.Chain + " - [0:0]",
		"-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
		"-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
		`-I POSTROUTING 1 -m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ`,
		"-A CNI-HOSTPORT-SETMARK -m comment --comment \"CNI portfwd masquerade mark\" -j MARK --set-xmark 0x2000/0x2000",
		"-A " + d.Chain + " -p tcp --dport 8080 -s 10.88.0.0/16 -j CNI-HOSTPORT-SETMARK",
		"-A " + d.Chain + " -p tcp --dport 8080 -s 127.0.0.1 -j CNI-HOSTPORT-SETMARK",
		"-A " + d.Chain + " -p tcp --dport 8080 -j DNAT --to-destination 10.88.0.9:80",
		`-I CNI-HOSTPORT-DNAT 1 -m comment --comment "dnat name: \"net\" id: \"new\"" -m multiport -p tcp --destination-ports 8080 -j ` + d.Chain,
	} {
		if !strings.Contains(p, want+"\n") {
			t.Errorf("payload lacks %q:\n%s", want, p)
		}
	}
	if strings.Contains(p, "-C ") {
		t.Errorf("fresh node payload asserts instead of creating:\n%s", p)
	}
}

func TestAddOnSteadyNodeReadsOneChainAndAssertsTheRest(t *testing.T) {
	_, jump, _ := upstream("net", "other", "10.88.0.3", "", 9000)
	s := table(t, []string{state.DNATChain}, "-N CNI-HOSTPORT-DNAT", jump)
	res := Add(s, desired(t, "new", m8080), config.PolicyTakeover)
	if len(res.Need) > 0 || len(res.Takeovers) > 0 {
		t.Fatalf("port 9000 is no conflict for 8080: need %v takeovers %v", res.Need, res.Takeovers)
	}
	p := render(t, res.Tx)
	if strings.Contains(p, ":CNI-HOSTPORT") {
		t.Fatalf("a shared chain that exists (or was not read) was declared, which would flush it:\n%s", p)
	}
	if n := strings.Count(p, "\n-C "); n != 5 {
		t.Fatalf("want 5 assertions (2 entry jumps, POSTROUTING jump, SETMARK, MASQ), got %d:\n%s", n, p)
	}
}

func TestAddTakesOverAStaleClaimWholly(t *testing.T) {
	chain, jump, rules := upstream("net", "dead", "10.88.0.3", "", 8080)
	lines := append([]string{"-N CNI-HOSTPORT-DNAT", "-N " + chain, jump}, rules...)
	d := desired(t, "new", m8080)
	res := Add(table(t, []string{state.DNATChain}, lines...), d, config.PolicyTakeover)
	if len(res.Need) != 1 || res.Need[0] != chain {
		t.Fatalf("the stale chain must be read first, need %v", res.Need)
	}
	res = Add(table(t, []string{state.DNATChain, chain}, lines...), d, config.PolicyTakeover)
	p := render(t, res.Tx)
	for _, want := range []string{"-D CNI-HOSTPORT-DNAT -p tcp -m comment", "-F " + chain, "-X " + chain} {
		if !strings.Contains(p, want) {
			t.Errorf("payload lacks %q:\n%s", want, p)
		}
	}
	if len(res.Takeovers) != 1 || !res.Takeovers[0].ChainRemoved || res.Takeovers[0].From.ContainerID != "dead" || res.Takeovers[0].Destinations[0] != "10.88.0.3:80" {
		t.Fatalf("takeover report %+v", res.Takeovers)
	}
}

func TestAddPartialTakeoverKeepsTheOtherPort(t *testing.T) {
	chain, jump, rules := upstream("net", "old", "10.88.0.3", "", 8080, 9090)
	other, ojump, orules := upstream("net", "bystander", "10.88.0.4", "", 7000)
	lines := append([]string{"-N CNI-HOSTPORT-DNAT", "-N " + chain, "-N " + other, ojump, jump}, append(rules, orules...)...)
	res := Add(table(t, []string{state.DNATChain, chain, other}, lines...), desired(t, "new", m8080), config.PolicyTakeover)
	p := render(t, res.Tx)
	if strings.Contains(p, "-X "+chain) {
		t.Fatalf("chain still serving 9090 was removed:\n%s", p)
	}
	for _, want := range []string{
		"-D " + chain + " -s 10.88.0.3/24 -p tcp -m tcp --dport 8080 -j CNI-HOSTPORT-SETMARK",
		"-D " + chain + " -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.88.0.3:80",
		// nothing after the old jump matches 9090: the rewritten jump goes to the end, where
		// a parallel ADD inserting at the top cannot shift it
		`-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"net\" id: \"old\"" -m multiport --dports 9090 -j ` + chain,
		`-D CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"net\" id: \"old\"" -m multiport --dports 8080,9090 -j ` + chain,
	} {
		if !strings.Contains(p, want+"\n") {
			t.Errorf("payload lacks %q:\n%s", want, p)
		}
	}
	if strings.Contains(p, other) && strings.Contains(p, "-D "+other) {
		t.Fatalf("bystander touched:\n%s", p)
	}
	if res.Positioned {
		t.Error("an appended jump does not need the exclusive lock")
	}
}

// A rewritten jump that another claim on one of its ports follows must keep its place
// before it, by rule number, which only an exclusive holder can rely on.
func TestAddPartialTakeoverBeforeALaterClaimKeepsItsPlace(t *testing.T) {
	chain, jump, rules := upstream("net", "old", "10.88.0.3", "", 8080, 9090)
	other, ojump, orules := upstream("net", "bystander", "10.88.0.4", "", 7000)
	later, ljump, lrules := upstream("net", "shadowed", "10.88.0.5", "", 9090)
	lines := append([]string{"-N CNI-HOSTPORT-DNAT", "-N " + chain, "-N " + other, "-N " + later, ojump, jump, ljump}, append(append(rules, orules...), lrules...)...)
	res := Add(table(t, []string{state.DNATChain, chain, other, later}, lines...), desired(t, "new", m8080), config.PolicyTakeover)
	p := render(t, res.Tx)
	want := `-I CNI-HOSTPORT-DNAT 2 -p tcp -m comment --comment "dnat name: \"net\" id: \"old\"" -m multiport --dports 9090 -j ` + chain
	if !strings.Contains(p, want+"\n") {
		t.Errorf("payload lacks %q:\n%s", want, p)
	}
	if !res.Positioned {
		t.Error("a jump inserted by rule number before a later claim on its port must be applied under the exclusive lock")
	}
}

func TestConflictRuleForHostIPs(t *testing.T) {
	chain, jump, rules := upstream("net", "old", "10.88.0.3", "192.0.2.1", 8080)
	lines := append([]string{"-N CNI-HOSTPORT-DNAT", "-N " + chain, jump}, rules...)
	read := []string{state.DNATChain, chain}
	cases := map[string]bool{
		`{"hostPort":8080,"containerPort":80,"protocol":"tcp","hostIP":"192.0.2.2"}`: false, // other specific IP
		`{"hostPort":8080,"containerPort":80,"protocol":"tcp","hostIP":"192.0.2.1"}`: true,  // same IP
		`{"hostPort":8080,"containerPort":80,"protocol":"tcp","hostIP":"0.0.0.0"}`:   true,  // wildcard vs specific
		m8080: true,
		`{"hostPort":8080,"containerPort":80,"protocol":"udp"}`:                    false, // other protocol
		`{"hostPort":8081,"containerPort":80,"protocol":"tcp"}`:                    false, // other port
		`{"hostPort":8080,"containerPort":80,"protocol":"tcp","hostIP":"fd00::1"}`: false, // other family: no v4 claim
	}
	for m, conflict := range cases {
		res := Add(table(t, read, lines...), desired(t, "new", m), config.PolicyTakeover)
		if got := len(res.Takeovers) > 0; got != conflict {
			t.Errorf("%s: takeover=%v, want %v", m, got, conflict)
		}
	}
}

func TestRejectAndAllowPolicies(t *testing.T) {
	chain, jump, rules := upstream("net", "old", "10.88.0.3", "", 8080)
	lines := append([]string{"-N CNI-HOSTPORT-DNAT", "-N " + chain, jump}, rules...)
	read := []string{state.DNATChain, chain}
	res := Add(table(t, read, lines...), desired(t, "new", m8080), config.PolicyReject)
	if res.Tx != nil || len(res.Conflicts) != 1 || !strings.Contains(res.Conflicts[0].String(), "net/old") || !strings.Contains(res.Conflicts[0].String(), "10.88.0.3:80") {
		t.Fatalf("reject: tx %v conflicts %v", res.Tx, res.Conflicts)
	}
	res = Add(table(t, read, lines...), desired(t, "new", m8080), config.PolicyAllow)
	p := render(t, res.Tx)
	if strings.Contains(p, "-X "+chain) || len(res.Takeovers) > 0 {
		t.Fatalf("allow removed the other claim:\n%s", p)
	}
	if !strings.Contains(p, "-I CNI-HOSTPORT-DNAT 1 ") {
		t.Fatalf("allow must still put the new jump first:\n%s", p)
	}
}

func TestReAddReplacesOwnJumps(t *testing.T) {
	chain, jump, rules := upstream("net", "new", "10.88.0.3", "", 8080)
	lines := append([]string{"-N CNI-HOSTPORT-DNAT", "-N " + chain, jump}, rules...)
	res := Add(table(t, []string{state.DNATChain}, lines...), desired(t, "new", m8080), config.PolicyTakeover)
	p := render(t, res.Tx)
	if len(res.Need) > 0 || len(res.Takeovers) > 0 {
		t.Fatalf("own chain treated as a victim: %v %v", res.Need, res.Takeovers)
	}
	if !strings.Contains(p, "-D CNI-HOSTPORT-DNAT -p tcp -m comment") || !strings.Contains(p, ":"+chain+" - [0:0]") ||
		!strings.Contains(p, "--to-destination 10.88.0.9:80") {
		t.Fatalf("re-ADD must drop the old jump and rebuild the chain with the new IP:\n%s", p)
	}
}

func TestCheckFindsShadowingAndDuplicates(t *testing.T) {
	d := desired(t, "me", m8080)
	_, ojump, _ := upstream("net", "stale", "10.88.0.3", "", 8080)
	var mine []string
	for _, j := range d.Jumps {
		mine = append(mine, "-A "+j.Chain+" "+j.Spec())
	}
	before := append([]string{"-N CNI-HOSTPORT-DNAT", ojump}, mine...)
	res := Check(table(t, []string{state.DNATChain}, before...), d)
	if len(res.Problems) != 1 || !strings.Contains(res.Problems[0], "shadowed by net/stale") {
		t.Fatalf("problems %v", res.Problems)
	}
	after := append(append([]string{"-N CNI-HOSTPORT-DNAT"}, mine...), ojump)
	res = Check(table(t, []string{state.DNATChain}, after...), d)
	if len(res.Problems) != 1 || !strings.Contains(res.Problems[0], "duplicated by net/stale") {
		t.Fatalf("problems %v", res.Problems)
	}
	res = Check(table(t, []string{state.DNATChain}, append([]string{"-N CNI-HOSTPORT-DNAT"}, mine...)...), d)
	if len(res.Problems) != 0 {
		t.Fatalf("healthy attachment reported %v", res.Problems)
	}
	// the jumps, the rules of the chain and the shared layout are asserted with -C
	if n := strings.Count(render(t, res.Tx), "\n-C "); n != len(d.Jumps)+len(d.Rules)+5 {
		t.Fatalf("want %d assertions, got %d", len(d.Jumps)+len(d.Rules)+5, n)
	}
	res = Check(table(t, []string{state.DNATChain}, "-N CNI-HOSTPORT-DNAT"), d)
	if len(res.Problems) == 0 || !strings.Contains(res.Problems[0], "jump rule missing") {
		t.Fatalf("missing jump not reported: %v", res.Problems)
	}
}

func TestGCRemovesOnlyThisNetworksInvalidAttachments(t *testing.T) {
	var lines = []string{"-N CNI-HOSTPORT-DNAT"}
	for _, a := range [][2]string{{"net", "keep"}, {"net", "gone"}, {"othernet", "gone2"}} {
		chain, jump, rules := upstream(a[0], a[1], "10.88.0.3", "", 8080)
		lines = append(append(lines, "-N "+chain, jump), rules...)
	}
	s := table(t, []string{state.DNATChain}, lines...)
	res, removed := GC(s, "net", map[string]bool{"keep": true}, nil)
	p := render(t, res.Tx)
	gone := hostport.ChainName(hostport.Owner{Network: "net", ContainerID: "gone"})
	if len(removed) != 1 || removed[0].ContainerID != "gone" || !strings.Contains(p, "-X "+gone) || strings.Count(p, "-X ") != 1 {
		t.Fatalf("removed %v payload:\n%s", removed, p)
	}
}

func TestDelBlindAndDel(t *testing.T) {
	d := desired(t, "me", m8080+`,{"hostPort":53,"containerPort":53,"protocol":"udp"}`)
	p := render(t, DelBlind(d))
	if strings.Count(p, "-D CNI-HOSTPORT-DNAT") != 2 || !strings.Contains(p, "-X "+d.Chain) {
		t.Fatalf("blind delete:\n%s", p)
	}
	chain, jump, rules := upstream("net", "me", "10.88.0.3", "", 8080)
	s := table(t, []string{state.DNATChain, chain}, append([]string{"-N CNI-HOSTPORT-DNAT", "-N " + chain, jump}, rules...)...)
	res := Del(s, chain)
	if p := render(t, res.Tx); !strings.Contains(p, "-D CNI-HOSTPORT-DNAT -p tcp") || !strings.Contains(p, "-X "+chain) {
		t.Fatalf("del:\n%s", p)
	}
	res = Del(table(t, []string{state.DNATChain, "CNI-DN-none"}, "-N CNI-HOSTPORT-DNAT"), "CNI-DN-none")
	if !res.Tx.Empty() {
		t.Fatal("deleting a never-added attachment changes something")
	}
}

func TestGCFindsOrphansOfSuspects(t *testing.T) {
	orphan := hostport.Owner{Network: "net", ContainerID: "crashed"}
	chain := hostport.ChainName(orphan)
	lines := []string{"-N CNI-HOSTPORT-DNAT", "-N " + chain, "-A " + chain + " -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.9:80"}
	suspects := []hostport.Owner{orphan, {Network: "othernet", ContainerID: "crashed"}, {Network: "net", ContainerID: "valid"}}
	res, _ := GC(table(t, []string{state.DNATChain}, lines...), "net", map[string]bool{"valid": true}, suspects)
	if len(res.Need) != 1 || res.Need[0] != chain {
		t.Fatalf("only this network's invalid suspect's chain must be read, need %v", res.Need)
	}
	res, removed := GC(table(t, []string{state.DNATChain, chain}, lines...), "net", map[string]bool{"valid": true}, suspects)
	if p := render(t, res.Tx); len(removed) != 1 || !strings.Contains(p, "-X "+chain) {
		t.Fatalf("orphan not removed: %v\n%s", removed, p)
	}
}

// A victim read in part (only its rules for the contested port, state.ReadPart) keeps
// what its jumps name besides that port: the takeover is partial, asserts none of its
// rules (that would make iptables-nft fetch the chain), and only when the jumps name
// nothing else is the chain removed.
func TestAddPartialTakeoverOfAVictimReadInPart(t *testing.T) {
	for _, c := range []struct {
		name      string
		ports     []int
		removeAll bool
	}{{"keeps other ports", []int{8080, 9090, 9091}, false}, {"keeps nothing", []int{8080}, true}} {
		t.Run(c.name, func(t *testing.T) {
			chain, jump, rules := upstream("net", "range", "10.88.0.3", "", c.ports...)
			s := table(t, []string{state.DNATChain}, "-N CNI-HOSTPORT-DNAT", "-N "+chain, jump)
			var taken []iptables.Rule
			for _, l := range rules {
				if strings.Contains(l, "--dport 8080 ") {
					r, err := iptables.SplitArgs(strings.TrimPrefix(l, "-A "+chain+" "))
					if err != nil {
						t.Fatal(err)
					}
					taken = append(taken, iptables.Rule{Chain: chain, Args: r})
				}
			}
			s.ReadPart(chain, taken)
			res := Add(s, desired(t, "new", m8080), config.PolicyTakeover)
			p := render(t, res.Tx)
			if len(res.Need) > 0 || len(res.Takeovers) != 1 || res.Takeovers[0].ChainRemoved != c.removeAll {
				t.Fatalf("need %v, takeovers %+v", res.Need, res.Takeovers)
			}
			if strings.Contains(p, "-C "+chain) {
				t.Errorf("asserts a rule of the victim read in part:\n%s", p)
			}
			if want := "--dports 9090,9091 -j " + chain; !c.removeAll && !strings.Contains(p, want) {
				t.Errorf("payload lacks the rewritten jump %q:\n%s", want, p)
			}
			if got := strings.Contains(p, "-X "+chain); got != c.removeAll {
				t.Errorf("chain removed: %v, want %v:\n%s", got, c.removeAll, p)
			}
		})
	}
}

// desiredWith is desired with extra configuration keys (a JSON fragment ending in a comma).
func desiredWith(t *testing.T, id, keys, mappings string) Desired {
	t.Helper()
	c, err := config.Parse([]byte(`{"cniVersion":"1.0.0","name":"net","type":"portguard",`+keys+`"runtimeConfig":{"portMappings":[`+mappings+`]}}`), "eth0")
	if err != nil {
		t.Fatal(err)
	}
	return DesiredFor(c, hostport.Owner{Network: "net", ContainerID: id}, hostport.V4, netip.MustParsePrefix("10.88.0.9/16"))
}

// TestAddressListsAreOneJumpPerKernelRule: iptables makes a rule per address pair of
// "-s a,b -d c,d", so the attachment's jumps are planned that way, and CHECK counts them.
func TestAddressListsAreOneJumpPerKernelRule(t *testing.T) {
	d := desiredWith(t, "me", `"conditionsV4":["-s","198.51.100.0/24,203.0.113.7","-d","192.0.2.1/32,127.0.0.1/32"],`, m8080)
	if len(d.Jumps) != 4 {
		t.Fatalf("%d jumps for 2 sources x 2 destinations, want 4", len(d.Jumps))
	}
	// As iptables -S prints what the kernel holds after ADD.
	var kernel []string
	for _, src := range []string{"198.51.100.0/24", "203.0.113.7/32"} {
		for _, dst := range []string{"192.0.2.1/32", "127.0.0.1/32"} {
			kernel = append(kernel, fmt.Sprintf(`-A CNI-HOSTPORT-DNAT -s %s -d %s -p tcp -m comment --comment "dnat name: \"net\" id: \"me\"" -m multiport --dports 8080 -j %s`, src, dst, d.Chain))
		}
	}
	healthy := append([]string{"-N CNI-HOSTPORT-DNAT"}, kernel...)
	res := Check(table(t, []string{state.DNATChain}, healthy...), d)
	if len(res.Problems) != 0 || len(res.Need) != 0 {
		t.Fatalf("healthy attachment with address lists: problems %v need %v", res.Problems, res.Need)
	}
	for i, j := range d.Jumps {
		if p := render(t, res.Tx); !strings.Contains(p, "-C CNI-HOSTPORT-DNAT "+j.Spec()+"\n") {
			t.Errorf("jump %d is not asserted on its own:\n%s", i, p)
		}
	}
	extra := append(append([]string(nil), healthy...), kernel[0])
	res = Check(table(t, []string{state.DNATChain}, extra...), d)
	if len(res.Problems) != 1 || !strings.Contains(res.Problems[0], "5 jump rules enter "+d.Chain+", 4 expected") {
		t.Fatalf("an extra jump must still be found: %v", res.Problems)
	}
	// Re-ADD and DEL remove every expanded rule.
	lines := append(append([]string(nil), healthy...), "-N "+d.Chain)
	p := render(t, Add(table(t, []string{state.DNATChain}, lines...), d, config.PolicyTakeover).Tx)
	if strings.Count(p, "-D CNI-HOSTPORT-DNAT") != 4 || strings.Count(p, "-I CNI-HOSTPORT-DNAT") != 4 {
		t.Fatalf("re-ADD must replace all 4 kernel jumps:\n%s", p)
	}
	if p := render(t, DelBlind(d)); strings.Count(p, "-D CNI-HOSTPORT-DNAT") != 4 {
		t.Fatalf("blind DEL must name all 4 kernel jumps:\n%s", p)
	}
	if p := render(t, Del(table(t, []string{state.DNATChain, d.Chain}, lines...), d.Chain).Tx); strings.Count(p, "-D CNI-HOSTPORT-DNAT") != 4 {
		t.Fatalf("DEL must remove all 4 kernel jumps:\n%s", p)
	}
}

// TestJumpsAreSplitByMultiportLimitThenByAddress: 16 ports make two multiport rules, and
// each becomes one rule per listed address.
func TestJumpsAreSplitByMultiportLimitThenByAddress(t *testing.T) {
	var ms []string
	for p := 9000; p < 9016; p++ {
		ms = append(ms, fmt.Sprintf(`{"hostPort":%d,"containerPort":80,"protocol":"tcp"}`, p))
	}
	d := desiredWith(t, "me", `"conditionsV4":["-d","192.0.2.1,192.0.2.2"],`, strings.Join(ms, ","))
	if len(d.Jumps) != 4 {
		t.Fatalf("%d jumps, want 2 multiport rules x 2 addresses", len(d.Jumps))
	}
	if v := d.Jumps[3].Value("--destination-ports"); v != "9015" {
		t.Fatalf("last jump has ports %q", v)
	}
}
