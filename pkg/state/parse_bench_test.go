package state

import (
	"fmt"
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
)

// BenchmarkObserveDNAT1000 is the Go side of every ADD and CHECK on a node with 1,000
// host-port pods: parse `iptables -S CNI-HOSTPORT-DNAT` and build the model.
func BenchmarkObserveDNAT1000(b *testing.B) {
	var out strings.Builder
	out.WriteString("-N CNI-HOSTPORT-DNAT\n")
	for i := 0; i < 1000; i++ {
		o := hostport.Owner{Network: "cbr0", ContainerID: fmt.Sprintf("%064x", i)}
		fmt.Fprintf(&out, "-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment %s -m multiport --dports %d,%d -j %s\n",
			iptables.QuoteArg(hostport.Comment(o)), 20000+2*i, 20001+2*i, hostport.ChainName(o))
	}
	text := out.String()
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		t := iptables.NewTable()
		if err := t.Parse(text); err != nil {
			b.Fatal(err)
		}
		if s := New(hostport.V4, t); len(s.Jumps) != 1000 {
			b.Fatalf("%d jumps", len(s.Jumps))
		}
	}
}
