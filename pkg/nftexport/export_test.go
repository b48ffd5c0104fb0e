package nftexport

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/backend/nftables"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/nftaudit"
)

var (
	own  = hostport.Owner{Network: "net", ContainerID: "c1"}
	long = hostport.Owner{Network: "net", ContainerID: strings.Repeat("x", 200)}
)

func elem(o hostport.Owner, c hostport.Claim, dest string) nftables.Element {
	e := nftables.Element{Claim: c, Dest: netip.MustParseAddrPort(dest), Comment: nftables.OwnerComment(o)}
	e.Owner, _ = nftables.ParseOwner(e.Comment)
	return e
}

func claim(f hostport.Family, proto string, port int, hostIP string) hostport.Claim {
	c := hostport.Claim{Family: f, Proto: proto, HostPort: port}
	if hostIP != "" {
		c.HostIP = netip.MustParseAddr(hostIP)
	}
	return c
}

func observed() nftables.Observed {
	return nftables.Observed{Table: true, Dump: nftables.Dump{
		Claims: []nftables.Element{
			elem(own, claim(hostport.V4, "tcp", 8080, ""), "10.0.0.2:80"),
			elem(own, claim(hostport.V6, "tcp", 8080, ""), "[fd00::2]:80"),
			elem(own, claim(hostport.V4, "udp", 53, "192.0.2.1"), "10.0.0.2:5353"),
		},
		Masq:    []nftables.MasqElement{{Family: hostport.V4, PodIP: netip.MustParseAddr("10.0.0.2"), Owner: own, Comment: nftables.OwnerComment(own)}},
		Subnets: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/24")},
	}}
}

// The script is upstream's layout and rules, commented with the container ID, and ends
// with the deletion of portguard's table; the iptables config has one mapping per
// (protocol, port, container port, host IP), the pod's subnet prefix and snat.
func TestPlanUpstream(t *testing.T) {
	atts, err := Attachments(observed(), nil)
	if err != nil || len(atts) != 1 {
		t.Fatalf("Attachments: %v %v", atts, err)
	}
	p, err := PlanUpstream(atts, observed())
	if err != nil {
		t.Fatal(err)
	}
	s := p.Script()
	for _, want := range []string{
		"add chain ip cni_hostport prerouting { type nat hook prerouting priority -100 ; }",
		"add rule ip cni_hostport output fib daddr type local jump hostports_all",
		`add rule ip cni_hostport hostports tcp dport 8080 dnat to 10.0.0.2:80 comment "c1"`,
		`add rule ip6 cni_hostport hostports tcp dport 8080 dnat to [fd00::2]:80 comment "c1"`,
		`add rule ip cni_hostport hostports ip daddr 192.0.2.1 udp dport 53 dnat to 10.0.0.2:5353 comment "c1"`,
		`add rule ip cni_hostport masquerading ip saddr 10.0.0.2 ip daddr 10.0.0.2 masquerade comment "c1"`,
		`add rule ip cni_hostport masquerading ip saddr 127.0.0.1 ip daddr 10.0.0.2 masquerade comment "c1"`,
	} {
		if !strings.Contains(s, want+"\n") {
			t.Errorf("script lacks %q:\n%s", want, s)
		}
	}
	if !strings.HasSuffix(s, "delete table inet portguard\n") || strings.Contains(s, "ip6 cni_hostport masquerading") {
		t.Errorf("script:\n%s", s)
	}
	c := IPTablesConfig(atts[0])
	if len(c.Mappings) != 2 || !c.SNAT || c.PodIPs[hostport.V4] != netip.MustParsePrefix("10.0.0.2/24") || c.MarkBit != 13 {
		t.Errorf("iptables config: %+v", c)
	}
}

// An identical upstream rule is not written twice; another container's rule on a claimed
// port refuses the export.
func TestPlanUpstreamExisting(t *testing.T) {
	o := observed()
	atts, _ := Attachments(o, nil)
	o.Upstream = []nftables.UpstreamRule{{Family: hostport.V4, Chain: nftables.UpstreamHostports, ContainerID: "c1",
		Claim: claim(hostport.V4, "tcp", 8080, ""), Dest: netip.MustParseAddrPort("10.0.0.2:80")}}
	p, err := PlanUpstream(atts, o)
	if err != nil || strings.Contains(p.Script(), "ip cni_hostport hostports tcp dport 8080") {
		t.Errorf("identical rule written again (%v):\n%s", err, p.Script())
	}
	o.Upstream[0].ContainerID = "other"
	if _, err := PlanUpstream(atts, o); err == nil || !strings.Contains(err.Error(), "repair") {
		t.Errorf("conflict with another container's rule: %v", err)
	}
}

// Claims with conditions and owners that cannot be named are refused; a hashed owner
// portguard recorded is named.
func TestAttachmentsRefuse(t *testing.T) {
	o := observed()
	o.Dump.Claims[0].Gate = "cond-4-0123456789abcdef"
	if _, err := Attachments(o, nil); err == nil || !strings.Contains(err.Error(), "conditions") {
		t.Errorf("conditions: %v", err)
	}
	o = nftables.Observed{Table: true, Dump: nftables.Dump{Claims: []nftables.Element{elem(long, claim(hostport.V4, "tcp", 1, ""), "10.0.0.3:1")}}}
	if _, err := Attachments(o, nil); err == nil {
		t.Error("hashed owner without a record exported")
	}
	atts, err := Attachments(o, nftaudit.Resolver([]hostport.Owner{long}))
	if err != nil || len(atts) != 1 || atts[0].Owner != long {
		t.Errorf("hashed owner with a record: %v %v", atts, err)
	}
}
