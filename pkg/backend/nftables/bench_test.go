package nftables

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/portguard/portguard/pkg/backend"
	"github.com/portguard/portguard/pkg/config"
	"github.com/portguard/portguard/pkg/hostport"
)

// BenchmarkKernelVerbs measures, on one open Table in a namespace of its own
// (pgnft-<hex>, no traffic), the cost of one ADD batch (Begin, point lookups of 2 claims and
// 2 pods' masquerade entries; 2 mappings + 2 masquerade entries created, commit), one DEL
// batch (the same lookups, everything deleted) and one point lookup, with N attachments
// (v4 + v6 wildcard claims and masquerade entries each) already in the table. It reports
// µs per operation as add-µs, del-µs and lookup-µs, and the Commit part of ADD and DEL
// (guard reads and the batch) as add-commit-µs and del-commit-µs.
//
//	go test -run '^$' -bench KernelVerbs -benchtime 2000x ./pkg/backend/nftables/
func BenchmarkKernelVerbs(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	for _, n := range []int{0, 1000, 5000} {
		b.Run(fmt.Sprintf("N=%d", n), func(b *testing.B) { benchVerbs(b, n) })
	}
}

// ownNetns creates an empty network namespace pgnft-<hex>, removed at cleanup.
func ownNetns(b testing.TB) ns.NetNS {
	r := make([]byte, 3)
	_, _ = rand.Read(r)
	name := "pgnft-" + hex.EncodeToString(r)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		b.Fatalf("ip netns add: %v %s", err, out)
	}
	b.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	h, err := ns.GetNS("/var/run/netns/" + name)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { h.Close() })
	return h
}

// ensuredTable opens portguard's table with its layout in a namespace of its own
// (ownNetns), closed at cleanup; it returns the namespace too, for reads from inside it.
func ensuredTable(tb testing.TB) (ns.NetNS, *Table) {
	tb.Helper()
	h := ownNetns(tb)
	var t *Table
	if err := h.Do(func(ns.NetNS) (err error) { t, err = Open(); return err }); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { t.Close() })
	if _, err := t.Ensure(); err != nil {
		tb.Fatal(err)
	}
	return h, t
}

// benchAttachment is attachment i: host port 10000+i (tcp, both families) to pod addresses
// 10.200.i/16 and fd00:200::i/64, port 80, with snat's masquerade entries.
func benchAttachment(i int) (Attachment, []hostport.Claim, []netip.Addr) {
	p4 := netip.AddrFrom4([4]byte{10, 200, byte(i >> 8), byte(i)})
	p6 := netip.AddrFrom16([16]byte{0xfd, 0, 2, 0, 14: byte(i >> 8), 15: byte(i)})
	port := 10000 + i
	o := hostport.Owner{Network: "bench", ContainerID: fmt.Sprintf("c%d", i)}
	cs := []hostport.Claim{{Family: hostport.V4, Proto: "tcp", HostPort: port}, {Family: hostport.V6, Proto: "tcp", HostPort: port}}
	a := Attachment{Owner: o,
		Mappings: []Mapping{{Claim: cs[0], Dest: netip.AddrPortFrom(p4, 80)}, {Claim: cs[1], Dest: netip.AddrPortFrom(p6, 80)}},
		SNAT:     []SNAT{{Pod: netip.PrefixFrom(p4, 16)}, {Pod: netip.PrefixFrom(p6, 64)}},
	}
	return a, cs, []netip.Addr{p4, p6}
}

func benchVerbs(b *testing.B, n int) {
	_, t := ensuredTable(b)
	prefill(b, t, n)
	a, cs, pods := benchAttachment(n + 1)
	var add, del, look, addCommit, delCommit time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		tx, err := t.Begin()
		if err != nil {
			b.Fatal(err)
		}
		if es, err := tx.Claims(cs...); err != nil || len(es) != 0 {
			b.Fatalf("ADD lookups: %v %v", es, err)
		}
		if ms, err := tx.Masq(pods...); err != nil || len(ms) != 0 {
			b.Fatalf("ADD lookups: %v %v", ms, err)
		}
		if err := tx.AddAttachment(a); err != nil {
			b.Fatal(err)
		}
		c0 := time.Now()
		if err := tx.Commit(); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		addCommit += t1.Sub(c0)
		tx, err = t.Begin()
		if err != nil {
			b.Fatal(err)
		}
		es, err := tx.Claims(cs...)
		if err != nil || len(es) != 2 {
			b.Fatalf("DEL lookups: %v %v", es, err)
		}
		ms, err := tx.Masq(pods...)
		if err != nil || len(ms) != 2 {
			b.Fatalf("DEL lookups: %v %v", ms, err)
		}
		tx.RemoveClaims(es...)
		tx.RemoveMasq(ms...)
		c1 := time.Now()
		if err := tx.Commit(); err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		delCommit += t2.Sub(c1)
		if _, ok, err := t.lookup(hostport.Claim{Family: hostport.V4, Proto: "tcp", HostPort: 10000 + i%max(n, 1)}); err != nil || ok != (n > 0) {
			b.Fatalf("lookup: %v %v", ok, err)
		}
		t3 := time.Now()
		add += t1.Sub(t0)
		del += t2.Sub(t1)
		look += t3.Sub(t2)
	}
	us := func(d time.Duration) float64 { return float64(d.Microseconds()) / float64(b.N) }
	b.ReportMetric(us(add), "add-µs")
	b.ReportMetric(us(del), "del-µs")
	b.ReportMetric(us(look), "lookup-µs")
	b.ReportMetric(us(addCommit), "add-commit-µs")
	b.ReportMetric(us(delCommit), "del-commit-µs")
}

// prefill adds attachments 0..n-1 in one transaction.
func prefill(tb testing.TB, t *Table, n int) {
	tx, err := t.Begin()
	if err != nil {
		tb.Fatal(err)
	}
	for j := 0; j < n; j++ {
		a, _, _ := benchAttachment(j)
		if err := tx.AddAttachment(a); err != nil {
			tb.Fatal(err)
		}
	}
	if err := tx.Commit(); err != nil {
		tb.Fatalf("prefill: %v", err)
	}
}

// BenchmarkKernelNewConnection measures a new TCP connection through a claim (connect and
// close, locally generated, so through the output hook's lookups and DNAT) with N other
// claims in the table: map lookups should keep it flat in N. One namespace, the claimed
// address and the "pod's" on its loopback; reported as conn-µs.
//
//	go test -run '^$' -bench KernelNewConnection -benchtime 20000x ./pkg/backend/nftables/
func BenchmarkKernelNewConnection(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	for _, n := range []int{0, 1000, 5000} {
		b.Run(fmt.Sprintf("N=%d", n), func(b *testing.B) { benchConnection(b, n) })
	}
}

func benchConnection(b *testing.B, n int) {
	h := ownNetns(b)
	var t *Table
	var ln net.Listener
	err := h.Do(func(ns.NetNS) error {
		for _, args := range [][]string{
			{"link", "set", "lo", "up"},
			{"addr", "add", "10.250.0.1/32", "dev", "lo"},
			{"addr", "add", "10.250.0.2/32", "dev", "lo"},
		} {
			if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
				return fmt.Errorf("ip %v: %v %s", args, err, out)
			}
		}
		var err error
		if ln, err = net.Listen("tcp", "10.250.0.1:80"); err != nil {
			return err
		}
		t, err = Open()
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
	defer t.Close()
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	if _, err := t.Ensure(); err != nil {
		b.Fatal(err)
	}
	prefill(b, t, n)
	tx, _ := t.Begin()
	claim := hostport.Claim{Family: hostport.V4, Proto: "tcp", HostPort: 8080}
	if err := tx.AddAttachment(Attachment{Owner: hostport.Owner{Network: "bench", ContainerID: "conn"},
		Mappings: []Mapping{{Claim: claim, Dest: netip.MustParseAddrPort("10.250.0.1:80")}}}); err != nil {
		b.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		b.Fatal(err)
	}
	var total time.Duration
	err = h.Do(func(ns.NetNS) error {
		d := net.Dialer{Timeout: time.Second}
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			t0 := time.Now()
			c, err := d.Dial("tcp", "10.250.0.2:8080")
			if err != nil {
				return err
			}
			total += time.Since(t0)
			c.Close()
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(total.Nanoseconds())/1e3/float64(b.N), "conn-µs")
}

// BenchmarkKernelBackendVerbs measures the verbs as the plugin runs them (Backend.Add,
// Check and Del of a config with 2 TCP mappings and snat, a fresh Backend each, closed after
// each call), with N attachments in the table (prefill), in a namespace of its own with no
// other ruleset: the backend's own cost, which must not grow with N (point lookups). It
// reports add-ms, check-ms and del-ms per call.
//
//	go test -run '^$' -bench KernelBackendVerbs -benchtime 50x ./pkg/backend/nftables/
func BenchmarkKernelBackendVerbs(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	for _, n := range []int{0, 1000, 5000} {
		b.Run(fmt.Sprintf("N=%d", n), func(b *testing.B) { benchBackendVerbs(b, n) })
	}
}

func benchBackendVerbs(b *testing.B, n int) {
	h := ownNetns(b)
	c, err := config.Parse([]byte(`{"cniVersion":"1.0.0","name":"bench","type":"portguard","backend":"nftables","snat":true,
		"runtimeConfig":{"portMappings":[{"hostPort":60000,"containerPort":80,"protocol":"tcp"},{"hostPort":60001,"containerPort":443,"protocol":"tcp"}]},
		"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/x"}],"ips":[{"address":"10.201.0.3/16","interface":0}]}}`), "eth0")
	if err != nil {
		b.Fatal(err)
	}
	var add, check, del time.Duration
	err = h.Do(func(ns.NetNS) error {
		t, err := Open()
		if err != nil {
			return err
		}
		if _, err := t.Ensure(); err != nil {
			return err
		}
		prefill(b, t, n)
		t.Close()
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			o := hostport.Owner{Network: "bench", ContainerID: fmt.Sprintf("verbs%d", i)}
			t0 := time.Now()
			be := New()
			if _, err := be.Add(c, o, true, backend.Hooks{}); err != nil {
				return err
			}
			be.Close()
			t1 := time.Now()
			be = New()
			if p, err := be.Check(c, o); err != nil || len(p) > 0 {
				return fmt.Errorf("CHECK: %v %v", p, err)
			}
			be.Close()
			t2 := time.Now()
			be = New()
			if _, err := be.Del(c, o); err != nil {
				return err
			}
			be.Close()
			t3 := time.Now()
			add, check, del = add+t1.Sub(t0), check+t2.Sub(t1), del+t3.Sub(t2)
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1e3 / float64(b.N) }
	b.ReportMetric(ms(add), "add-ms")
	b.ReportMetric(ms(check), "check-ms")
	b.ReportMetric(ms(del), "del-ms")
}
