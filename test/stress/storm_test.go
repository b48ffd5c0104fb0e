package stress

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/portguard/portguard/pkg/backend/nftables"
	"github.com/portguard/portguard/pkg/hostport"
)

// The storm's node: a bridge with the node's address; pods are namespaces on veths.
const (
	stormBridge   = "pgsbr0"
	stormNodeIP   = "198.18.240.1"
	stormPrefix   = "198.18.240."
	stormPodPort  = 80
	stormDialWait = 2 * time.Second
)

// pod is a namespace on the storm bridge whose socat answers every TCP connection on
// port 80 with the pod's name.
type pod struct {
	name, ns, ip string
}

func (n *node) setupBridge() {
	n.t.Helper()
	n.must("ip", "-n", n.ns, "link", "add", stormBridge, "type", "bridge")
	n.must("ip", "-n", n.ns, "addr", "add", stormNodeIP+"/24", "dev", stormBridge)
	n.must("ip", "-n", n.ns, "link", "set", stormBridge, "up")
}

// newPod wires pod k (address 198.18.240.<host>) to the bridge and starts its responder.
func (n *node) newPod(k int, name string, host int) *pod {
	n.t.Helper()
	p := &pod{name: name, ns: fmt.Sprintf("pgs-%s-p%d", n.id, k), ip: stormPrefix + strconv.Itoa(host)}
	n.addNetns(p.ns)
	veth := fmt.Sprintf("pv%d", k)
	n.must("ip", "-n", n.ns, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", p.ns)
	n.must("ip", "-n", n.ns, "link", "set", veth, "master", stormBridge, "up")
	n.must("ip", "-n", p.ns, "addr", "add", p.ip+"/24", "dev", "eth0")
	n.must("ip", "-n", p.ns, "link", "set", "eth0", "up")
	n.must("ip", "-n", p.ns, "route", "add", "default", "via", stormNodeIP)
	cmd := exec.Command("ip", "netns", "exec", p.ns, "socat",
		fmt.Sprintf("TCP4-LISTEN:%d,reuseaddr,fork", stormPodPort), "EXEC:/bin/echo "+name)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
	if err := cmd.Start(); err != nil {
		n.t.Fatal(err)
	}
	n.mu.Lock()
	n.procs = append(n.procs, cmd)
	n.mu.Unlock()
	if err := waitListening(cmd.Process.Pid, stormPodPort); err != nil {
		n.t.Fatalf("responder in pod %s: %v", name, err)
	}
	return p
}

// waitListening polls the socket table of the process's namespace until socat listens.
func waitListening(pid, port int) error {
	want := fmt.Sprintf(":%04X", port)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if err != nil {
			return fmt.Errorf("responder exited: %v", err)
		}
		if strings.TrimSpace(string(comm)) == "socat" {
			data, _ := os.ReadFile(fmt.Sprintf("/proc/%d/net/tcp", pid))
			for _, line := range strings.Split(string(data), "\n")[1:] {
				f := strings.Fields(line)
				if len(f) > 3 && strings.HasSuffix(f[1], want) && f[3] == "0A" {
					return nil
				}
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	return errors.New("not listening after 5s")
}

// dialNode connects from the node namespace to the node's own address on port and returns
// what the answering pod said. Only the storm node's bridge address is ever dialled.
func (n *node) dialNode(port int) (string, error) { return n.dialAddr(stormNodeIP, port) }

// dialAddr connects from the node namespace to one of the node's own addresses (ip) on
// port and returns what the answering pod said.
func (n *node) dialAddr(ip string, port int) (string, error) {
	h, err := ns.GetNS("/var/run/netns/" + n.ns)
	if err != nil {
		return "", err
	}
	defer h.Close()
	var conn net.Conn
	addr := net.JoinHostPort(ip, strconv.Itoa(port))
	err = h.Do(func(ns.NetNS) error {
		var err error
		conn, err = net.DialTimeout("tcp", addr, stormDialWait)
		return err
	})
	if err != nil {
		return "", err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(stormDialWait))
	b, err := io.ReadAll(conn)
	if err != nil && len(b) == 0 {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

// TestStorm: 50 ADDs and 50 DELs of distinct attachments at once, 30 of the ADDs in 10
// groups contending for 10 host ports (some of those ports held before by an attachment that
// survives, or that is DELeted in the same storm). Every call exits 0; the kernel then holds
// exactly one claim per contested port, by one of its contenders; nothing of the DELeted
// attachments; the survivors keep their other ports; foreign rules are byte-identical; and a
// connection from the node to its own address on every claimed port is answered by the
// holder.
func TestStorm(t *testing.T) {
	require(t, "socat")
	runStorm(t, iptablesKernel)
}

// TestStormNFTables is TestStorm on the nftables backend: the same storm and model, and
// beyond it the guard maps agree with the claims in both families (one guard per claimed
// port, none for a free one), each holder has its masquerade entry and nothing of a
// DELeted attachment stays, and a foreign nftables table is byte-identical too.
func TestStormNFTables(t *testing.T) {
	require(t, "socat", "nft")
	runStorm(t, nftablesKernel)
}

func runStorm(t *testing.T, k kernel) {
	start := time.Now()
	n := newNode(t, false)
	n.setupBridge()
	n.loadForeign()
	if k.backend == "nftables" {
		n.loadForeignNFT()
	}
	first, err := k.observe(n)
	if err != nil {
		t.Fatal(err)
	}
	foreignBefore := map[hostport.Family]string{}
	for _, f := range hostport.Families {
		foreignBefore[f] = first.foreign(f)
	}

	const net1, net2 = "storm", "storm-b"
	tcp := func(port int) mapping { return mapping{"tcp", port, stormPodPort} }
	var adds, dels, survivors []*attachment
	contenders := map[int][]*attachment{} // contested port -> new ADDs claiming it
	groupSizes := []int{2, 2, 2, 2, 3, 3, 3, 4, 4, 5}
	realHost, fakeHost := 10, 100
	newAtt := func(name, network string, real bool, maps ...mapping) *attachment {
		host := fakeHost
		if real {
			host, realHost = realHost, realHost+1
		} else {
			fakeHost++
		}
		// conflictPolicy force: the contenders' pods all live, and the storm is about locks
		// and transactions; the live-owner rule has its own tests (test/e2e/takeover).
		return &attachment{Name: name, Network: network, ID: "storm-" + name,
			IP4: stormPrefix + strconv.Itoa(host) + "/24", Maps: maps, Policy: "force", Backend: k.backend}
	}
	for g, size := range groupSizes {
		port := 20001 + g
		for i := 0; i < size; i++ {
			a := newAtt(fmt.Sprintf("c%d-%d", g, i), net1, true, tcp(port))
			adds = append(adds, a)
			contenders[port] = append(contenders[port], a)
		}
	}
	for i := 0; i < 20; i++ {
		adds = append(adds, newAtt(fmt.Sprintf("u%d", i), net1, true, tcp(20101+i)))
	}
	// Survivors: s0-s2 lose their only port, s3-s4 one of two, s5 (another network) nothing.
	for i := 0; i < 3; i++ {
		survivors = append(survivors, newAtt(fmt.Sprintf("s%d", i), net1, false, tcp(20001+i)))
	}
	for i := 3; i < 5; i++ {
		survivors = append(survivors, newAtt(fmt.Sprintf("s%d", i), net1, true, tcp(20001+i), tcp(20200+i)))
	}
	survivors = append(survivors, newAtt("s5", net2, true, tcp(20205)))
	// DELeted in the storm: d0-d2 hold contested ports, d3-d7 ports of uncontested ADDs.
	for i := 0; i < 50; i++ {
		port := 21000 + i
		switch {
		case i < 3:
			port = 20006 + i
		case i < 8:
			port = 20101 + i - 3
		}
		dels = append(dels, newAtt(fmt.Sprintf("d%d", i), net1, false, tcp(port)))
	}
	byChain := map[string]*attachment{}
	for _, as := range [][]*attachment{adds, dels, survivors} {
		for _, a := range as {
			byChain[a.chain()] = a
		}
	}

	// Pods for every attachment that may answer: the 50 ADDs and the survivors keeping ports.
	var withPods []*attachment
	withPods = append(withPods, adds...)
	withPods = append(withPods, survivors[3:]...)
	pods := map[string]*pod{}
	var pmu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for k, a := range withPods {
		wg.Add(1)
		go func(k int, a *attachment) {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			host, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(a.IP4, stormPrefix), "/24"))
			p := n.newPod(k, a.Name, host)
			pmu.Lock()
			pods[a.Name] = p
			pmu.Unlock()
		}(k, a)
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	netnsOf := func(a *attachment) string {
		if p := pods[a.Name]; p != nil {
			return p.ns
		}
		return ""
	}
	setup := time.Since(start)

	// Before the storm: the survivors and the attachments the storm DELetes.
	for _, a := range append(append([]*attachment(nil), survivors...), dels...) {
		if r := n.call(callSpec{Verb: "ADD", ID: a.ID, Stdin: a.netConf(60, nil), NetNS: netnsOf(a)}); r.Exit != 0 {
			t.Fatalf("ADD %s before the storm: %s", a.Name, r)
		}
	}
	preload := time.Since(start) - setup

	// The storm: 100 calls released at once.
	type job struct {
		verb string
		a    *attachment
	}
	var jobs []job
	for i := 0; i < 50; i++ {
		jobs = append(jobs, job{"ADD", adds[i]}, job{"DEL", dels[i]})
	}
	results := make([]callResult, len(jobs))
	gate := make(chan struct{})
	stormStart := time.Now()
	for i, j := range jobs {
		wg.Add(1)
		go func(i int, j job) {
			defer wg.Done()
			<-gate
			results[i] = n.call(callSpec{Verb: j.verb, ID: j.a.ID, Stdin: j.a.netConf(60, nil), NetNS: netnsOf(j.a), Timeout: 120 * time.Second})
		}(i, j)
	}
	close(gate)
	wg.Wait()
	storm := time.Since(stormStart)
	var slowest time.Duration
	for i, r := range results {
		if r.Exit != 0 || r.Err != nil {
			t.Errorf("%s %s: %s", jobs[i].verb, jobs[i].a.Name, r)
		}
		slowest = max(slowest, r.Dur)
	}

	// The model. Contested ports: one contender holds each (which one is the storm's choice).
	o, err := k.observe(n)
	if err != nil {
		t.Fatal(err)
	}
	want := holdings{}
	kernel := o.holdings(hostport.V4)
	for g := range groupSizes {
		port := 20001 + g
		key := "tcp/" + strconv.Itoa(port)
		var holders []*attachment
		for _, c := range contenders[port] {
			if kernel[c.chain()][key] {
				holders = append(holders, c)
			}
		}
		if len(holders) != 1 {
			var names []string
			for _, h := range holders {
				names = append(names, h.Name)
			}
			t.Errorf("contested %s: held by %d of its contenders %v, want exactly 1", key, len(holders), names)
			continue
		}
		want[holders[0].chain()] = map[string]bool{key: true}
	}
	for _, a := range adds[30:] {
		want[a.chain()] = map[string]bool{a.Maps[0].key(): true}
	}
	for _, a := range survivors[3:5] {
		want[a.chain()] = map[string]bool{a.Maps[1].key(): true}
	}
	want[survivors[5].chain()] = map[string]bool{survivors[5].Maps[0].key(): true}

	for _, p := range o.verify(hostport.V4, want, byChain) {
		t.Error(p)
	}
	if k.backend != "" {
		for _, p := range o.verify(hostport.V6, holdings{}, byChain) {
			t.Error(p)
		}
	}
	for _, d := range dels {
		if raw := o.dump(); strings.Contains(raw, d.chain()) || strings.Contains(raw, strconv.Quote(nftables.OwnerComment(d.owner()))) {
			t.Errorf("DELeted %s: chain %s or its elements still in the table", d.Name, d.chain())
		}
	}
	if ipt, ok := o.(iptSnapshot); ok && strings.Contains(ipt[hostport.V6].raw, hostport.ChainPrefix) {
		t.Errorf("IPv6 table gained CNI-DN chains (no pod has IPv6):\n%s", ipt[hostport.V6].raw)
	}
	if h := o.holdings(hostport.V6); len(h) > 0 {
		t.Errorf("IPv6 claims (no pod has IPv6): %s", h.describe(byChain))
	}
	for _, f := range hostport.Families {
		if got := o.foreign(f); got != foreignBefore[f] {
			t.Errorf("%s foreign rules changed:\nbefore\n%s\nafter\n%s", f, foreignBefore[f], got)
		}
	}

	// Packets: the node's own address on each claimed port reaches the holder.
	type probe struct {
		port int
		want string
	}
	var probes []probe
	for c, ks := range want {
		for k := range ks {
			port, _ := strconv.Atoi(strings.TrimPrefix(k, "tcp/"))
			probes = append(probes, probe{port, byChain[c].Name})
		}
	}
	sort.Slice(probes, func(i, j int) bool { return probes[i].port < probes[j].port })
	answers := make([]string, len(probes))
	errs := make([]error, len(probes))
	dialStart := time.Now()
	for i, p := range probes {
		wg.Add(1)
		go func(i int, p probe) {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			// Only "no answer at all" is tried again (a new flow each time): on a loaded
			// machine a responder's fork can miss the read deadline. A wrong answer fails.
			for try := 0; try < 3; try++ {
				if answers[i], errs[i] = n.dialNode(p.port); errs[i] == nil {
					break
				}
			}
		}(i, p)
	}
	wg.Wait()
	for i, p := range probes {
		if errs[i] != nil || answers[i] != p.want {
			t.Errorf("%s:%d answered %q (%v), want %q", stormNodeIP, p.port, answers[i], errs[i], p.want)
		}
	}
	if t.Failed() {
		t.Logf("table after the storm:\n%s", o.dump())
	}
	t.Logf("storm: %d calls (%d ADD, %d DEL) in %s, slowest call %s; %d ports answered by their holder; "+
		"setup %s (%d pods), preload %d ADDs %s, probes %s, total %s",
		len(jobs), 50, 50, storm.Round(time.Millisecond), slowest.Round(time.Millisecond), len(probes),
		setup.Round(time.Millisecond), len(withPods), len(survivors)+len(dels), preload.Round(time.Millisecond),
		time.Since(dialStart).Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
}
