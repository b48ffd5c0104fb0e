package engine

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/portguard/portguard/pkg/config"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/iptables/iptablestest"
	"github.com/portguard/portguard/pkg/lock"
)

// These tests run the real iptables in a throwaway network namespace. They prove the
// transactions against the kernel; packets are proven in test/e2e.

func netns(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces")
	}
	if _, err := exec.LookPath("iptables-restore"); err != nil {
		t.Skip("iptables not installed")
	}
	b := make([]byte, 4)
	rand.Read(b)
	name := "pgk-" + hex.EncodeToString(b)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	return name
}

func inNS(t *testing.T, ns string, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %v\n%s", args, err, out)
	}
	return string(out)
}

func newEngine(t *testing.T, ns string) (*Engine, *iptables.Exec) {
	r := &iptables.Exec{WaitSeconds: 5, Prefix: []string{"ip", "netns", "exec", ns}}
	return &Engine{Runner: r, LockPath: filepath.Join(t.TempDir(), "lock"), LockTimeout: 5 * time.Second}, r
}

func conf(t *testing.T, extra, mappings string, ips ...string) *config.Config {
	t.Helper()
	var ipj []string
	for _, ip := range ips {
		ipj = append(ipj, `{"address":"`+ip+`","interface":0}`)
	}
	c, err := config.Parse([]byte(`{"cniVersion":"1.0.0","name":"knet","type":"portguard",`+extra+`
		"runtimeConfig":{"portMappings":[`+mappings+`]},
		"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/x"}],"ips":[`+strings.Join(ipj, ",")+`]}}`), "eth0")
	if err != nil {
		t.Fatal(err)
	}
	return c
}

const foreign = `*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABC - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-SVC-ABC
-A KUBE-SVC-ABC -p udp -j DNAT --to-destination 10.244.0.5:53
-A POSTROUTING -s 10.99.0.0/16 -j MASQUERADE
-A OUTPUT -p tcp --dport 9999 -j DNAT --to-destination 127.0.0.1:9998
COMMIT
`

// foreignRules returns every nat rule that is not portguard's, as iptables-save prints it.
func foreignRules(t *testing.T, ns, save string) string {
	var keep []string
	for _, l := range strings.Split(inNS(t, ns, save, "-t", "nat"), "\n") {
		if strings.HasPrefix(l, "-A ") && !strings.Contains(l, "CNI-") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

func TestKernelAddCheckDelKeepsForeignRules(t *testing.T) {
	ns := netns(t)
	cmd := exec.Command("ip", "netns", "exec", ns, "iptables-restore", "--noflush")
	cmd.Stdin = strings.NewReader(foreign)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	before := foreignRules(t, ns, "iptables-save")
	e, r := newEngine(t, ns)
	c := conf(t, "", `{"hostPort":8080,"containerPort":80,"protocol":"tcp"},{"hostPort":5353,"containerPort":53,"protocol":"udp"}`, "10.99.0.5/16", "fd00:99::5/64")
	owner := hostport.Owner{Network: "knet", ContainerID: "c1"}

	if _, err := e.Add(c, owner); err != nil {
		t.Fatalf("first ADD: %v", err)
	}
	if err := e.Check(c, owner); err != nil {
		t.Fatalf("CHECK right after ADD: %v", err)
	}
	// Steady state: one read and one restore per family.
	n := r.Processes()
	other := hostport.Owner{Network: "knet", ContainerID: "c2"}
	c2 := conf(t, "", `{"hostPort":9090,"containerPort":80,"protocol":"tcp"}`, "10.99.0.6/16", "fd00:99::6/64")
	if _, err := e.Add(c2, other); err != nil {
		t.Fatal(err)
	}
	if got := r.Processes() - n; got != 4 {
		t.Errorf("steady-state dual-stack ADD ran %d iptables processes, want 4 (2 per family)", got)
	}
	n = r.Processes()
	if err := e.Check(c2, other); err != nil {
		t.Fatal(err)
	}
	if got := r.Processes() - n; got != 4 {
		t.Errorf("CHECK ran %d iptables processes, want 4 (2 per family)", got)
	}
	n = r.Processes()
	if err := e.Del(c2, other); err != nil {
		t.Fatal(err)
	}
	if got := r.Processes() - n; got != 2 {
		t.Errorf("DEL ran %d iptables processes, want 2 (1 per family)", got)
	}

	if err := e.Del(c, owner); err != nil {
		t.Fatal(err)
	}
	if err := e.Del(c, owner); err != nil {
		t.Fatalf("second DEL: %v", err)
	}
	if out := inNS(t, ns, "iptables-save", "-t", "nat"); strings.Contains(out, "CNI-DN-") {
		t.Fatalf("chains left after DEL:\n%s", out)
	}
	if out := inNS(t, ns, "ip6tables-save", "-t", "nat"); strings.Contains(out, "CNI-DN-") {
		t.Fatalf("ipv6 chains left after DEL:\n%s", out)
	}
	if after := foreignRules(t, ns, "iptables-save"); after != before {
		t.Fatalf("foreign rules changed:\nbefore\n%s\nafter\n%s", before, after)
	}
}

func TestKernelAddRestoresMissingSharedRules(t *testing.T) {
	ns := netns(t)
	e, _ := newEngine(t, ns)
	c := conf(t, "", `{"hostPort":8080,"containerPort":80,"protocol":"tcp"}`, "10.99.0.5/16")
	if _, err := e.Add(c, hostport.Owner{Network: "knet", ContainerID: "a"}); err != nil {
		t.Fatal(err)
	}
	// Someone flushes OUTPUT and the MASQ chain: the fast path's assertions fail, the
	// engine reads the shared chains and puts the rules back.
	inNS(t, ns, "iptables", "-t", "nat", "-F", "OUTPUT")
	inNS(t, ns, "iptables", "-t", "nat", "-F", "CNI-HOSTPORT-MASQ")
	b := hostport.Owner{Network: "knet", ContainerID: "b"}
	if err := e.Check(c, b); err == nil {
		t.Fatal("CHECK of a never-added attachment passed")
	}
	if _, err := e.Add(c, b); err != nil {
		t.Fatal(err)
	}
	out := inNS(t, ns, "iptables", "-t", "nat", "-S")
	for _, want := range []string{"-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT", "-A CNI-HOSTPORT-MASQ -m mark --mark 0x2000/0x2000 -j MASQUERADE"} {
		if strings.Count(out, want) != 1 {
			t.Errorf("want exactly one %q:\n%s", want, out)
		}
	}
	if strings.Count(out, "-A PREROUTING -m addrtype") != 1 {
		t.Errorf("entry jump duplicated:\n%s", out)
	}
	if err := e.Check(c, b); err != nil {
		t.Fatalf("CHECK after repair-by-ADD: %v", err)
	}
	// a takes over: b took 8080 from a, so a's CHECK names b
	err := e.Check(c, hostport.Owner{Network: "knet", ContainerID: "a"})
	if err == nil || !strings.Contains(err.Error(), "jump rule missing") {
		t.Fatalf("CHECK of the attachment that lost its port: %v", err)
	}
}

func TestKernelCheckNamesShadowingUpstreamChain(t *testing.T) {
	ns := netns(t)
	e, _ := newEngine(t, ns)
	c := conf(t, "", `{"hostPort":8080,"containerPort":80,"protocol":"tcp"}`, "10.99.0.5/16")
	me := hostport.Owner{Network: "knet", ContainerID: "me"}
	if _, err := e.Add(c, me); err != nil {
		t.Fatal(err)
	}
	// A stale chain in upstream's format, inserted in front of ours by hand.
	stale := hostport.ChainName(hostport.Owner{Network: "oldnet", ContainerID: "dead"})
	inNS(t, ns, "iptables", "-t", "nat", "-N", stale)
	inNS(t, ns, "iptables", "-t", "nat", "-A", stale, "-p", "tcp", "--dport", "8080", "-j", "DNAT", "--to-destination", "10.99.0.200:80")
	inNS(t, ns, "iptables", "-t", "nat", "-I", "CNI-HOSTPORT-DNAT", "1", "-m", "comment", "--comment", `dnat name: "oldnet" id: "dead"`,
		"-m", "multiport", "-p", "tcp", "--destination-ports", "8080", "-j", stale)
	err := e.Check(c, me)
	if err == nil || !strings.Contains(err.Error(), "shadowed by oldnet/dead") {
		t.Fatalf("CHECK: %v", err)
	}
	// The next ADD takes the port back and CHECK passes.
	if _, err := e.Add(c, me); err != nil {
		t.Fatal(err)
	}
	if err := e.Check(c, me); err != nil {
		t.Fatal(err)
	}
	if out := inNS(t, ns, "iptables", "-t", "nat", "-S"); strings.Contains(out, stale) {
		t.Fatalf("stale chain survived the takeover:\n%s", out)
	}
}

func TestKernelRejectChangesNothing(t *testing.T) {
	ns := netns(t)
	e, _ := newEngine(t, ns)
	c := conf(t, "", `{"hostPort":8080,"containerPort":80,"protocol":"tcp"}`, "10.99.0.5/16")
	if _, err := e.Add(c, hostport.Owner{Network: "knet", ContainerID: "first"}); err != nil {
		t.Fatal(err)
	}
	before := inNS(t, ns, "iptables-save", "-t", "nat")
	r := conf(t, `"conflictPolicy":"reject",`, `{"hostPort":8080,"containerPort":80,"protocol":"tcp"}`, "10.99.0.6/16")
	_, err := e.Add(r, hostport.Owner{Network: "knet", ContainerID: "second"})
	var ce *types.Error
	if !errors.As(err, &ce) || !strings.Contains(ce.Msg, "knet/first") || !strings.Contains(ce.Msg, "10.99.0.5:80") {
		t.Fatalf("reject error: %v", err)
	}
	if after := inNS(t, ns, "iptables-save", "-t", "nat"); stripComments(after) != stripComments(before) {
		t.Fatalf("reject changed the table:\n%s\n---\n%s", before, after)
	}

	// Dual-stack: the conflict is in IPv6 only; IPv4 must not be applied either.
	v6 := conf(t, "", `{"hostPort":7070,"containerPort":80,"protocol":"tcp"}`, "fd00:99::7/64")
	if _, err := e.Add(v6, hostport.Owner{Network: "knet", ContainerID: "v6only"}); err != nil {
		t.Fatal(err)
	}
	before4 := inNS(t, ns, "iptables-save", "-t", "nat")
	dual := conf(t, `"conflictPolicy":"reject",`, `{"hostPort":7070,"containerPort":80,"protocol":"tcp"}`, "10.99.0.8/16", "fd00:99::8/64")
	if _, err := e.Add(dual, hostport.Owner{Network: "knet", ContainerID: "dual"}); err == nil {
		t.Fatal("dual-stack ADD conflicting in IPv6 was not rejected")
	}
	if after := inNS(t, ns, "iptables-save", "-t", "nat"); stripComments(after) != stripComments(before4) {
		t.Fatalf("a reject in IPv6 changed the IPv4 table:\n%s\n---\n%s", before4, after)
	}
}

func stripComments(s string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if !strings.HasPrefix(l, "#") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func TestKernelGC(t *testing.T) {
	ns := netns(t)
	e, _ := newEngine(t, ns)
	for i, id := range []string{"live", "dead1", "dead2"} {
		c := conf(t, "", `{"hostPort":`+[]string{"8001", "8002", "8003"}[i]+`,"containerPort":80,"protocol":"tcp"}`, "10.99.0.5/16")
		if _, err := e.Add(c, hostport.Owner{Network: "knet", ContainerID: id}); err != nil {
			t.Fatal(err)
		}
	}
	other := conf(t, "", `{"hostPort":8004,"containerPort":80,"protocol":"tcp"}`, "10.99.0.5/16")
	other.Network = "othernet"
	if _, err := e.Add(other, hostport.Owner{Network: "othernet", ContainerID: "x"}); err != nil {
		t.Fatal(err)
	}
	removed, err := e.GC("knet", map[string]bool{"live": true}, nil)
	if err != nil || len(removed) != 2 {
		t.Fatalf("GC removed %v: %v", removed, err)
	}
	out := inNS(t, ns, "iptables", "-t", "nat", "-S", "CNI-HOSTPORT-DNAT")
	if !strings.Contains(out, `id: \"live\"`) || !strings.Contains(out, `name: \"othernet\"`) || strings.Contains(out, "dead") {
		t.Fatalf("after GC:\n%s", out)
	}
	if removed, err = e.GC("knet", map[string]bool{}, nil); err != nil || len(removed) != 1 {
		t.Fatalf("GC with an empty list removed %v: %v", removed, err)
	}
}

func TestLockTimesOutAndSurvivesKill(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	held, err := lock.Acquire(path, lock.Exclusive, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	e := &Engine{Runner: iptablestest.MustNew(nil), LockPath: path, LockTimeout: 200 * time.Millisecond}
	_, err = e.GC("x", nil, nil)
	var ce *types.Error
	if !errors.As(err, &ce) || ce.Code != types.ErrTryAgainLater || !strings.Contains(ce.Msg, "timed out") {
		t.Fatalf("want a try-again-later CNI error, got %v", err)
	}
	held.Release()
	// A holder killed with SIGKILL releases the lock: flock belongs to the open file.
	cmd := exec.Command("flock", "-o", path, "sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Skip("flock(1) not available")
	}
	time.Sleep(200 * time.Millisecond)
	if _, err := lock.Acquire(path, lock.Exclusive, 100*time.Millisecond); err == nil {
		t.Fatal("lock acquired while another process holds it")
	}
	cmd.Process.Kill()
	cmd.Wait()
	l, err := lock.Acquire(path, lock.Exclusive, time.Second)
	if err != nil {
		t.Fatalf("lock not released after SIGKILL: %v", err)
	}
	l.Release()
}

func TestKernelGCRemovesOrphansKnownFromCacheOrOtherFamily(t *testing.T) {
	ns := netns(t)
	e, _ := newEngine(t, ns)
	owner := hostport.Owner{Network: "knet", ContainerID: "gone"}
	c := conf(t, "", `{"hostPort":8080,"containerPort":80,"protocol":"tcp"}`, "10.99.0.5/16", "fd00:99::5/64")
	if _, err := e.Add(c, owner); err != nil {
		t.Fatal(err)
	}
	chain := hostport.ChainName(owner)
	// The IPv4 jump is lost (a hand edit, a half-failed upstream DEL): the IPv4 chain is an
	// orphan, known only because the IPv6 jump still names the owner.
	out := inNS(t, ns, "iptables", "-t", "nat", "-S", "CNI-HOSTPORT-DNAT")
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "-A CNI-HOSTPORT-DNAT") {
			args, _ := iptables.SplitArgs(strings.Replace(l, "-A", "-D", 1))
			inNS(t, ns, append([]string{"iptables", "-t", "nat"}, args...)...)
		}
	}
	// A second orphan whose owner only the runtime's cache remembers.
	cached := hostport.Owner{Network: "knet", ContainerID: "cachedonly"}
	inNS(t, ns, "iptables", "-t", "nat", "-N", hostport.ChainName(cached))
	removed, err := e.GC("knet", map[string]bool{}, []hostport.Owner{cached})
	if err != nil || len(removed) != 2 {
		t.Fatalf("GC removed %v: %v", removed, err)
	}
	for _, save := range []string{"iptables-save", "ip6tables-save"} {
		if out := inNS(t, ns, save, "-t", "nat"); strings.Contains(out, chain) || strings.Contains(out, hostport.ChainName(cached)) {
			t.Fatalf("%s after GC:\n%s", save, out)
		}
	}
}

func TestSharedLockHoldersRunTogether(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	a, err := lock.Acquire(path, lock.Shared, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	b, err := lock.Acquire(path, lock.Shared, 100*time.Millisecond)
	if err != nil {
		t.Fatalf("a second shared holder waited: %v", err)
	}
	if _, err := lock.Acquire(path, lock.Exclusive, 100*time.Millisecond); err == nil {
		t.Fatal("exclusive lock granted beside shared holders")
	}
	a.Release()
	b.Release()
	x, err := lock.Acquire(path, lock.Exclusive, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lock.Acquire(path, lock.Shared, 100*time.Millisecond); err == nil {
		t.Fatal("shared lock granted beside an exclusive holder")
	}
	x.Release()
}

func TestPortLocksSerialiseOnlyTheSamePort(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	a, err := lock.Acquire(path, lock.Shared, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Release()
	b, err := lock.Acquire(path, lock.Shared, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Release()
	if err := a.Ports([]int64{8080, 53}, time.Second); err != nil {
		t.Fatal(err)
	}
	if err := b.Ports([]int64{9090}, 100*time.Millisecond); err != nil {
		t.Fatalf("another port waited: %v", err)
	}
	if err := b.Ports([]int64{8080}, 100*time.Millisecond); !errors.Is(err, lock.ErrTimeout) {
		t.Fatalf("the same port was granted twice: %v", err)
	}
	a.Release()
	if err := b.Ports([]int64{8080}, time.Second); err != nil {
		t.Fatalf("port not released with its holder: %v", err)
	}
}

// Two ADDs of different ports that each take part of one victim (they run in parallel)
// must not leave the victim's chain behind empty: the later payload fails whole, and the
// replan removes the chain.
func TestKernelInterleavedPartialTakeoversLeaveNoEmptyChain(t *testing.T) {
	ns := netns(t)
	e, _ := newEngine(t, ns)
	victim := hostport.Owner{Network: "knet", ContainerID: "victim"}
	both := conf(t, "", `{"hostPort":53,"containerPort":53,"protocol":"tcp"},{"hostPort":53,"containerPort":53,"protocol":"udp"}`, "10.99.0.5/16")
	if _, err := e.Add(both, victim); err != nil {
		t.Fatal(err)
	}
	ca := conf(t, "", `{"hostPort":53,"containerPort":53,"protocol":"tcp"}`, "10.99.0.6/16")
	cb := conf(t, "", `{"hostPort":53,"containerPort":53,"protocol":"udp"}`, "10.99.0.7/16")
	a, b := hostport.Owner{Network: "knet", ContainerID: "a"}, hostport.Owner{Network: "knet", ContainerID: "b"}
	// Plan both from the same table, as two parallel ADDs would.
	pa, err := e.planAdd(podDesired(ca, a)[0], config.PolicyTakeover)
	if err != nil {
		t.Fatal(err)
	}
	pb, err := e.planAdd(podDesired(cb, b)[0], config.PolicyTakeover)
	if err != nil {
		t.Fatal(err)
	}
	if err := Apply(e.Runner, hostport.V4, pa.res.Tx); err != nil {
		t.Fatal(err)
	}
	var re *iptables.RestoreError
	if err := Apply(e.Runner, hostport.V4, pb.res.Tx); !errors.As(err, &re) {
		t.Fatalf("the second partial takeover applied on a stale plan: %v", err)
	}
	if _, err := e.applyAdd(pb, config.PolicyTakeover, true); err != nil {
		t.Fatalf("replan after the refused payload: %v", err)
	}
	if out := inNS(t, ns, "iptables", "-t", "nat", "-S"); strings.Contains(out, hostport.ChainName(victim)) {
		t.Fatalf("the victim's chain survived both takeovers:\n%s", out)
	}
}

// A stream of overlapping shared holders (a drain's DELs) must not keep an exclusive
// caller (GC, repair, the first ADD) out until it times out.
func TestExclusiveLockIsNotStarvedBySharedHolders(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	stop := make(chan struct{})
	done := make(chan struct{})
	for g := 0; g < 6; g++ {
		go func() {
			defer func() { done <- struct{}{} }()
			for {
				select {
				case <-stop:
					return
				default:
				}
				l, err := lock.Acquire(path, lock.Shared, 10*time.Second)
				if err != nil {
					continue
				}
				time.Sleep(30 * time.Millisecond)
				l.Release()
				time.Sleep(time.Millisecond)
			}
		}()
	}
	time.Sleep(100 * time.Millisecond)
	x, err := lock.Acquire(path, lock.Exclusive, 3*time.Second)
	close(stop)
	x.Release()
	for g := 0; g < 6; g++ {
		<-done
	}
	if err != nil {
		t.Fatalf("exclusive caller starved: %v", err)
	}
}

// CHECK passes right after ADD even when the conditions are not spelled the way iptables
// prints them back (a CIDR with host bits set).
func TestKernelCheckAfterAddWithConditions(t *testing.T) {
	ns := netns(t)
	e, _ := newEngine(t, ns)
	c := conf(t, `"conditionsV4":["-d","192.0.2.1/24"],`, `{"hostPort":8080,"containerPort":80,"protocol":"tcp"}`, "10.99.0.5/16")
	o := hostport.Owner{Network: "knet", ContainerID: "cond"}
	if _, err := e.Add(c, o); err != nil {
		t.Fatal(err)
	}
	if err := e.Check(c, o); err != nil {
		t.Fatalf("CHECK right after ADD: %v", err)
	}
}

// Three ADDs that together take all of one victim, each a different jump of it (31 ports:
// three multiport jumps), planned from the same table: one asserted kept rule per payload
// is enough to leave no empty chain. The first lands; the two others find their asserted
// rule gone and are planned again, the last as the chain's removal.
func TestKernelThreePartialTakeoversLeaveNoEmptyChain(t *testing.T) {
	ns := netns(t)
	e, _ := newEngine(t, ns)
	mappings := func(lo, hi int) string {
		var ms []string
		for p := lo; p <= hi; p++ {
			ms = append(ms, fmt.Sprintf(`{"hostPort":%d,"containerPort":80,"protocol":"tcp"}`, p))
		}
		return strings.Join(ms, ",")
	}
	victim := hostport.Owner{Network: "knet", ContainerID: "victim"}
	if _, err := e.Add(conf(t, "", mappings(1000, 1030), "10.99.0.5/16"), victim); err != nil {
		t.Fatal(err)
	}
	var plans []addPlan
	for i, r := range [][2]int{{1000, 1014}, {1015, 1029}, {1030, 1030}} {
		o := hostport.Owner{Network: "knet", ContainerID: fmt.Sprintf("taker%d", i)}
		p, err := e.planAdd(podDesired(conf(t, "", mappings(r[0], r[1]), fmt.Sprintf("10.99.0.%d/16", 10+i)), o)[0], config.PolicyTakeover)
		if err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(renderTx(t, p.res.Tx), "-C "+hostport.ChainName(victim)); r[0] != 1030 && n != 1 {
			t.Fatalf("taker %d asserts %d rules of the victim, want 1", i, n)
		}
		plans = append(plans, p)
	}
	if err := Apply(e.Runner, hostport.V4, plans[0].res.Tx); err != nil {
		t.Fatal(err)
	}
	var re *iptables.RestoreError
	for i, p := range plans[1:] {
		if err := Apply(e.Runner, hostport.V4, p.res.Tx); !errors.As(err, &re) {
			t.Fatalf("taker %d applied on a stale plan: %v", i+1, err)
		}
	}
	for i, p := range plans[1:] {
		if _, err := e.applyAdd(p, config.PolicyTakeover, true); err != nil {
			t.Fatalf("taker %d planned again: %v", i+1, err)
		}
	}
	if out := inNS(t, ns, "iptables", "-t", "nat", "-S"); strings.Contains(out, hostport.ChainName(victim)) {
		t.Fatalf("the victim's chain survived three takeovers that took all of it:\n%s", out)
	}
}

func renderTx(t *testing.T, tx *iptables.Tx) string {
	t.Helper()
	s, err := tx.Render()
	if err != nil {
		t.Fatal(err)
	}
	return s
}
