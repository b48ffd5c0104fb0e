package liveness

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/hostport"
)

var owner = hostport.Owner{Network: "net", ContainerID: "c1"}

func TestStoreRoundTrip(t *testing.T) {
	s := Store{Dir: t.TempDir()}
	r := Record{Owner: owner, Netns: "/var/run/netns/x", IfName: "eth0", Addrs: []netip.Addr{netip.MustParseAddr("10.4.0.2")}}
	if err := s.Put(r); err != nil {
		t.Fatal(err)
	}
	got, ok := s.Get(owner)
	if !ok || got.Netns != r.Netns || got.IfName != "eth0" || len(got.Addrs) != 1 || got.Time.IsZero() {
		t.Fatalf("Get: %+v %v", got, ok)
	}
	if all := s.All(); len(all) != 1 || all[0].Owner != owner {
		t.Fatalf("All: %+v", all)
	}
	if err := s.Remove(owner); err != nil {
		t.Fatal(err)
	}
	if _, ok := s.Get(owner); ok {
		t.Fatal("record still there after Remove")
	}
	if err := s.Remove(owner); err != nil {
		t.Fatalf("Remove of a missing record: %v", err)
	}
	// Names outside the CNI grammar never become paths.
	for _, bad := range []hostport.Owner{{Network: "..", ContainerID: "x"}, {Network: "n", ContainerID: "../../etc"}, {Network: "n/m", ContainerID: "x"}} {
		if err := s.Put(Record{Owner: bad}); err == nil {
			t.Errorf("Put accepted owner %q", bad)
		}
		if _, ok := s.Get(bad); ok {
			t.Errorf("Get found owner %q", bad)
		}
	}
	// A record whose contents name another owner is not that owner's.
	p, _ := s.path(owner)
	os.MkdirAll(filepath.Dir(p), 0o700)
	os.WriteFile(p, []byte(`{"owner":{"network":"net","containerID":"other"}}`), 0o600)
	if _, ok := s.Get(owner); ok {
		t.Error("Get accepted a record of another owner")
	}
	// The zero Store stores nothing.
	if err := (Store{}).Put(r); err != nil {
		t.Fatal(err)
	}
	if _, ok := (Store{}).Get(owner); ok {
		t.Fatal("zero Store found a record")
	}
}

func judgeWith(t *testing.T, r *Record, cache string) *Judge {
	t.Helper()
	j := &Judge{Records: Store{Dir: t.TempDir()}, CacheDirs: []string{t.TempDir()}}
	if r != nil {
		if err := j.Records.Put(*r); err != nil {
			t.Fatal(err)
		}
	}
	if cache != "" {
		os.MkdirAll(filepath.Join(j.CacheDirs[0], "results"), 0o755)
		os.WriteFile(filepath.Join(j.CacheDirs[0], "results", "net-c1-eth0"), []byte(cache), 0o600)
	}
	return j
}

func wantVerdict(t *testing.T, ev Evidence, s State, reason string) {
	t.Helper()
	if ev.State != s || !strings.Contains(ev.Reason, reason) {
		t.Errorf("verdict %+v, want %s with reason containing %q", ev, s, reason)
	}
}

func TestJudgeWithoutANamespace(t *testing.T) {
	dest := netip.MustParseAddr("10.4.0.2")
	wantVerdict(t, judgeWith(t, nil, "").Owner(owner, dest), Stale, "no record")
	wantVerdict(t, judgeWith(t, nil, "").Owner(hostport.Owner{}, dest), Stale, "names no owner")
	wantVerdict(t, judgeWith(t, &Record{Owner: owner}, "").Owner(owner, dest), Stale, "names no network namespace")
	gone := filepath.Join(t.TempDir(), "netns-gone")
	wantVerdict(t, judgeWith(t, &Record{Owner: owner, Netns: gone}, "").Owner(owner, dest), Stale, "is gone")
	// The mount point of a deleted netns stays behind as a plain file.
	plain := filepath.Join(t.TempDir(), "netns-unmounted")
	os.WriteFile(plain, nil, 0o600)
	wantVerdict(t, judgeWith(t, &Record{Owner: owner, Netns: plain}, "").Owner(owner, dest), Stale, "no longer a network namespace")
	// libcni's cache is read when portguard has no record, and named as the source.
	ev := judgeWith(t, nil, `{"kind":"cniCacheV1","containerId":"c1","networkName":"net","ifName":"eth0","netns":"`+gone+`","result":{"ips":[{"address":"10.4.0.2/24"}]}}`).Owner(owner, dest)
	wantVerdict(t, ev, Stale, "is gone")
	if !strings.HasSuffix(ev.Source, "net-c1-eth0") {
		t.Errorf("source %q, want the cache file", ev.Source)
	}
}

// The test's own network namespace stands in for a live sandbox: other processes live in it
// and lo holds 127.0.0.1. Only read, never changed.
func TestJudgeALiveNamespace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to enter a network namespace")
	}
	const ns = "/proc/self/ns/net"
	r := &Record{Owner: owner, Netns: ns, IfName: "lo", Addrs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}}
	ev := judgeWith(t, r, "").Owner(owner, netip.MustParseAddr("127.0.0.1"))
	wantVerdict(t, ev, Alive, "holds 127.0.0.1")
	if ev.PID == 0 || ev.Source != "portguard" || ev.Netns != ns {
		t.Errorf("evidence %+v: want a pid, source portguard, netns %s", ev, ns)
	}
	// No destination: any recorded address counts.
	wantVerdict(t, judgeWith(t, r, "").Owner(owner, netip.Addr{}), Alive, "holds 127.0.0.1")
	wantVerdict(t, judgeWith(t, r, "").Owner(owner, netip.MustParseAddr("192.0.2.99")), Stale, "no longer holds 192.0.2.99")
	r.IfName = "pg-no-such-if"
	wantVerdict(t, judgeWith(t, r, "").Owner(owner, netip.MustParseAddr("127.0.0.1")), Stale, "no longer holds")
}

func TestHolders(t *testing.T) {
	a := netip.MustParseAddr("10.4.0.2")
	j := judgeWith(t, &Record{Owner: owner, Netns: "/x", Addrs: []netip.Addr{a}},
		`{"kind":"cniCacheV1","containerId":"c2","networkName":"net","ifName":"eth0","netns":"/y","result":{"ips":[{"address":"10.4.0.2/24"}]}}`)
	got := j.Holders(a)
	if len(got) != 2 || got[0] != owner || got[1].ContainerID != "c2" {
		t.Fatalf("holders %v", got)
	}
	if len(j.Holders(netip.MustParseAddr("10.4.0.3"))) != 0 {
		t.Fatal("holders of an address nobody has")
	}
}

// BenchmarkJudge is what one conflicting ADD adds to its cost: a new Judge (one scan of
// the process table) judging one owner from portguard's record, entering its namespace to
// read the interface's addresses. Run as root: go test -bench Judge ./pkg/liveness
func BenchmarkJudge(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root to enter a network namespace")
	}
	dir := b.TempDir()
	s := Store{Dir: dir}
	if err := s.Put(Record{Owner: owner, Netns: "/proc/self/ns/net", IfName: "lo", Addrs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}}); err != nil {
		b.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		o    hostport.Owner
		want State
	}{{"alive", owner, Alive}, {"no-record", hostport.Owner{Network: "net", ContainerID: "gone"}, Stale}} {
		b.Run(tc.name, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				j := &Judge{Records: s, CacheDirs: []string{dir}}
				if ev := j.Owner(tc.o, netip.MustParseAddr("127.0.0.1")); ev.State != tc.want {
					b.Fatalf("%+v", ev)
				}
			}
		})
	}
}

// A recorded namespace identity that no longer matches the path (a recycled
// /proc/<pid>/ns/net, a new netns under an old name) is stale; an owner outside the CNI
// grammar has no record.
func TestJudgeRecordedNamespaceIdentity(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to enter a network namespace")
	}
	const ns = "/proc/self/ns/net"
	id := IdentifyNetns(ns)
	if id == (NetnsID{}) {
		t.Fatal("no identity for the test's own namespace")
	}
	r := &Record{Owner: owner, Netns: ns, IfName: "lo", NetnsID: id}
	wantVerdict(t, judgeWith(t, r, "").Owner(owner, netip.MustParseAddr("127.0.0.1")), Alive, "holds 127.0.0.1")
	r.NetnsID.Ino++
	wantVerdict(t, judgeWith(t, r, "").Owner(owner, netip.MustParseAddr("127.0.0.1")), Stale, "another network namespace")
	wantVerdict(t, judgeWith(t, nil, "").Owner(hostport.Owner{Network: "net", ContainerID: "../x"}, netip.Addr{}), Stale, "outside the CNI grammar")
}
