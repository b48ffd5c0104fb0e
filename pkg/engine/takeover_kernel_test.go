package engine

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/portguard/portguard/pkg/config"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/nft"
)

// Takeovers from a victim too big to read (nft.MinProbedRules and more): on nf_tables the
// engine reads only its rules for the contested ports, by handle, and changes it over
// netlink after the payload (nft.TakenRules, TakeFrom). These tests run the engine inside
// the namespace, as the plugin runs, so that netlink is used, and compare with the same
// calls made through iptables alone.

type nsEngine struct {
	*Engine
	t    *testing.T
	name string
	h    ns.NetNS
}

func newNSEngine(t *testing.T, netlink bool) *nsEngine {
	t.Helper()
	name := netns(t)
	h, err := ns.GetNS("/var/run/netns/" + name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	e := &nsEngine{t: t, name: name, h: h, Engine: &Engine{Runner: &iptables.Exec{WaitSeconds: 5},
		LockPath: filepath.Join(t.TempDir(), "lock"), LockTimeout: 5 * time.Second, Netlink: netlink}}
	if netlink {
		usable := false
		e.do(func() { usable = e.netlinkFor(hostport.V4) })
		if !usable {
			t.Skip("iptables here is not the nf_tables backend")
		}
	}
	return e
}

func (e *nsEngine) do(f func()) {
	e.t.Helper()
	if err := e.h.Do(func(ns.NetNS) error { f(); defer e.closeNetlink(); return nil }); err != nil {
		e.t.Fatal(err)
	}
}

func (e *nsEngine) add(c *config.Config, o hostport.Owner) {
	e.t.Helper()
	var err error
	e.do(func() { _, err = e.Add(c, o) })
	if err != nil {
		e.t.Fatalf("ADD %s: %v", o, err)
	}
}

// save is the nat table's lines, sorted (rule order aside), without comments and counters.
func (e *nsEngine) save() string {
	e.t.Helper()
	out, err := exec.Command("ip", "netns", "exec", e.name, "iptables-save", "-t", "nat").Output()
	if err != nil {
		e.t.Fatal(err)
	}
	var lines []string
	for _, l := range strings.Split(string(out), "\n") {
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		if i := strings.Index(l, " ["); strings.HasPrefix(l, ":") && i > 0 {
			l = l[:i]
		}
		lines = append(lines, l)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

func tcpRange(ports ...int) string {
	var ms []string
	for _, p := range ports {
		ms = append(ms, fmt.Sprintf(`{"hostPort":%d,"containerPort":%d,"protocol":"tcp"}`, p, p))
	}
	return strings.Join(ms, ",")
}

func span(lo, hi int) []int {
	var out []int
	if lo <= hi {
		for p := lo; p <= hi; p++ {
			out = append(out, p)
		}
	} else {
		for p := lo; p >= hi; p-- {
			out = append(out, p)
		}
	}
	return out
}

var bigVictim = hostport.Owner{Network: "knet", ContainerID: "range"}

// The same takeovers, through netlink and through iptables alone, leave the same table;
// through netlink the victim was read in part (order aside: the rewritten jump keeps its
// place there, and moves to the end of CNI-HOSTPORT-DNAT through iptables).
func TestKernelTakeoverFromABigVictimReadsItInPart(t *testing.T) {
	for _, c := range []struct {
		name   string
		victim []int
		inPart bool
		takers [][]int
	}{
		{"one port", span(2000, 2299), true, [][]int{{2100}}},
		{"ports of two jumps", span(2000, 2299), true, [][]int{{2014, 2015, 2299}}},
		{"mappings out of port order", span(2299, 2000), false, [][]int{{2100}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			fast, slow := newNSEngine(t, true), newNSEngine(t, false)
			for _, e := range []*nsEngine{fast, slow} {
				e.add(conf(t, "", tcpRange(c.victim...), "10.99.0.5/16"), bigVictim)
			}
			for i, ports := range c.takers {
				o := hostport.Owner{Network: "knet", ContainerID: fmt.Sprintf("taker%d", i)}
				tc := conf(t, "", tcpRange(ports...), fmt.Sprintf("10.99.1.%d/16", i+1))
				var p addPlan
				var err error
				fast.do(func() { p, err = fast.planAdd(podDesired(tc, o)[0], config.PolicyTakeover) })
				if err != nil {
					t.Fatal(err)
				}
				a := p.s.Attachments[hostport.ChainName(bigVictim)]
				if _, taken := p.taken[hostport.ChainName(bigVictim)]; taken != c.inPart || a == nil || a.Partial != c.inPart {
					t.Fatalf("victim read in part: %v, want %v", taken, c.inPart)
				}
				if len(p.res.Takeovers) != 1 || len(p.res.Takeovers[0].Claims) != len(ports) || p.res.Takeovers[0].ChainRemoved {
					t.Fatalf("takeovers %+v", p.res.Takeovers)
				}
				fast.add(tc, o)
				slow.add(tc, o)
			}
			if f, s := fast.save(), slow.save(); f != s {
				t.Fatalf("through netlink:\n%s\n\nthrough iptables:\n%s", f, s)
			}
		})
	}
}

// Two ADDs planned from the same table, each taking a port of the same jump of a big
// victim: the second finds the jump rewritten and rewrites the new one.
func TestKernelBigVictimTwoTakersOfOneJump(t *testing.T) {
	e := newNSEngine(t, true)
	e.add(conf(t, "", tcpRange(span(2000, 2299)...), "10.99.0.5/16"), bigVictim)
	var plans []addPlan
	for i, port := range []int{2000, 2001} {
		o := hostport.Owner{Network: "knet", ContainerID: fmt.Sprintf("taker%d", i)}
		var p addPlan
		var err error
		e.do(func() {
			p, err = e.planAdd(podDesired(conf(t, "", tcpRange(port), fmt.Sprintf("10.99.1.%d/16", i+1)), o)[0], config.PolicyTakeover)
		})
		if err != nil || len(p.taken) != 1 {
			t.Fatalf("plan: %v, read in part: %d", err, len(p.taken))
		}
		plans = append(plans, p)
	}
	for _, p := range plans {
		var err error
		e.do(func() { _, err = e.applyAdd(p, config.PolicyTakeover, true) })
		if err != nil {
			t.Fatal(err)
		}
	}
	out := e.save()
	victim := hostport.ChainName(bigVictim)
	var jumps []string
	rules := 0
	for _, l := range strings.Split(out, "\n") {
		switch {
		case strings.HasPrefix(l, "-A CNI-HOSTPORT-DNAT") && strings.HasSuffix(l, victim):
			jumps = append(jumps, l)
		case strings.HasPrefix(l, "-A "+victim+" "):
			rules++
			if strings.Contains(l, "--dport 2000 ") || strings.Contains(l, "--dport 2001 ") {
				t.Errorf("the victim kept a taken port: %s", l)
			}
		}
	}
	if rules != 298*3 || len(jumps) != 20 {
		t.Fatalf("victim: %d rules (want %d), %d jumps (want 20)", rules, 298*3, len(jumps))
	}
	for _, j := range jumps {
		if strings.Contains(j, "2000,") || strings.Contains(j, "2001,") {
			t.Errorf("a jump still names a taken port: %s", j)
		}
	}
}

// Two ADDs planned from the same table that together take all of a big victim: whichever
// changes it last removes the chain.
func TestKernelBigVictimTakenWholeByTwo(t *testing.T) {
	old := nft.MinProbedRules
	nft.MinProbedRules = 30 // the takers' probes must cost less than the victim's size
	t.Cleanup(func() { nft.MinProbedRules = old })
	e := newNSEngine(t, true)
	e.add(conf(t, "", tcpRange(span(2000, 2049)...), "10.99.0.5/16"), bigVictim)
	var plans []addPlan
	for i, r := range [][2]int{{2000, 2001}, {2002, 2049}} {
		o := hostport.Owner{Network: "knet", ContainerID: fmt.Sprintf("taker%d", i)}
		var p addPlan
		var err error
		e.do(func() {
			p, err = e.planAdd(podDesired(conf(t, "", tcpRange(span(r[0], r[1])...), fmt.Sprintf("10.99.1.%d/16", i+1)), o)[0], config.PolicyTakeover)
		})
		if err != nil || len(p.taken) != 1 {
			t.Fatalf("plan: %v, read in part: %d", err, len(p.taken))
		}
		plans = append(plans, p)
	}
	for _, p := range plans {
		var err error
		e.do(func() { _, err = e.applyAdd(p, config.PolicyTakeover, true) })
		if err != nil {
			t.Fatal(err)
		}
	}
	if out := e.save(); strings.Contains(out, hostport.ChainName(bigVictim)) {
		t.Fatalf("the victim's chain survived two takeovers that took all of it:\n%s", out)
	}
}
