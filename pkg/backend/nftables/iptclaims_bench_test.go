package nftables

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/portguard/portguard/pkg/hostport"
)

// BenchmarkKernelIptablesObserve measures what ADD and CHECK of the nftables backend spend
// per family on iptables-format claims (the legacy check and observeIptables of one claim on
// a port no iptables claim holds), in a namespace of its own with M iptables-nft attachments
// of upstream's format (one jump and one DNAT rule each) on other ports; M = -1: no ip nat
// table at all (a node that never ran iptables-nft). It reports µs per observation.
//
//	go test -run '^$' -bench KernelIptablesObserve -benchtime 2000x ./pkg/backend/nftables/
func BenchmarkKernelIptablesObserve(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	for _, m := range []int{-1, 0, 1000} {
		b.Run(fmt.Sprintf("M=%d", m), func(b *testing.B) { benchIptObserve(b, m) })
	}
}

func benchIptObserve(b *testing.B, m int) {
	h := ownNetns(b)
	if m >= 0 {
		var p strings.Builder
		p.WriteString("*nat\n:CNI-HOSTPORT-DNAT - [0:0]\n-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT\n")
		for i := 0; i < m; i++ {
			o := hostport.Owner{Network: "bench", ContainerID: fmt.Sprintf("c%d", i)}
			ch := hostport.ChainName(o)
			fmt.Fprintf(&p, ":%s - [0:0]\n-A %s -p tcp -m tcp --dport %d -j DNAT --to-destination 10.201.%d.%d:80\n", ch, ch, 20000+i, i>>8&255, i&255)
			fmt.Fprintf(&p, "-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment %q -m multiport --dports %d -j %s\n", hostport.Comment(o), 20000+i, ch)
		}
		p.WriteString("COMMIT\n")
		cmd := exec.Command("ip", "netns", "exec", strings.TrimPrefix(h.Path(), "/var/run/netns/"), "iptables-restore", "--noflush", "-w")
		cmd.Stdin = strings.NewReader(p.String())
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("iptables-restore: %v %s", err, out)
		}
	}
	var t *Table
	if err := h.Do(func(ns.NetNS) (err error) { t, err = Open(); return err }); err != nil {
		b.Fatal(err)
	}
	defer t.Close()
	o := hostport.Owner{Network: "bench", ContainerID: "new"}
	cs := []hostport.Claim{{Family: hostport.V4, Proto: "tcp", HostPort: 10000}}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if l, err := t.legacyClaims(hostport.V4, cs); err != nil || len(l) != 0 {
			b.Fatal(l, err)
		}
		v, err := t.observeIptables(hostport.V4, o, cs)
		if err != nil {
			b.Fatal(err)
		}
		if p, err := t.planIptables(v, o, cs); err != nil || len(p.ops) != 0 {
			b.Fatal(p, err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N), "µs/observe")
}
