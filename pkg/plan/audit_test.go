package plan

import (
	"fmt"
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/iptables/iptablestest"
	"github.com/portguard/portguard/pkg/state"
)

// upstreamChain writes an attachment the way upstream portmap v1.10.0 does (as
// iptables-save prints it): the jump (appended) and, per port, the hairpin and localhost
// mark rules and the DNAT. dnatPort lets the chain DNAT another port than the jump claims.
func upstreamChain(o hostport.Owner, jumpPort, dnatPort int, podIP string, podPort int) (jump string, chain []string) {
	ch := hostport.ChainName(o)
	jump = fmt.Sprintf(`-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"%s\" id: \"%s\"" -m multiport --dports %d -j %s`, o.Network, o.ContainerID, jumpPort, ch)
	chain = []string{
		fmt.Sprintf(":%s - [0:0]", ch),
		fmt.Sprintf("-A %s -s %s/24 -p tcp -m tcp --dport %d -j CNI-HOSTPORT-SETMARK", ch, podIP[:strings.LastIndex(podIP, ".")]+".0", dnatPort),
		fmt.Sprintf("-A %s -s 127.0.0.1/32 -p tcp -m tcp --dport %d -j CNI-HOSTPORT-SETMARK", ch, dnatPort),
		fmt.Sprintf("-A %s -p tcp -m tcp --dport %d -j DNAT --to-destination %s:%d", ch, dnatPort, podIP, podPort),
	}
	return jump, chain
}

const sharedHead = `*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
:CNI-HOSTPORT-SETMARK - [0:0]
:CNI-HOSTPORT-MASQ - [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A POSTROUTING -m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ
-A CNI-HOSTPORT-SETMARK -m comment --comment "CNI portfwd masquerade mark" -j MARK --set-xmark 0x2000/0x2000
-A CNI-HOSTPORT-MASQ -m mark --mark 0x2000/0x2000 -j MASQUERADE
`

func stateOf(t *testing.T, text string) *state.State {
	t.Helper()
	tb := iptables.NewTable()
	if err := tb.Parse(text); err != nil {
		t.Fatal(err)
	}
	tb.Full = true // a whole table, as state.ObserveAll reads it
	return state.New(hostport.V4, tb)
}

var (
	ownerOld = hostport.Owner{Network: "net", ContainerID: "old"}
	ownerNew = hostport.Owner{Network: "net", ContainerID: "new"}
	ownerBad = hostport.Owner{Network: "net", ContainerID: "bad"}
)

// blogState: the blog post's node: a chain whose jump claims 8080 but DNATs 8086, an old
// claim on 8080, and the new pod's claim appended last (upstream appends).
func blogState(t *testing.T) string {
	jb, cb := upstreamChain(ownerBad, 8080, 8086, "10.88.0.9", 80)
	jo, co := upstreamChain(ownerOld, 8080, 8080, "10.88.0.2", 80)
	jn, cn := upstreamChain(ownerNew, 8080, 8080, "10.88.0.3", 80)
	var b strings.Builder
	b.WriteString(sharedHead)
	for _, c := range [][]string{cb, co, cn} {
		b.WriteString(strings.Join(c, "\n") + "\n")
	}
	b.WriteString(jb + "\n" + jo + "\n" + jn + "\nCOMMIT\n")
	return b.String()
}

func kinds(fa FamilyAudit) map[string]int {
	out := map[string]int{}
	for _, p := range fa.Problems {
		out[p.Kind]++
	}
	return out
}

func TestAuditBlogState(t *testing.T) {
	fa := Audit(stateOf(t, blogState(t)))
	if len(fa.Ports) != 1 || fa.Ports[0].HostPort != 8080 || len(fa.Ports[0].Claims) != 3 {
		t.Fatalf("ports: %+v", fa.Ports)
	}
	cl := fa.Ports[0].Claims
	want := []struct {
		id, status, dest string
	}{{"bad", StatusNoDNAT, ""}, {"old", StatusWins, "10.88.0.2:80"}, {"new", StatusShadowed, "10.88.0.3:80"}}
	for i, w := range want {
		if cl[i].ContainerID != w.id || cl[i].Status != w.status || cl[i].Destination != w.dest || cl[i].Position != i+1 {
			t.Errorf("claim %d = %+v, want %+v", i, cl[i], w)
		}
	}
	k := kinds(fa)
	if k[KindShadowedClaim] != 1 || k[KindPortMismatch] != 1 || len(fa.Problems) != 2 {
		t.Fatalf("problems: %+v", fa.Problems)
	}
	if fa.Summary.DuplicateClaims != 1 || fa.Summary.PortMismatches != 1 || fa.Summary.Claims != 3 {
		t.Fatalf("summary %+v", fa.Summary)
	}
	for _, p := range fa.Problems {
		if p.Kind == KindPortMismatch && (!strings.Contains(p.Message, "tcp/8086") || !strings.Contains(p.Message, "tcp/8080")) {
			t.Errorf("mismatch message lacks ports: %s", p.Message)
		}
	}
}

// applyTx applies a transaction to a table given as iptables-save text, as
// iptables-restore would (pkg/iptables/iptablestest), and returns the table after it.
func applyTx(t *testing.T, text string, tx *iptables.Tx) string {
	t.Helper()
	k, err := iptablestest.New(map[hostport.Family]string{hostport.V4: text})
	if err != nil {
		t.Fatal(err)
	}
	payload, err := tx.Render()
	if err != nil {
		t.Fatal(err)
	}
	if err := k.Restore(hostport.V4, payload); err != nil {
		t.Fatalf("%v\n%s", err, payload)
	}
	return k.Dump(hostport.V4)
}

func TestRepairBlogState(t *testing.T) {
	text := blogState(t)
	res, err := Repair(stateOf(t, text), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	after := applyTx(t, text, res.Tx)
	fa := Audit(stateOf(t, after))
	if !fa.Healthy() {
		t.Fatalf("after repair: %+v\n%s", fa.Problems, after)
	}
	// By default the last added claim (upstream appends: the last jump) is kept.
	if len(fa.Ports) != 1 || len(fa.Ports[0].Claims) != 1 || fa.Ports[0].Claims[0].ContainerID != "new" {
		t.Fatalf("after repair ports: %+v", fa.Ports)
	}
	for _, keep := range []string{"KUBE-SERVICES", `"kubernetes service portals"`} {
		if !strings.Contains(after, keep) {
			t.Errorf("repair lost %s", keep)
		}
	}
	// --keep the first claim instead.
	res, err = Repair(stateOf(t, text), map[hostport.Owner]bool{ownerOld: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	fa = Audit(stateOf(t, applyTx(t, text, res.Tx)))
	if !fa.Healthy() || len(fa.Ports[0].Claims) != 1 || fa.Ports[0].Claims[0].ContainerID != "old" {
		t.Fatalf("--keep old: %+v %+v", fa.Problems, fa.Ports)
	}
}

func TestRepairKeepConflictAndUnknown(t *testing.T) {
	text := blogState(t)
	if _, err := Repair(stateOf(t, text), map[hostport.Owner]bool{ownerNew: true, ownerOld: true}, nil); err == nil {
		t.Fatal("two conflicting --keep owners accepted")
	}
	res, err := Repair(stateOf(t, text), map[hostport.Owner]bool{{Network: "x", ContainerID: "y"}: true}, nil)
	if err != nil || len(res.UnknownKeep) != 1 {
		t.Fatalf("unknown keep: %v %v", err, res.UnknownKeep)
	}
}

func TestAuditSharedAndOrphans(t *testing.T) {
	jo, co := upstreamChain(ownerOld, 8080, 8080, "10.88.0.2", 80)
	_, corphan := upstreamChain(ownerBad, 9090, 9090, "10.88.0.5", 80)
	text := "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:CNI-HOSTPORT-DNAT - [0:0]\n:CNI-HOSTPORT-SETMARK - [0:0]\n" +
		strings.Join(co, "\n") + "\n" + strings.Join(corphan, "\n") + "\n" + jo + "\n" + jo + "\nCOMMIT\n"
	fa := Audit(stateOf(t, text))
	k := kinds(fa)
	want := map[string]int{KindMissingEntryJump: 2, KindMissingSetMark: 1, KindMissingMasq: 1, KindMissingMasqJump: 1, KindOrphanChain: 1, KindDuplicateJump: 1}
	for kind, n := range want {
		if k[kind] != n {
			t.Errorf("%s: %d problems, want %d (%+v)", kind, k[kind], n, fa.Problems)
		}
	}
	if len(fa.Problems) != 7 || fa.Summary.MissingEntryJumps != 2 || fa.Summary.MissingMasquerade != 3 || fa.Summary.OrphanChains != 1 {
		t.Errorf("problems %d summary %+v", len(fa.Problems), fa.Summary)
	}
	res, err := Repair(stateOf(t, text), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	after := applyTx(t, text, res.Tx)
	if fa := Audit(stateOf(t, after)); !fa.Healthy() {
		t.Fatalf("after repair: %+v\n%s", fa.Problems, after)
	}
	// Nothing to do on a healthy table: an empty transaction.
	res, _ = Repair(stateOf(t, after), nil, nil)
	if res.Tx.Changes() {
		p, _ := res.Tx.Render()
		t.Fatalf("repair of a healthy table changes it:\n%s", p)
	}
}

func TestAuditHostIPsAndPartialLoss(t *testing.T) {
	// old claims 8080 on 192.0.2.1 and 9090 on every address; new claims 8080 on 192.0.2.7
	// (no conflict) and 9090 (conflict). Repair keeps new's 9090 (the last added), removes
	// old's 9090 only: old keeps its chain for 8080.
	co, cn := hostport.ChainName(ownerOld), hostport.ChainName(ownerNew)
	text := sharedHead + fmt.Sprintf(`:%[1]s - [0:0]
:%[2]s - [0:0]
-A %[1]s -d 192.0.2.1/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.88.0.2:80
-A %[1]s -p tcp -m tcp --dport 9090 -j DNAT --to-destination 10.88.0.2:90
-A %[2]s -d 192.0.2.7/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.88.0.3:80
-A %[2]s -p tcp -m tcp --dport 9090 -j DNAT --to-destination 10.88.0.3:90
-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"net\" id: \"old\"" -m multiport --dports 8080,9090 -j %[1]s
-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"net\" id: \"new\"" -m multiport --dports 8080,9090 -j %[2]s
COMMIT
`, co, cn)
	fa := Audit(stateOf(t, text))
	if k := kinds(fa); len(fa.Problems) != 1 || k[KindShadowedClaim] != 1 || fa.Problems[0].HostPort != 9090 {
		t.Fatalf("problems %+v", fa.Problems)
	}
	res, err := Repair(stateOf(t, text), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	after := applyTx(t, text, res.Tx)
	fa = Audit(stateOf(t, after))
	if !fa.Healthy() || fa.Summary.Claims != 3 {
		t.Fatalf("after: %+v %+v\n%s", fa.Problems, fa.Summary, after)
	}
	if !strings.Contains(after, "--dports 8080 -j "+co) || !strings.Contains(after, "--dports 8080,9090 -j "+cn) {
		t.Fatalf("old's jump not rewritten to 8080, or new's touched:\n%s", after)
	}
}

// What portguard's own ADD writes (on a fresh node, then a takeover) audits healthy, and
// repair has nothing to do: audit and ADD agree on the layout.
func TestPortguardAddsAuditHealthy(t *testing.T) {
	text := "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n"
	for _, id := range []string{"a", "b", "c"} {
		s := stateOf(t, text)
		d := desired(t, id, `{"hostPort":8080,"containerPort":80,"protocol":"tcp"},{"hostPort":53,"containerPort":53,"protocol":"udp"}`)
		res := Add(s, d, "takeover")
		if res.Tx == nil || len(res.Need) > 0 {
			t.Fatalf("add %s: %+v", id, res)
		}
		text = applyTx(t, text, res.Tx)
		fa := Audit(stateOf(t, text))
		if !fa.Healthy() || fa.Summary.Claims != 2 {
			t.Fatalf("after ADD %s: %+v %+v\n%s", id, fa.Problems, fa.Summary, text)
		}
		if r, _ := Repair(stateOf(t, text), nil, nil); r.Tx.Changes() {
			t.Fatalf("repair after ADD %s: %v", id, r.Actions)
		}
	}
}
