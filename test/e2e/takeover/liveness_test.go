package takeover

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	tb "github.com/portguard/portguard/test/testbed"
)

// refusal is what a refused ADD must show: the CNI error code and the words naming the
// port, the live owner and the evidence.
const refusedCode = 100

// A container that still runs never loses its host port to a second container asking for
// the same one (issue 9's repro, on runtimes that do not reserve host ports): the second
// ADD fails with code 100 naming the port, the owner and the evidence, changes nothing, and
// its later DEL leaves the owner working.
func TestLiveOwnerKeepsItsPort(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		// setup ADDs the owner a and returns the network for the contender and its mappings.
		setup func(b *tb.Bed, n *tb.Network, a *tb.Pod) (*tb.Network, []tb.PortMapping)
		// ports the owner serves, checked before and after
		ports []int
	}{
		{"same network", func(b *tb.Bed, n *tb.Network, a *tb.Pod) (*tb.Network, []tb.PortMapping) {
			n.MustAdd(a, tb.TCP(9044, 80))
			return n, []tb.PortMapping{tb.TCP(9044, 80)}
		}, []int{9044}},
		{"other network", func(b *tb.Bed, n *tb.Network, a *tb.Pod) (*tb.Network, []tb.PortMapping) {
			n.MustAdd(a, tb.TCP(9044, 80))
			n2, _ := pgNet(b, tb.NetConfig{IPv4Only: true, Bridge: "cni1"}, nil)
			return n2, []tb.PortMapping{tb.TCP(9044, 80)}
		}, []int{9044}},
		{"partial overlap", func(b *tb.Bed, n *tb.Network, a *tb.Pod) (*tb.Network, []tb.PortMapping) {
			n.MustAdd(a, tb.TCP(9044, 80), tb.TCP(9045, 80))
			return n, []tb.PortMapping{tb.TCP(7070, 80), tb.TCP(9045, 80)}
		}, []int{9044, 9045}},
		{"host IP overlap", func(b *tb.Bed, n *tb.Network, a *tb.Pod) (*tb.Network, []tb.PortMapping) {
			n.MustAdd(a, tb.TCP(9044, 80).On(b.NodeIP4.String()))
			return n, []tb.PortMapping{tb.TCP(9044, 80)} // wildcard overlaps A's host IP
		}, []int{9044}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBed(t)
			n, _ := pgNet(b, tb.NetConfig{}, nil)
			a := b.NewPod("A")
			a.Serve(80)
			n2, want := tc.setup(b, n, a)
			before := map[tb.Family]string{}
			for _, f := range families {
				before[f] = normalizedNAT(t, b, f)
			}

			p := b.NewPod("B")
			p.Serve(80)
			// The runtime's chain up to portguard (bridge, host-local), then portguard
			// directly, so the CNI error code can be read.
			prev := n2.MustAdd(p)
			res, err := reAdd(t, b, n2, p, prev.Stdout, want...)
			if err == nil {
				t.Fatalf("ADD of B on A's live port succeeded:\n%s", res.Stderr)
			}
			var cniErr struct {
				Code int    `json:"code"`
				Msg  string `json:"msg"`
			}
			if json.Unmarshal([]byte(res.Stdout), &cniErr) != nil || cniErr.Code != refusedCode {
				t.Errorf("refused ADD: stdout %q, want a CNI error with code %d", res.Stdout, refusedCode)
			}
			for _, w := range []string{"9044", a.ContainerID, n.Name, a.Path, "pid ", "alive"} {
				if tc.name == "partial overlap" && w == "9044" {
					w = "9045"
				}
				if !strings.Contains(cniErr.Msg, w) {
					t.Errorf("refusal does not name %q: %s", w, cniErr.Msg)
				}
			}
			for _, f := range families {
				if after := normalizedNAT(t, b, f); after != before[f] {
					t.Errorf("%s nat table changed by a refused ADD:\nbefore:\n%s\nafter:\n%s", f, before[f], after)
				}
			}
			// The runtime cleans up the failed start with a DEL.
			n2.MustDel(p)
			for _, f := range families {
				if after := normalizedNAT(t, b, f); after != before[f] {
					t.Errorf("%s nat table changed by the refused pod's DEL:\nbefore:\n%s\nafter:\n%s", f, before[f], after)
				}
				for _, port := range tc.ports {
					if tc.name == "host IP overlap" && f == tb.V6 {
						continue
					}
					ip := b.NodeIP(f)
					wantAnswer(t, b, "tcp", ip, port, "A")
				}
			}
			if err := n.Check(a); err != nil {
				t.Errorf("CHECK of the live owner after the refused ADD and its DEL: %v", err)
			}
		})
	}
}

// An owner that is gone is taken over, whatever shows it gone, and the takeover event says
// why the owner was judged stale.
func TestDeadOwnerIsTakenOver(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		kill   func(b *tb.Bed, n *tb.Network, a *tb.Pod)
		reason string
	}{
		{"netns gone", func(b *tb.Bed, n *tb.Network, a *tb.Pod) { a.Kill() }, "is gone"},
		{"nothing alive in the netns", func(b *tb.Bed, n *tb.Network, a *tb.Pod) { a.StopServing() }, "no process lives"},
		{"address gone", func(b *tb.Bed, n *tb.Network, a *tb.Pod) {
			if out, err := exec.Command("ip", "-n", a.NetNS, "addr", "flush", "dev", "eth0").CombinedOutput(); err != nil {
				t.Fatalf("flush A's addresses: %v: %s", err, out)
			}
		}, "no longer holds"},
		{"no record", func(b *tb.Bed, n *tb.Network, a *tb.Pod) {
			// The pod still runs, but nothing on the node records the attachment: portguard
			// cannot tell it from a leftover (the Kubernetes/podman assumption: an older
			// claim is a stale one).
			os.RemoveAll(filepath.Join(b.StateDir, "attachments"))
			files, _ := filepath.Glob(filepath.Join(b.CacheDir, "results", "*"+a.ContainerID+"*"))
			if len(files) == 0 {
				t.Fatal("no libcni cache file for A: precondition gone")
			}
			for _, f := range files {
				os.Remove(f)
			}
		}, "no record"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBed(t)
			n, _ := pgNet(b, tb.NetConfig{}, nil)
			a := b.NewPod("A")
			a.Serve(80)
			n.MustAdd(a, tb.TCP(9044, 80))
			wantAnswer(t, b, "tcp", b.NodeIP4, 9044, "A")
			tc.kill(b, n, a)
			p := b.NewPod("B")
			p.Serve(80)
			res := n.MustAdd(p, tb.TCP(9044, 80))
			for _, f := range families {
				wantChains(t, b, f, p.Chain(n))
				wantAnswer(t, b, "tcp", b.NodeIP(f), 9044, "B")
			}
			evs := takeoverEvents(res.Stderr)
			if len(evs) != 2 {
				t.Fatalf("%d takeover events, want 2:\n%s", len(evs), res.Stderr)
			}
			for _, e := range evs {
				ev := e.Takeover.Evidence
				if ev == nil || ev.State != "stale" || !strings.Contains(ev.Reason, tc.reason) {
					t.Errorf("takeover evidence %+v: want stale, reason containing %q", ev, tc.reason)
				}
			}
			if err := n.Check(p); err != nil {
				t.Errorf("CHECK of B: %v", err)
			}
		})
	}
}

// conflictPolicy force takes the port even from a live owner, and logs that it was alive.
func TestForceTakesFromLiveOwner(t *testing.T) {
	b := newBed(t)
	n, _ := pgNet(b, tb.NetConfig{}, force)
	a, p := servingPods(b)
	n.MustAdd(a, tb.TCP(9044, 80))
	res := n.MustAdd(p, tb.TCP(9044, 80))
	for _, f := range families {
		wantChains(t, b, f, p.Chain(n))
		wantAnswer(t, b, "tcp", b.NodeIP(f), 9044, "B")
	}
	evs := takeoverEvents(res.Stderr)
	if len(evs) != 2 {
		t.Fatalf("%d takeover events, want 2:\n%s", len(evs), res.Stderr)
	}
	for _, e := range evs {
		if ev := e.Takeover.Evidence; ev == nil || ev.State != "alive" || ev.PID == 0 || ev.Netns != a.Path {
			t.Errorf("forced takeover evidence %+v: want alive with A's netns and a pid", ev)
		}
	}
}

// Ten pairs of live contenders race for ten ports, all twenty ADDs at once: every port ends
// with exactly one claim (in each family, the same pod), every error is a refusal, and the
// winner answers.
func TestLiveContendersRace(t *testing.T) {
	b := newBed(t)
	n, _ := pgNet(b, tb.NetConfig{}, nil)
	n.MustAdd(b.NewPod("warm-up")) // creates and pins the bridge (see TestParallelAddsEndWithOneClaim)
	const ports = 10
	pods := make([]*tb.Pod, 2*ports)
	for i := range pods {
		pods[i] = b.NewPod(fmt.Sprintf("p%02d", i))
		pods[i].Serve(80)
	}
	errs := make([]error, len(pods))
	var wg sync.WaitGroup
	for i, p := range pods {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = n.Add(p, tb.TCP(9000+i/2, 80))
		}()
	}
	wg.Wait()
	for i := 0; i < ports; i++ {
		pair := []*tb.Pod{pods[2*i], pods[2*i+1]}
		var won []*tb.Pod
		for k, p := range pair {
			err := errs[2*i+k]
			switch {
			case err == nil:
				won = append(won, p)
			case !strings.Contains(err.Error(), "host port in use by a live attachment"):
				t.Errorf("ADD %s on %d: %v (not a refusal)", p.Name, 9000+i, err)
			}
		}
		if len(won) != 1 {
			t.Errorf("port %d: %d ADDs succeeded, want exactly one: %v", 9000+i, len(won), errs[2*i:2*i+2])
			continue
		}
		for _, f := range families {
			var holders []string
			for _, p := range pair {
				if len(jumps(b, f, p.Chain(n))) > 0 {
					holders = append(holders, p.Name)
				}
			}
			if len(holders) != 1 || holders[0] != won[0].Name {
				t.Errorf("%s port %d: claims held by %v, want only %s", f, 9000+i, holders, won[0].Name)
			}
			wantAnswer(t, b, "tcp", b.NodeIP(f), 9000+i, won[0].Name)
		}
	}
}

// A pod dies without DEL, its address is given to a new pod: the dead pod's host port now
// reaches the new, unrelated pod. audit shows the claim's owner as stale and reports the
// address reuse naming the new holder.
func TestAuditReportsAddressReuse(t *testing.T) {
	b := newBed(t)
	n, _ := pgNet(b, tb.NetConfig{IPv4Only: true}, nil)
	a := b.NewPod("A")
	a.Serve(80)
	n.MustAdd(a, tb.TCP(9044, 80))
	a.Kill()
	// host-local forgets A's address (as after an IPAM reset) and hands it to B.
	if err := os.Remove(filepath.Join(b.IPAMDir, n.Name, a.IP4.String())); err != nil {
		t.Fatalf("release A's address: %v", err)
	}
	p := b.NewPod("B")
	p.Serve(80)
	ones, _ := n.Subnet4.Mask.Size()
	if _, err := n.Call("add", p, tb.CallOptions{IPs: []string{fmt.Sprintf("%s/%d", a.IP4, ones)}}); err != nil {
		t.Fatal(err)
	}
	wantAnswer(t, b, "tcp", b.NodeIP4, 9044, "B") // the harm: A's stale port reaches B

	res, err := b.Ctl("audit", "--family", "4", "-o", "json")
	if err == nil {
		t.Fatalf("audit exited 0 with a reused address:\n%s", res.Stdout)
	}
	var rep struct {
		Families []struct {
			Ports []struct {
				Claims []struct {
					ContainerID string `json:"containerID"`
					OwnerState  string `json:"ownerState"`
				} `json:"claims"`
			} `json:"ports"`
			Problems []struct {
				Kind, ContainerID, Message string
			} `json:"problems"`
		} `json:"families"`
	}
	if err := json.Unmarshal([]byte(res.Stdout), &rep); err != nil || len(rep.Families) != 1 {
		t.Fatalf("audit -o json: %v\n%s", err, res.Stdout)
	}
	fa := rep.Families[0]
	if len(fa.Ports) != 1 || len(fa.Ports[0].Claims) != 1 || fa.Ports[0].Claims[0].OwnerState != "stale" {
		t.Errorf("claims: %+v, want A's claim with owner state stale", fa.Ports)
	}
	found := false
	for _, pr := range fa.Problems {
		if pr.Kind == "address-reused" && pr.ContainerID == a.ContainerID && strings.Contains(pr.Message, p.ContainerID) {
			found = true
		}
	}
	if !found {
		t.Errorf("no address-reused problem for A naming B: %+v", fa.Problems)
	}
	table, _ := b.Ctl("audit", "--family", "4")
	if !strings.Contains(table.Stdout, "address-reused") || !strings.Contains(table.Stdout, "stale") {
		t.Errorf("audit table lacks the owner state or the problem:\n%s", table.Stdout)
	}
}

// repair never removes a live owner's claim: two live pods on one port (upstream portmap
// let the second in behind the first) are left alone and reported; once the second is
// dead, repair keeps the first although upstream's rule (keep the last jump) would not.
func TestRepairKeepsLiveOwners(t *testing.T) {
	b := newBed(t)
	n := b.Network(tb.NetConfig{PortPlugin: "portmap", IPv4Only: true}) // upstream v1.10.0
	a, p := servingPods(b)
	n.MustAdd(a, tb.TCP(9044, 80))
	n.MustAdd(p, tb.TCP(9044, 80))
	before := normalizedNAT(t, b, tb.V4)

	res, err := b.Ctl("repair", "--family", "4")
	if err == nil || !strings.Contains(res.Stdout, "several live claimants") {
		t.Errorf("repair with two live claimants: err %v, want exit 1 and a report:\n%s", err, res.Stdout)
	}
	if after := normalizedNAT(t, b, tb.V4); after != before {
		t.Errorf("repair changed the table with two live claimants:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	wantAnswer(t, b, "tcp", b.NodeIP4, 9044, "A")

	p.Kill()
	res, err = b.Ctl("repair", "--family", "4")
	if err != nil {
		t.Fatalf("repair: %v\n%s%s", err, res.Stdout, res.Stderr)
	}
	wantOnlyJumps(t, b, tb.V4, map[string]int{a.Chain(n): 1})
	wantAnswer(t, b, "tcp", b.NodeIP4, 9044, "A")
}

// The DEL of a container whose ADD was refused leaves the live owner's UDP flows in
// conntrack: it flushes only the flows its own pod address answers.
func TestRefusedDelKeepsOwnersUDPFlows(t *testing.T) {
	b := newBed(t)
	n, _ := pgNet(b, tb.NetConfig{IPv4Only: true}, nil)
	a, p := servingPods(b)
	n.MustAdd(a, tb.UDP(9046, 80))
	if got, err := tb.SendUDPFromPort(b.Client, 40946, b.NodeIP4.String(), 9046); err != nil || got != "A" {
		t.Fatalf("udp 9046 from the client: %q, %v; want A", got, err)
	}
	flows := func() string {
		out, _ := b.Exec(b.Node, "conntrack", "-L", "-p", "udp", "--orig-port-dst", "9046")
		return strings.TrimSpace(out)
	}
	if flows() == "" {
		t.Fatal("no conntrack entry for the owner's flow: precondition gone")
	}
	if _, err := n.Add(p, tb.UDP(9046, 80)); err == nil {
		t.Fatal("ADD of B on A's live UDP port succeeded")
	}
	// The runtime's DEL of the failed start carries the same port mappings.
	if _, err := n.Call("del", p, tb.CallOptions{Mappings: []tb.PortMapping{tb.UDP(9046, 80)}}); err != nil {
		t.Fatal(err)
	}
	if flows() == "" {
		t.Error("the refused container's DEL flushed the live owner's UDP flow")
	}
	n.MustDel(a)
	if f := flows(); f != "" {
		t.Errorf("the owner's DEL left its flow in conntrack:\n%s", f)
	}
}
