package takeover

import (
	"encoding/json"
	"net"
	"strings"
	"testing"

	"github.com/portguard/portguard/test/testbed"
)

// nftNet is a portguard network with "backend": "nftables".
func nftNet(b *testbed.Bed, c testbed.NetConfig) *testbed.Network {
	n, _ := pgNet(b, c, map[string]any{"backend": "nftables"})
	return n
}

// nftTable lists portguard's table in the node netns ("" when there is none).
func nftTable(t *testing.T, b *testbed.Bed) string {
	t.Helper()
	out, err := b.Exec(b.Node, "nft", "list", "table", "inet", "portguard")
	if err != nil {
		return ""
	}
	return out
}

// wantNoIPTablesClaims asserts that the nftables backend wrote nothing into iptables.
func wantNoIPTablesClaims(t *testing.T, b *testbed.Bed) {
	t.Helper()
	for _, f := range families {
		if d := b.DNChains(f); len(d) != 0 {
			t.Errorf("%s: iptables CNI-DN chains %v with the nftables backend", f, d)
		}
	}
}

// With "backend": "nftables" the plugin forwards TCP and UDP host ports in both families
// from its inet table, CHECK passes, a re-ADD of the same attachment changes nothing, CHECK
// fails once an element is deleted behind its back, and DEL removes every element of the
// attachment (and is idempotent).
func TestNFTablesVerbs(t *testing.T) {
	b := newBed(t)
	n := nftNet(b, testbed.NetConfig{})
	p := b.NewPod("A")
	p.Serve(80)
	prev := n.MustAdd(p, testbed.TCP(8080, 80), testbed.UDP(8080, 80))
	for _, f := range families {
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8080, "A")
		wantAnswer(t, b, "udp", b.NodeIP(f), 8080, "A")
	}
	wantNoIPTablesClaims(t, b)
	if err := n.Check(p); err != nil {
		t.Errorf("CHECK right after ADD: %v", err)
	}
	before := nftTable(t, b)
	if !strings.Contains(before, p.ContainerID) {
		t.Fatalf("no element of %s in the table:\n%s", p.ContainerID, before)
	}
	if res, err := reAdd(t, b, n, p, prev.Stdout, testbed.TCP(8080, 80), testbed.UDP(8080, 80)); err != nil {
		t.Fatalf("re-ADD: %v\n%s", err, res.Stderr)
	}
	if after := nftTable(t, b); after != before {
		t.Errorf("re-ADD changed the table:\nbefore:\n%s\nafter:\n%s", before, after)
	}

	b.MustExec(b.Node, "nft", "delete", "element", "inet", "portguard", "any4", "{ tcp . 8080 }")
	if err := n.Check(p); err == nil {
		t.Errorf("CHECK passed with the IPv4 TCP element deleted")
	}
	wantNoAnswerFrom(t, b, "tcp", b.NodeIP4, 8080, "A")
	wantAnswer(t, b, "tcp", b.NodeIP6, 8080, "A")

	n.MustDel(p)
	if tbl := nftTable(t, b); strings.Contains(tbl, p.ContainerID) {
		t.Errorf("DEL left elements of %s:\n%s", p.ContainerID, tbl)
	}
	for _, f := range families {
		wantNoAnswerFrom(t, b, "tcp", b.NodeIP(f), 8080, "A")
	}
	n.MustDel(p) // idempotent
}

// A pod killed without DEL leaves its claim; the next pod asking for the port takes it
// over and answers in both families, and nothing of the dead pod stays in the table.
func TestNFTablesStaleClaimTakenOver(t *testing.T) {
	b := newBed(t)
	n := nftNet(b, testbed.NetConfig{})
	a := b.NewPod("A")
	a.Serve(80)
	n.MustAdd(a, testbed.TCP(8081, 80))
	wantAnswer(t, b, "tcp", b.NodeIP4, 8081, "A")
	a.Kill()

	c := b.NewPod("B")
	c.Serve(80)
	n.MustAdd(c, testbed.TCP(8081, 80))
	for _, f := range families {
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8081, "B")
	}
	if tbl := nftTable(t, b); strings.Contains(tbl, a.ContainerID) {
		t.Errorf("the dead pod's elements stayed:\n%s", tbl)
	}
	if err := n.Check(c); err != nil {
		t.Errorf("CHECK of the new owner: %v", err)
	}
}

// A live owner keeps its port: the contender's ADD fails with code 100 and changes
// nothing, and the contender's DEL leaves the owner answering.
func TestNFTablesLiveOwnerKeepsItsPort(t *testing.T) {
	b := newBed(t)
	n := nftNet(b, testbed.NetConfig{})
	a := b.NewPod("A")
	a.Serve(80)
	n.MustAdd(a, testbed.TCP(8082, 80))
	before := nftTable(t, b)

	c := b.NewPod("B")
	c.Serve(80)
	prev := n.MustAdd(c)
	res, err := reAdd(t, b, n, c, prev.Stdout, testbed.TCP(8082, 80))
	if err == nil {
		t.Fatalf("ADD of B on A's live port succeeded:\n%s", res.Stderr)
	}
	var cniErr struct {
		Code int `json:"code"`
	}
	if json.Unmarshal([]byte(res.Stdout), &cniErr) != nil || cniErr.Code != refusedCode {
		t.Errorf("refused ADD: stdout %q, want a CNI error with code %d", res.Stdout, refusedCode)
	}
	if after := nftTable(t, b); after != before {
		t.Errorf("refused ADD changed the table:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	n.MustDel(c)
	for _, f := range families {
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8082, "A")
	}
	if err := n.Check(a); err != nil {
		t.Errorf("CHECK of the owner after the contender's DEL: %v", err)
	}
}

// GC removes the elements of attachments the runtime no longer lists, and keeps the valid.
func TestNFTablesGC(t *testing.T) {
	b := newBed(t)
	n := nftNet(b, testbed.NetConfig{})
	a, c := b.NewPod("A"), b.NewPod("B")
	a.Serve(80)
	c.Serve(80)
	n.MustAdd(a, testbed.TCP(8083, 80))
	n.MustAdd(c, testbed.TCP(8084, 80))
	if res, err := gcCall(t, b, n, c); err != nil {
		t.Fatalf("GC: %v\n%s", err, res.Stderr)
	}
	tbl := nftTable(t, b)
	if strings.Contains(tbl, a.ContainerID) {
		t.Errorf("GC left the invalid owner's elements:\n%s", tbl)
	}
	wantNoAnswerFrom(t, b, "tcp", b.NodeIP4, 8083, "A")
	for _, f := range families {
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8084, "B")
	}
}

// Upstream portmap's nftables backend (v1.10.0, tables ip/ip6 cni_hostport) left a claim:
// a dead pod's rule is taken over in the same batch that installs the new claim, and the new
// pod answers in both families; a live pod's rule refuses the ADD and keeps answering.
func TestNFTablesUpstreamClaims(t *testing.T) {
	b := newBed(t)
	up := b.Network(testbed.NetConfig{PortPlugin: "portmap", PortConf: map[string]any{"backend": "nftables"}})
	n := nftNet(b, testbed.NetConfig{Bridge: "cni1"})
	upstreamRules := func() string {
		out := ""
		for _, fam := range []string{"ip", "ip6"} {
			o, _ := b.Exec(b.Node, "nft", "list", "table", fam, "cni_hostport")
			out += o
		}
		return out
	}

	live := b.NewPod("L")
	live.Serve(80)
	up.MustAdd(live, testbed.TCP(8086, 80))
	wantAnswer(t, b, "tcp", b.NodeIP4, 8086, "L")
	c := b.NewPod("C")
	c.Serve(80)
	if _, err := n.Add(c, testbed.TCP(8086, 80)); err == nil {
		t.Errorf("ADD on the port of a live upstream pod succeeded")
	}
	if tbl := nftTable(t, b); strings.Contains(tbl, c.ContainerID) {
		t.Errorf("refused ADD left elements:\n%s", tbl)
	}
	n.MustDel(c)
	for _, f := range families {
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8086, "L")
	}

	dead := b.NewPod("D")
	dead.Serve(80)
	up.MustAdd(dead, testbed.TCP(8087, 80))
	for _, f := range families {
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8087, "D")
	}
	if !strings.Contains(upstreamRules(), dead.ContainerID) {
		t.Fatalf("upstream wrote no rule of %s:\n%s", dead.ContainerID, upstreamRules())
	}
	dead.Kill()
	p := b.NewPod("B")
	p.Serve(80)
	n.MustAdd(p, testbed.TCP(8087, 80))
	for _, f := range families {
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8087, "B")
	}
	if r := upstreamRules(); strings.Contains(r, dead.ContainerID) {
		t.Errorf("the dead pod's upstream rules stayed:\n%s", r)
	}
	if err := n.Check(p); err != nil {
		t.Errorf("CHECK after the takeover: %v", err)
	}
}

// conditionsV4 hold per attachment, never table-wide: a network whose condition excludes
// the client does not forward it, while another network's pod (no conditions) still
// answers the same client, and the excluded network still forwards IPv6 (no conditionsV6).
func TestNFTablesConditionsPerNetwork(t *testing.T) {
	b := newBed(t)
	client := net.IP(append([]byte(nil), b.NodeIP4.To4()...))
	client[3] = 2
	n1, _ := pgNet(b, testbed.NetConfig{}, map[string]any{"backend": "nftables", "conditionsV4": []string{"ip saddr != " + client.String()}})
	n2 := nftNet(b, testbed.NetConfig{Bridge: "cni1"})
	a, c := b.NewPod("A"), b.NewPod("B")
	a.Serve(80)
	c.Serve(80)
	n1.MustAdd(a, testbed.TCP(8088, 80))
	n2.MustAdd(c, testbed.TCP(8089, 80))
	wantNoAnswerFrom(t, b, "tcp", b.NodeIP4, 8088, "A")
	wantAnswer(t, b, "tcp", b.NodeIP6, 8088, "A")
	for _, f := range families {
		wantAnswer(t, b, "tcp", b.NodeIP(f), 8089, "B")
	}
	if err := n1.Check(a); err != nil {
		t.Errorf("CHECK with conditions: %v", err)
	}
}
