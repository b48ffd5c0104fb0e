package nftables

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/nftcond"
	"github.com/portguard/portguard/test/testbed"
)

// Kernel tests: a test bed node (namespaces pge-<hex>-*, removed by t.Cleanup) whose pods
// are wired by the real bridge + host-local plugins with no port plugin; this package
// programs the node's nf_tables directly and packets from the client namespace show which
// pod answers.

func TestMain(m *testing.M) { os.Exit(testbed.Main(m)) }

type kbed struct {
	*testbed.Bed
	n   *testbed.Network
	tab *Table
}

func inNode(b *testbed.Bed, f func() error) error {
	h, err := ns.GetNS("/var/run/netns/" + b.Node)
	if err != nil {
		return err
	}
	defer h.Close()
	return h.Do(func(ns.NetNS) error { return f() })
}

func newKBed(t *testing.T) *kbed {
	t.Helper()
	b := testbed.New(t)
	k := &kbed{Bed: b, n: b.Network(testbed.NetConfig{})}
	if err := inNode(b, func() (err error) { k.tab, err = Open(); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.tab.Close() })
	if wrote, err := k.tab.Ensure(); err != nil || !wrote {
		t.Fatalf("Ensure on an empty node: wrote %v, %v", wrote, err)
	}
	return k
}

func (k *kbed) pod(name string, ports ...int) *testbed.Pod {
	k.T.Helper()
	p := k.NewPod(name)
	k.n.MustAdd(p)
	if len(ports) == 0 {
		ports = []int{80}
	}
	p.Serve(ports...)
	return p
}

func addr(ip net.IP) netip.Addr { a, _ := netip.AddrFromSlice(ip); return a.Unmap() }

func owner(p *testbed.Pod) hostport.Owner {
	return hostport.Owner{Network: "net1", ContainerID: p.ContainerID}
}

// attachment maps each claim (family given by the claim) to the pod's address of that
// family on port 80, with snat's masquerade entries.
func (k *kbed) attachment(p *testbed.Pod, claims ...hostport.Claim) Attachment {
	a := Attachment{Owner: owner(p)}
	for _, c := range claims {
		ip := addr(p.IP(testbed.V4))
		if c.Family == hostport.V6 {
			ip = addr(p.IP(testbed.V6))
		}
		a.Mappings = append(a.Mappings, Mapping{Claim: c, Dest: netip.AddrPortFrom(ip, 80)})
	}
	ones4, _ := k.n.Subnet4.Mask.Size()
	ones6, _ := k.n.Subnet6.Mask.Size()
	a.SNAT = []SNAT{{Pod: netip.PrefixFrom(addr(p.IP(testbed.V4)), ones4)}, {Pod: netip.PrefixFrom(addr(p.IP(testbed.V6)), ones6)}}
	return a
}

// noMasq drops the masquerade entries, for a second attachment of the same pod (its
// entries exist already: created with EXCL, they would be refused).
func noMasq(a Attachment) Attachment { a.SNAT = nil; return a }

func claim(f hostport.Family, proto string, port int, hostIP ...net.IP) hostport.Claim {
	c := hostport.Claim{Family: f, Proto: proto, HostPort: port}
	if len(hostIP) > 0 {
		c.HostIP = addr(hostIP[0])
	}
	return c
}

func both(proto string, port int) []hostport.Claim {
	return []hostport.Claim{claim(hostport.V4, proto, port), claim(hostport.V6, proto, port)}
}

func (k *kbed) commit(build func(tx *Tx) error) error {
	k.T.Helper()
	tx, err := k.tab.Begin()
	if err != nil {
		k.T.Fatal(err)
	}
	if err := build(tx); err != nil {
		k.T.Fatal(err)
	}
	return tx.Commit()
}

func (k *kbed) add(a Attachment) error {
	return k.commit(func(tx *Tx) error { return tx.AddAttachment(a) })
}

func (k *kbed) mustAdd(a Attachment) {
	k.T.Helper()
	if err := k.add(a); err != nil {
		k.T.Fatalf("add %s: %v", a.Owner, err)
	}
}

// expect asserts who answers on (proto, hostIP, port) from the client; "" means nobody.
func (k *kbed) expect(proto string, ip net.IP, port int, want string) {
	k.T.Helper()
	got, err := testbed.Dial(proto, k.Client, ip.String(), port)
	if want == "" {
		if err == nil {
			k.T.Errorf("%s %s:%d answered %q, want no answer", proto, ip, port, got)
		}
		return
	}
	if err != nil || got != want {
		k.T.Errorf("%s %s:%d: got %q (%v), want %q", proto, ip, port, got, err, want)
	}
}

func TestKernelClaimForwardsBothFamilies(t *testing.T) {
	t.Parallel()
	k := newKBed(t)
	a := k.pod("A")
	k.mustAdd(k.attachment(a, append(both("tcp", 8080), both("udp", 8080)...)...))
	for _, ip := range []net.IP{k.NodeIP4, k.NodeIP6} {
		k.expect("tcp", ip, 8080, "A")
		k.expect("udp", ip, 8080, "A")
		k.expect("tcp", ip, 8081, "")
	}
	// Observation reads back the claims in the shared vocabulary.
	tx, _ := k.tab.Begin()
	es, err := tx.Claims(both("tcp", 8080)...)
	if err != nil || len(es) != 2 {
		t.Fatalf("Claims: %v, %v", es, err)
	}
	for _, e := range es {
		if e.Owner != owner(a) || e.Dest.Port() != 80 || !e.OwnedBy(owner(a)) {
			t.Errorf("observed %v", e)
		}
	}
	// No upstream tables on this node: nothing to report, no error.
	if up, err := tx.Upstream(); err != nil || len(up) != 0 {
		t.Errorf("Upstream without upstream tables: %v, %v", up, err)
	}
	// Ensure on a table in place writes nothing (and so keeps every element).
	if wrote, err := k.tab.Ensure(); err != nil || wrote {
		t.Errorf("second Ensure: wrote %v, %v", wrote, err)
	}
	k.expect("tcp", k.NodeIP4, 8080, "A")
}

func TestKernelSecondClaimRefusedUnlessTakenOver(t *testing.T) {
	t.Parallel()
	k := newKBed(t)
	a, b := k.pod("A"), k.pod("B")
	k.mustAdd(k.attachment(a, both("tcp", 8080)...))

	// Another owner, another destination: the map refuses a second value for the key.
	if err := k.add(k.attachment(b, both("tcp", 8080)...)); !errors.Is(err, ErrClaimed) {
		t.Fatalf("second claim: %v, want ErrClaimed", err)
	}
	// Another owner, the same destination (a reused pod IP), on a hostIP claim (whose guard
	// only counts): only EXCL refuses it.
	k.mustAdd(noMasq(k.attachment(a, claim(hostport.V4, "tcp", 9090, k.NodeIP4))))
	same := k.attachment(a, claim(hostport.V4, "tcp", 9090, k.NodeIP4))
	same.Owner = hostport.Owner{Network: "net1", ContainerID: "other"}
	same.SNAT = nil
	if err := k.add(same); !errors.Is(err, ErrClaimed) {
		t.Fatalf("same key and value, other owner: %v, want ErrClaimed", err)
	}
	k.expect("tcp", k.NodeIP4, 8080, "A")
	k.expect("tcp", k.NodeIP6, 8080, "A")

	// Takeover: delete what was observed and create the new, in one batch.
	err := k.commit(func(tx *Tx) error {
		es, err := tx.Claims(both("tcp", 8080)...)
		if err != nil {
			return err
		}
		ms, err := tx.Masq(addr(a.IP(testbed.V4)), addr(a.IP(testbed.V6)))
		if err != nil {
			return err
		}
		if len(es) != 2 || len(ms) != 2 {
			t.Errorf("observed %v and %v, want 2 claims and 2 masquerade entries", es, ms)
		}
		tx.RemoveClaims(es...)
		tx.RemoveMasq(ms...)
		return tx.AddAttachment(k.attachment(b, both("tcp", 8080)...))
	})
	if err != nil {
		t.Fatalf("takeover: %v", err)
	}
	for i := 0; i < 3; i++ {
		k.expect("tcp", k.NodeIP4, 8080, "B")
		k.expect("tcp", k.NodeIP6, 8080, "B")
	}
	d, err := k.tab.Dump()
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Claims) != 3 || len(d.Masq) != 2 || len(d.Subnets) != 2 {
		t.Fatalf("after takeover: %v", d)
	}
	for _, e := range d.Claims {
		if e.Claim.HostPort == 8080 && e.Owner != owner(b) {
			t.Errorf("left behind: %v", e)
		}
	}
	// A batch that deletes an element that is not there fails whole. (Deletion is by key:
	// that the key still holds what was observed is the generation check's job.)
	err = k.commit(func(tx *Tx) error {
		tx.RemoveClaims(Element{Claim: claim(hostport.V4, "tcp", 7777), Dest: netip.AddrPortFrom(addr(a.IP(testbed.V4)), 80)})
		return tx.AddAttachment(k.attachment(a, claim(hostport.V4, "tcp", 9191)))
	})
	if !errors.Is(err, ErrGone) {
		t.Fatalf("stale delete: %v, want ErrGone", err)
	}
	k.expect("tcp", k.NodeIP4, 9191, "")
}

func TestKernelWildcardAndHostIPRefuseEachOther(t *testing.T) {
	t.Parallel()
	k := newKBed(t)
	a, b := k.pod("A"), k.pod("B")
	v4 := hostport.V4
	// wildcard first, then a hostIP claim on the port
	k.mustAdd(k.attachment(a, claim(v4, "tcp", 8080)))
	if err := k.add(noMasq(k.attachment(b, claim(v4, "tcp", 8080, k.NodeIP4)))); !errors.Is(err, ErrClaimed) {
		t.Fatalf("hostIP after wildcard: %v, want ErrClaimed", err)
	}
	// hostIP claims first (two addresses: both allowed), then a wildcard
	k.mustAdd(noMasq(k.attachment(a, claim(v4, "tcp", 9090, k.NodeIP4))))
	k.mustAdd(k.attachment(b, claim(v4, "tcp", 9090, k.NodeIP4Alt)))
	k.expect("tcp", k.NodeIP4, 9090, "A")
	k.expect("tcp", k.NodeIP4Alt, 9090, "B")
	c := k.pod("C")
	if err := k.add(noMasq(k.attachment(c, claim(v4, "tcp", 9090)))); !errors.Is(err, ErrClaimed) {
		t.Fatalf("wildcard after hostIP: %v, want ErrClaimed", err)
	}
	// The planner sees both hostIP claims behind the wildcard it asks about.
	tx, _ := k.tab.Begin()
	es, err := tx.Claims(claim(v4, "tcp", 9090))
	if err != nil || len(es) != 2 {
		t.Fatalf("conflicts of a wildcard claim: %v, %v", es, err)
	}
	// Removing one hostIP claim keeps the guard (one left): the wildcard is still refused.
	remove := func(e Element) error { return k.commit(func(tx *Tx) error { tx.RemoveClaims(e); return nil }) }
	if err := remove(es[0]); err != nil {
		t.Fatal(err)
	}
	if err := k.add(noMasq(k.attachment(c, claim(v4, "tcp", 9090)))); !errors.Is(err, ErrClaimed) {
		t.Fatalf("wildcard beside the remaining hostIP claim: %v, want ErrClaimed", err)
	}
	if err := remove(es[1]); err != nil {
		t.Fatal(err)
	}
	k.mustAdd(k.attachment(c, claim(v4, "tcp", 9090)))
	k.expect("tcp", k.NodeIP4, 9090, "C")
	k.expect("tcp", k.NodeIP4Alt, 9090, "C")
	// One transaction that holds both kinds itself is refused as well.
	if err := k.add(noMasq(k.attachment(a, claim(v4, "udp", 7070), claim(v4, "udp", 7070, k.NodeIP4)))); !errors.Is(err, ErrClaimed) {
		t.Fatalf("both kinds in one transaction: %v, want ErrClaimed", err)
	}
}

func TestKernelChangedSinceBeginRefused(t *testing.T) {
	t.Parallel()
	k := newKBed(t)
	a := k.pod("A")
	tx, err := k.tab.Begin()
	if err != nil {
		t.Fatal(err)
	}
	if err := tx.AddAttachment(k.attachment(a, claim(hostport.V4, "tcp", 8080))); err != nil {
		t.Fatal(err)
	}
	k.mustAdd(k.attachment(a, claim(hostport.V4, "tcp", 9090))) // another writer commits
	if err := tx.Commit(); !errors.Is(err, ErrChanged) {
		t.Fatalf("commit after another commit: %v, want ErrChanged", err)
	}
	k.expect("tcp", k.NodeIP4, 8080, "")
}

func TestKernelHairpinAndLocalhostMasquerade(t *testing.T) {
	t.Parallel()
	k := newKBed(t)
	a, b := k.NewPod("A"), k.NewPod("B")
	k.n.MustAdd(a)
	k.n.MustAdd(b)
	a.ServePeer(80)
	k.mustAdd(k.attachment(a, both("tcp", 8080)...))
	// Hairpin: B (same subnet) -> node:8080 -> A. Without masquerade A answers B directly and
	// B drops it; with it A sees the node's bridge address.
	for _, f := range []testbed.Family{testbed.V4, testbed.V6} {
		ip := k.NodeIP(f)
		got, err := testbed.ConnectTCP(b.NetNS, ip.String(), 8080)
		name, peer := testbed.PeerOf(got)
		if err != nil || name != "A" || peer == nil || peer.Equal(b.IP(f)) {
			t.Errorf("hairpin via %s: %q (%v)", ip, got, err)
		}
	}
	// Localhost: node -> 127.0.0.1:8080 -> A, masqueraded (route_localnet lets it leave lo).
	k.MustExec(k.Node, "sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1")
	got, err := testbed.ConnectTCP(k.Node, "127.0.0.1", 8080)
	if name, _ := testbed.PeerOf(got); err != nil || name != "A" {
		t.Errorf("localhost: %q (%v)", got, err)
	}
	// From the client no masquerade: A sees the client's address.
	got, err = testbed.ConnectTCP(k.Client, k.NodeIP4.String(), 8080)
	if name, peer := testbed.PeerOf(got); err != nil || name != "A" || !peer.Equal(k.ClientIP4) {
		t.Errorf("client: %q (%v), want A and the client's address", got, err)
	}
	// masqAll: every source masqueraded.
	c := k.NewPod("C")
	k.n.MustAdd(c)
	c.ServePeer(80)
	all := k.attachment(c, both("tcp", 8181)...)
	for i := range all.SNAT {
		all.SNAT[i].All = true
	}
	k.mustAdd(all)
	for _, f := range []testbed.Family{testbed.V4, testbed.V6} {
		got, err = testbed.ConnectTCP(k.Client, k.NodeIP(f).String(), 8181)
		if name, peer := testbed.PeerOf(got); err != nil || name != "C" || peer == nil || peer.Equal(k.ClientIP4) || peer.Equal(k.ClientIP6) {
			t.Errorf("masqAll via %s: %q (%v), want C and a masqueraded source", f, got, err)
		}
	}
}

func TestKernelTransitNotRedirected(t *testing.T) {
	t.Parallel()
	k := newKBed(t)
	a, b := k.pod("A"), k.pod("B", 8080)
	k.mustAdd(k.attachment(a, both("tcp", 8080)...))
	// The client routes the pod subnets through the node: B's address is not the node's, so
	// a connection to B:8080 passes through the node's prerouting untouched.
	k.MustExec(k.Client, "ip", "route", "add", k.n.Subnet4.String(), "via", k.NodeIP4.String())
	k.MustExec(k.Client, "ip", "-6", "route", "add", k.n.Subnet6.String(), "via", k.NodeIP6.String())
	k.expect("tcp", b.IP(testbed.V4), 8080, "B")
	k.expect("tcp", b.IP(testbed.V6), 8080, "B")
	k.expect("tcp", k.NodeIP4, 8080, "A")
}

// upstreamScript is what upstream portmap v1.10.0's nftables backend leaves for one pod
// (knftables renders this; the rule text is upstream's).
func upstreamScript(fam, ipx, hostIP, podIP, id string, port int, containerPort string) string {
	match := ""
	if hostIP != "" {
		match = ipx + " daddr " + hostIP + " "
	}
	dest := podIP + ":" + containerPort
	if ipx == "ip6" {
		dest = "[" + podIP + "]:" + containerPort
	}
	return strings.NewReplacer("FAM", fam, "IPX", ipx, "MATCH", match, "DEST", dest, "ID", id, "PORT", itoa(port), "POD", podIP).Replace(`
add table FAM cni_hostport { comment "CNI portmap plugin" ; }
add chain FAM cni_hostport hostports
add chain FAM cni_hostport hostip_hostports
add chain FAM cni_hostport hostports_all
add rule FAM cni_hostport hostports_all jump hostip_hostports
add rule FAM cni_hostport hostports_all jump hostports
add chain FAM cni_hostport prerouting { type nat hook prerouting priority -100 ; }
add rule FAM cni_hostport prerouting fib daddr type local jump hostports_all
add chain FAM cni_hostport output { type nat hook output priority -100 ; }
add rule FAM cni_hostport output fib daddr type local jump hostports_all
add chain FAM cni_hostport masquerading { type nat hook postrouting priority 100 ; }
add rule FAM cni_hostport hostports MATCHtcp dport PORT dnat to DEST comment "ID"
add rule FAM cni_hostport masquerading IPX saddr POD IPX daddr POD masquerade comment "ID"
`)
}

func itoa(i int) string { return strconv.Itoa(i) }

func TestKernelUpstreamRulesObservedAndTakenOver(t *testing.T) {
	t.Parallel()
	k := newKBed(t)
	a, b := k.pod("A"), k.pod("B")
	script := upstreamScript("ip", "ip", "", a.IP(testbed.V4).String(), "upstream-a", 8080, "80") +
		upstreamScript("ip6", "ip6", k.NodeIP6.String(), a.IP(testbed.V6).String(), "upstream-a", 8080, "80")
	if _, err := k.Exec(k.Node, "sh", "-c", "nft -f - <<'EOF'\n"+script+"EOF\n"); err != nil {
		t.Fatal(err)
	}
	// Ours is in place too, but upstream's chains (priority -100) come first.
	k.mustAdd(k.attachment(b, both("tcp", 8080)...))
	k.expect("tcp", k.NodeIP4, 8080, "A")
	k.expect("tcp", k.NodeIP6, 8080, "A")

	tx, err := k.tab.Begin()
	if err != nil {
		t.Fatal(err)
	}
	up, err := tx.Upstream()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{
		"ipv4/tcp *:8080 -> " + a.IP(testbed.V4).String() + ":80":                            true,
		"ipv6/tcp " + k.NodeIP6.String() + ":8080 -> [" + a.IP(testbed.V6).String() + "]:80": true,
	}
	var masq int
	for _, u := range up {
		if u.ContainerID != "upstream-a" {
			t.Errorf("container ID %q", u.ContainerID)
		}
		if u.Chain == UpstreamMasquerades {
			masq++
			continue
		}
		s := u.Claim.String() + " -> " + u.Dest.String()
		if !want[s] {
			t.Errorf("unexpected upstream claim %s", s)
		}
		delete(want, s)
	}
	if len(want) != 0 || masq != 2 {
		t.Fatalf("missing upstream claims %v, masquerading rules %d", want, masq)
	}
	tx.RemoveUpstream(up...)
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	k.expect("tcp", k.NodeIP4, 8080, "B")
	k.expect("tcp", k.NodeIP6, 8080, "B")
	tx, _ = k.tab.Begin()
	if up, err := tx.Upstream(); err != nil || len(up) != 0 {
		t.Errorf("after removal: %v, %v", up, err)
	}
}

var handles = regexp.MustCompile(` # handle \d+`)

func TestKernelGoldenLayout(t *testing.T) {
	t.Parallel()
	k := newKBed(t)
	got := handles.ReplaceAllString(k.MustExec(k.Node, "nft", "list", "table", "inet", TableName), "")
	want, err := os.ReadFile("testdata/layout.golden")
	if os.Getenv("UPDATE_GOLDEN") != "" {
		if err := os.WriteFile("testdata/layout.golden", []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	if got != string(want) {
		t.Errorf("layout differs from testdata/layout.golden (UPDATE_GOLDEN=1 to rewrite):\n%s", got)
	}
	// A damaged layout is found and rewritten, elements kept.
	a := k.pod("A")
	k.mustAdd(k.attachment(a, both("tcp", 8080)...))
	k.MustExec(k.Node, "nft", "flush", "chain", "inet", TableName, "prerouting")
	if p, err := k.tab.Verify(); err != nil || len(p) != 1 {
		t.Fatalf("Verify after a flush: %v, %v", p, err)
	}
	k.expect("tcp", k.NodeIP4, 8080, "")
	if wrote, err := k.tab.Ensure(); err != nil || !wrote {
		t.Fatalf("Ensure: %v, %v", wrote, err)
	}
	k.expect("tcp", k.NodeIP4, 8080, "A")
}

func TestKernelReAddReplacesOwnElementsInOneBatch(t *testing.T) {
	t.Parallel()
	k := newKBed(t)
	a := k.pod("A")
	att := k.attachment(a, append(both("tcp", 8080), claim(hostport.V4, "udp", 5353, k.NodeIP4))...)
	att.Owner.ContainerID = strings.Repeat("c", 200) // hashed in the comment
	k.mustAdd(att)
	before, err := k.tab.Dump()
	if err != nil {
		t.Fatal(err)
	}
	reAdd := func() error {
		return k.commit(func(tx *Tx) error {
			var cs []hostport.Claim
			for _, m := range att.Mappings {
				cs = append(cs, m.Claim)
			}
			es, err := tx.Claims(cs...)
			if err != nil {
				return err
			}
			ms, err := tx.Masq(addr(a.IP(testbed.V4)), addr(a.IP(testbed.V6)))
			if err != nil {
				return err
			}
			for _, e := range es {
				if !e.OwnedBy(att.Owner) || !e.Owner.IsZero() {
					t.Errorf("observed %v, want a hashed comment of the owner", e)
				}
			}
			tx.RemoveClaims(es...)
			tx.RemoveMasq(ms...)
			return tx.AddAttachment(att)
		})
	}
	for i := 0; i < 2; i++ {
		if err := reAdd(); err != nil {
			t.Fatalf("re-ADD %d: %v", i, err)
		}
	}
	after, err := k.tab.Dump()
	if err != nil {
		t.Fatal(err)
	}
	if len(after.Claims) != 3 || !equalDumps(before, after) {
		t.Errorf("re-ADD changed the table:\n%v\n%v", before, after)
	}
	k.expect("tcp", k.NodeIP4, 8080, "A")
	k.expect("tcp", k.NodeIP6, 8080, "A")
	k.expect("udp", k.NodeIP4, 5353, "A")
	// A bare second add of the same attachment is refused: never a duplicate.
	if err := k.add(att); !errors.Is(err, ErrClaimed) {
		t.Fatalf("bare re-add: %v, want ErrClaimed", err)
	}
}

func equalDumps(a, b Dump) bool {
	if len(a.Claims) != len(b.Claims) || len(a.Masq) != len(b.Masq) || len(a.Subnets) != len(b.Subnets) {
		return false
	}
	for i := range a.Claims {
		if a.Claims[i] != b.Claims[i] {
			return false
		}
	}
	for i := range a.Masq {
		if a.Masq[i] != b.Masq[i] {
			return false
		}
	}
	return true
}

// TestKernelLargeBatches: 5,000 attachments (10,000 claims) created in one transaction and
// all removed in another, as GC or repair would: the batch exceeds a netlink attribute's
// 64 KiB and the socket's default buffers, which the transport must handle.
func TestKernelLargeBatches(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	t.Parallel()
	_, tab := ensuredTable(t)
	start := time.Now()
	prefill(t, tab, 5000)
	t.Logf("created 5,000 attachments in one batch in %v", time.Since(start))
	d, err := tab.Dump()
	if err != nil || len(d.Claims) != 10000 || len(d.Masq) != 10000 {
		t.Fatalf("dump: %d claims, %d masquerade entries, %v", len(d.Claims), len(d.Masq), err)
	}
	seen := map[string]bool{}
	for _, e := range d.Claims {
		if seen[e.Claim.String()] {
			t.Fatalf("dump repeats %v", e)
		}
		seen[e.Claim.String()] = true
	}
	start = time.Now()
	tx, err := tab.Begin()
	if err != nil {
		t.Fatal(err)
	}
	tx.RemoveClaims(d.Claims...)
	tx.RemoveMasq(d.Masq...)
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	t.Logf("removed them in one batch in %v", time.Since(start))
	d, err = tab.Dump()
	if err != nil || len(d.Claims)+len(d.Masq) != 0 {
		t.Fatalf("after removal: %d claims, %d masquerade entries, %v", len(d.Claims), len(d.Masq), err)
	}
	// The guards went with the claims: a hostIP claim on a freed port is accepted.
	tx, _ = tab.Begin()
	a, _, _ := benchAttachment(0)
	a.Mappings[0].Claim.HostIP = netip.MustParseAddr("192.0.2.1")
	if err := tx.AddAttachment(a); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatalf("hostIP claim on a freed port: %v", err)
	}
}

// TestKernelGoldenElements: how claims, owners and masquerade entries read in `nft list`
// (fixed addresses in a namespace of its own, and at most one element per set, whose
// listing order is the hash's, so the dump is the same on every run).
func TestKernelGoldenElements(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	t.Parallel()
	h, tab := ensuredTable(t)
	o1 := hostport.Owner{Network: "net1", ContainerID: "c1"}
	o2 := hostport.Owner{Network: "net2", ContainerID: strings.Repeat("c", 130)}
	tx, _ := tab.Begin()
	for _, a := range []Attachment{
		{Owner: o1, Mappings: []Mapping{
			{Claim: hostport.Claim{Family: hostport.V4, Proto: "tcp", HostPort: 8080}, Dest: netip.MustParseAddrPort("10.200.0.1:80")},
			{Claim: hostport.Claim{Family: hostport.V6, Proto: "tcp", HostPort: 8080}, Dest: netip.MustParseAddrPort("[fd00:200::1]:80")},
		}, SNAT: []SNAT{{Pod: netip.MustParsePrefix("10.200.0.1/24")}, {Pod: netip.MustParsePrefix("fd00:200::1/64")}}},
		{Owner: o2, Mappings: []Mapping{
			{Claim: hostport.Claim{Family: hostport.V6, Proto: "udp", HostIP: netip.MustParseAddr("2001:db8::1"), HostPort: 53}, Dest: netip.MustParseAddrPort("[fd00:200:1::2]:5353")},
		}, SNAT: []SNAT{{Pod: netip.MustParsePrefix("fd00:200:1::2/64"), All: true}}},
	} {
		if err := tx.AddAttachment(a); err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	var out []byte
	err := h.Do(func(ns.NetNS) (err error) {
		out, err = exec.Command("nft", "list", "table", "inet", TableName).CombinedOutput()
		return err
	})
	if err != nil {
		t.Fatalf("nft list: %v %s", err, out)
	}
	// Only the elements (the layout has its own golden file), one per line and sorted: a
	// hash set lists them in the order of its random seed.
	var got []string
	inElems := false
	var elems []string
	for _, l := range strings.Split(string(out), "\n") {
		l = strings.TrimSpace(l)
		if strings.HasPrefix(l, "map ") || strings.HasPrefix(l, "set ") {
			got = append(got, l)
		}
		if rest, ok := strings.CutPrefix(l, "elements = { "); ok {
			inElems, l = true, rest
		}
		if !inElems {
			continue
		}
		l, end := strings.CutSuffix(l, " }")
		elems = append(elems, strings.TrimSuffix(l, ","))
		if end {
			slices.Sort(elems)
			for _, e := range elems {
				got = append(got, "\t"+e)
			}
			inElems, elems = false, nil
		}
	}
	s := strings.Join(got, "\n") + "\n"
	if os.Getenv("UPDATE_GOLDEN") != "" {
		if err := os.WriteFile("testdata/elements.golden", []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile("testdata/elements.golden")
	if err != nil {
		t.Fatal(err)
	}
	if s != string(want) {
		t.Errorf("elements differ from testdata/elements.golden (UPDATE_GOLDEN=1 to rewrite):\n%s", s)
	}
}

// TestKernelServicesKeepPrecedence: a kube-proxy-like table (its own, nat prerouting at
// dstnat -100, as kube-proxy's nftables mode and iptables' nat) that DNATs the same port
// wins over a claim, in both families; traffic it does not take still reaches the claim.
func TestKernelServicesKeepPrecedence(t *testing.T) {
	t.Parallel()
	k := newKBed(t)
	a, b := k.pod("A"), k.pod("B")
	k.mustAdd(k.attachment(a, append(both("tcp", 8080), both("tcp", 9090)...)...))
	script := `
table inet kube-proxy-test {
	chain nat-prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr ` + k.NodeIP4.String() + ` tcp dport 8080 dnat ip to ` + b.IP(testbed.V4).String() + `:80
		ip6 daddr ` + k.NodeIP6.String() + ` tcp dport 8080 dnat ip6 to [` + b.IP(testbed.V6).String() + `]:80
	}
}
`
	if _, err := k.Exec(k.Node, "sh", "-c", "nft -f - <<'EOF'\n"+script+"EOF\n"); err != nil {
		t.Fatal(err)
	}
	k.expect("tcp", k.NodeIP4, 8080, "B")
	k.expect("tcp", k.NodeIP6, 8080, "B")
	k.expect("tcp", k.NodeIP4, 9090, "A")
	k.expect("tcp", k.NodeIP6, 9090, "A")
	// CHECK's view: the foreign chain runs first; portguard's own chains are not listed.
	ch, err := k.tab.EarlierNAT()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, c := range ch {
		found = found || (c.Table == "kube-proxy-test" && c.Chain == "nat-prerouting" && c.Hook == "prerouting" && c.Priority == -100 && len(c.Families) == 2)
		if c.Table == TableName {
			t.Errorf("own chain listed: %v", c)
		}
	}
	if !found {
		t.Errorf("EarlierNAT: %v, want kube-proxy-test's nat-prerouting", ch)
	}
}

// TestKernelConditionsPerAttachment: conditions hold per attachment (upstream makes the last
// ADD's conditions table-wide): A forwards only what comes from the client's address, B
// only what comes from elsewhere, C has none; equal conditions share one chain; a takeover
// of a conditioned claim removes its gate with it.
func TestKernelConditionsPerAttachment(t *testing.T) {
	t.Parallel()
	k := newKBed(t)
	a, b, c := k.pod("A"), k.pod("B"), k.pod("C")
	cond := func(f hostport.Family, s string) string {
		t.Helper()
		field := "conditionsV4"
		if f == hostport.V6 {
			field = "conditionsV6"
		}
		p, err := nftcond.Parse(field, f, []string{s})
		if err != nil {
			t.Fatal(err)
		}
		ch, err := k.tab.EnsureConditions(p)
		if err != nil {
			t.Fatal(err)
		}
		return ch
	}
	fromClient := map[hostport.Family]string{
		hostport.V4: cond(hostport.V4, "ip saddr "+k.ClientIP4.String()),
		hostport.V6: cond(hostport.V6, "ip6 saddr "+k.ClientIP6.String()),
	}
	notClient := map[hostport.Family]string{
		hostport.V4: cond(hostport.V4, "ip saddr != "+k.ClientIP4.String()),
		hostport.V6: cond(hostport.V6, "ip6 saddr != "+k.ClientIP6.String()),
	}
	if again := cond(hostport.V4, "ip saddr "+k.ClientIP4.String()); again != fromClient[hostport.V4] {
		t.Errorf("equal conditions, chains %s and %s", again, fromClient[hostport.V4])
	}
	attA := k.attachment(a, both("tcp", 8080)...)
	attA.Conditions = fromClient
	attB := k.attachment(b, both("tcp", 9090)...)
	attB.Conditions = notClient
	k.mustAdd(attA)
	k.mustAdd(attB)
	k.mustAdd(k.attachment(c, both("tcp", 7070)...))
	for _, ip := range []net.IP{k.NodeIP4, k.NodeIP6} {
		k.expect("tcp", ip, 8080, "A")
		k.expect("tcp", ip, 9090, "")
		k.expect("tcp", ip, 7070, "C")
	}
	// From the node itself (source: a node address, not the client's): the reverse.
	for _, ip := range []net.IP{k.NodeIP4, k.NodeIP6} {
		if got, err := testbed.ConnectTCP(k.Node, ip.String(), 9090); err != nil || got != "B" {
			t.Errorf("node -> %s:9090: %q (%v), want B", ip, got, err)
		}
		if got, err := testbed.ConnectTCP(k.Node, ip.String(), 8080); err == nil {
			t.Errorf("node -> %s:8080: answered %q, want no answer", ip, got)
		}
	}
	// The same claim with other conditions is still one claim: refused.
	dup := noMasq(k.attachment(c, both("tcp", 8080)...))
	dup.Conditions = notClient
	if err := k.add(dup); !errors.Is(err, ErrClaimed) {
		t.Fatalf("second claim with other conditions: %v, want ErrClaimed", err)
	}
	// Takeover of A's conditioned claims by an unconditioned one: the gates go too.
	err := k.commit(func(tx *Tx) error {
		es, err := tx.Claims(both("tcp", 8080)...)
		if err != nil {
			return err
		}
		for _, e := range es {
			if e.Gate != fromClient[e.Claim.Family] {
				t.Errorf("observed %v, want its gate %s", e, fromClient[e.Claim.Family])
			}
		}
		tx.RemoveClaims(es...)
		return tx.AddAttachment(noMasq(k.attachment(c, both("tcp", 8080)...)))
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []testbed.Family{testbed.V4, testbed.V6} {
		k.expect("tcp", k.NodeIP(f), 8080, "C")
		if got, err := testbed.ConnectTCP(k.Node, k.NodeIP(f).String(), 8080); err != nil || got != "C" {
			t.Errorf("node -> %s:8080 after takeover: %q (%v), want C", k.NodeIP(f), got, err)
		}
	}
	d, err := k.tab.Dump()
	if err != nil {
		t.Fatal(err)
	}
	gated := 0
	for _, e := range d.Claims {
		if e.Gate != "" {
			gated++
			if e.Claim.HostPort != 9090 {
				t.Errorf("gate left on %v", e)
			}
		}
	}
	if gated != 2 {
		t.Errorf("%d gated claims, want B's 2", gated)
	}
}
