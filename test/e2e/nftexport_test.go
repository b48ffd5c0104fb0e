package e2e

import (
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	tb "github.com/portguard/portguard/test/testbed"
)

// watch dials addr:port from the client every few milliseconds until stop is closed and
// counts the attempts and the ones not answered by want.
func watch(proto, ns, addr string, port int, want string, stop <-chan struct{}, wg *sync.WaitGroup) (tries, misses *atomic.Int64) {
	tries, misses = new(atomic.Int64), new(atomic.Int64)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			got, err := tb.Dial(proto, ns, addr, port)
			tries.Add(1)
			if err != nil || got != want {
				misses.Add(1)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	return tries, misses
}

// exportBed: two pods on a portguard network with the nftables backend (A: TCP and UDP
// on every address; B: TCP on one node address), answering in both families.
func exportBed(t *testing.T) (b *tb.Bed, n *tb.Network, a, c *tb.Pod) {
	t.Helper()
	b, n, _ = nftBed(t)
	a, c = b.NewPod("A"), b.NewPod("B")
	a.Serve(80)
	c.Serve(80)
	n.MustAdd(a, tb.TCP(8100, 80), tb.UDP(8101, 80))
	n.MustAdd(c, tb.TCP(8102, 80).On(b.NodeIP4.String()))
	for _, f := range families {
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8100, "A")
		expectAnswer(t, "udp", b.Client, b.NodeIP(f).String(), 8101, "A")
	}
	expectAnswer(t, "tcp", b.Client, b.NodeIP4.String(), 8102, "B")
	return b, n, a, c
}

// export --to portmap-nftables: --dry-run prints the script and changes nothing; the export
// writes upstream's layout and deletes portguard's table in one transaction, so a client
// connecting all along is never refused; then upstream portmap (installed in portguard's
// place, same conflist) passes CHECK, which it failed before the export, and its DEL
// removes the exported rules of its pod only. Foreign tables are untouched.
func TestNFTExportToUpstreamNFTables(t *testing.T) {
	t.Parallel()
	b, n, a, c := exportBed(t)
	foreign := foreignTables(t, b)
	before := ruleset(t, b)
	dry, code := ctl(t, b, "export", "--to", "portmap-nftables", "--dry-run")
	if code != 0 || !strings.Contains(dry.Stdout, "add rule ip cni_hostport hostports tcp dport 8100 dnat to ") ||
		!strings.Contains(dry.Stdout, "add rule ip cni_hostport hostports ip daddr "+b.NodeIP4.String()+" tcp dport 8102") ||
		!strings.Contains(dry.Stdout, "delete table inet portguard") {
		t.Fatalf("export --dry-run: exit %d\n%s%s", code, dry.Stdout, dry.Stderr)
	}
	if after := ruleset(t, b); after != before {
		t.Fatalf("export --dry-run changed the ruleset")
	}

	// Upstream's CHECK fails while the claims are portguard's: what it checks is its own.
	b.InstallPlugin("portguard", b.Bins.Portmap)
	if err := n.Check(a); err == nil {
		t.Fatalf("upstream CHECK passed before the export: the test could not tell")
	}
	b.InstallPlugin("portguard", tb.PortguardBinary(t))

	exportWhileConnecting(t, b, b.NodeIP4.String(), "portmap-nftables")
	for _, f := range families {
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8100, "A")
		expectAnswer(t, "udp", b.Client, b.NodeIP(f).String(), 8101, "A")
	}
	expectAnswer(t, "tcp", b.Client, b.NodeIP4.String(), 8102, "B")

	// audit reads the exported rules back as upstream's claims of live owners.
	rep, code := nftAudit(t, b)
	seen := 0
	for _, fa := range rep.Families {
		for _, pc := range fa.Ports {
			for _, cl := range pc.Claims {
				if fa.Backend == "nftables" && strings.HasPrefix(cl.Chain, "ip") && cl.OwnerState == "alive" {
					seen++
				}
			}
		}
	}
	if code != 0 || seen != 5 {
		t.Errorf("audit after the export: exit %d, %d live upstream claims (want 5: A tcp+udp in both families, B)", code, seen)
	}

	// The downgrade: upstream's binary in portguard's place.
	b.InstallPlugin("portguard", b.Bins.Portmap)
	// Only A: B's one mapping is IPv4's, while upstream's CHECK with snat wants masquerade
	// rules for every address of the pod, IPv6 too, an address portguard's table never
	// held (docs/install.md, downgrade).
	if err := n.Check(a); err != nil {
		t.Errorf("upstream CHECK of A after the export: %v", err)
	}
	n.MustDel(a)
	upstream := b.MustExec(b.Node, "nft", "list", "table", "ip", "cni_hostport") + b.MustExec(b.Node, "nft", "list", "table", "ip6", "cni_hostport")
	if strings.Contains(upstream, a.ContainerID) || !strings.Contains(upstream, c.ContainerID) {
		t.Errorf("after upstream's DEL of A (want B's rules only):\n%s", upstream)
	}
	for _, f := range families {
		expectNoAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8100)
	}
	expectAnswer(t, "tcp", b.Client, b.NodeIP4.String(), 8102, "B")
	if got := foreignTables(t, b); got != foreign {
		t.Errorf("foreign tables changed by the export:\n%s\n---\n%s", foreign, got)
	}
}

// export --to portmap-iptables: upstream's CNI-HOSTPORT-DNAT/CNI-DN-<hash> chains with the
// names upstream computes, portguard's table gone, a client connecting all along is never
// refused; upstream portmap with "backend": "iptables" passes CHECK and its DEL removes the
// pod's chain.
func TestNFTExportToUpstreamIPTables(t *testing.T) {
	t.Parallel()
	b, n, a, _ := exportBed(t)
	foreign := foreignTables(t, b)
	exportWhileConnecting(t, b, b.NodeIP6.String(), "portmap-iptables")
	for _, f := range families {
		if got := jumpsTo(b, f, a.Chain(n)); len(got) == 0 {
			t.Errorf("%s: no jump to %s (upstream's chain name of A)", f, a.Chain(n))
		}
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8100, "A")
		expectAnswer(t, "udp", b.Client, b.NodeIP(f).String(), 8101, "A")
	}
	expectAnswer(t, "tcp", b.Client, b.NodeIP4.String(), 8102, "B")

	conf, err := os.ReadFile(n.Path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(n.Path, []byte(strings.Replace(string(conf), `"backend": "nftables"`, `"backend": "iptables"`, 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	b.InstallPlugin("portguard", b.Bins.Portmap)
	// Only A: B's one mapping is IPv4's, so nothing of B is in ip6tables, while upstream's
	// iptables CHECK wants a chain in every family the pod has an address in (an address
	// portguard's table never saw; see docs/install.md, downgrade).
	if err := n.Check(a); err != nil {
		t.Errorf("upstream CHECK of A after the export: %v", err)
	}
	n.MustDel(a)
	for _, f := range families {
		if d := b.DNChains(f); strings.Contains(strings.Join(d, " "), a.Chain(n)) {
			t.Errorf("%s: upstream's DEL left %s", f, a.Chain(n))
		}
		expectNoAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8100)
	}
	expectAnswer(t, "tcp", b.Client, b.NodeIP4.String(), 8102, "B")
	if got := foreignTables(t, b); got != foreign {
		t.Errorf("foreign tables changed by the export:\n%s\n---\n%s", foreign, got)
	}
}

// exportWhileConnecting runs `portguardctl export --to to` while a client keeps connecting to
// addr:8100 (pod A): the export must succeed, no connection may fail during it, and
// portguard's table must be gone afterwards.
func exportWhileConnecting(t *testing.T, b *tb.Bed, addr, to string) {
	t.Helper()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	tries, misses := watch("tcp", b.Client, addr, 8100, "A", stop, &wg)
	time.Sleep(300 * time.Millisecond)
	res, code := ctl(t, b, "export", "--to", to)
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wg.Wait()
	if code != 0 {
		t.Fatalf("export: exit %d\n%s%s", code, res.Stdout, res.Stderr)
	}
	if m := misses.Load(); m != 0 || tries.Load() < 3 {
		t.Errorf("during the export %d of %d connections failed", m, tries.Load())
	}
	if out, err := b.Exec(b.Node, "nft", "list", "table", "inet", "portguard"); err == nil {
		t.Errorf("portguard's table is still there:\n%s", out)
	}
}
