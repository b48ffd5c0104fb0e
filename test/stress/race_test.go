package stress

import (
	"encoding/json"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/portguard/portguard/pkg/hostport"
)

// The two races of parallel ADDs (issue 9), each provoked on purpose: a call's
// iptables-restore is held back by the shim (PGS_RESTORE_DELAY) and the test writes in
// that moment what a concurrent call or an outside writer would.

// takeoverEvent is the part of a takeover log line (the plugin prints one per takeover on
// stderr) the race tests look at.
type takeoverEvent struct {
	Family string         `json:"family"`
	From   hostport.Owner `json:"from"`
	For    hostport.Owner `json:"for"`
}

func takeoverEvents(stderr string) []takeoverEvent {
	var out []takeoverEvent
	for _, l := range strings.Split(stderr, "\n") {
		var ev struct {
			Event    string        `json:"event"`
			Takeover takeoverEvent `json:"takeover"`
		}
		if json.Unmarshal([]byte(l), &ev) == nil && ev.Event == "takeover" {
			out = append(out, ev.Takeover)
		}
	}
	return out
}

// claimants lists, in rule order, the chains whose jumps in CNI-HOSTPORT-DNAT claim
// proto/port: the first is the one traffic reaches.
func claimants(o *observation, proto string, port int) []string {
	var out []string
	for _, j := range o.s.Jumps {
		if j.IsClaim() && j.Proto == proto && j.HasPort(port) {
			out = append(out, j.Target)
		}
	}
	return out
}

// startDelayed starts an ADD whose iptables-restores each wait a second, and returns once
// the first of them has started (the call has planned against the table as it was).
func (n *node) startDelayed(t *testing.T, a *attachment, netns string) <-chan callResult {
	t.Helper()
	mark := n.dir + "/" + a.Name + ".mark"
	res := make(chan callResult, 1)
	go func() {
		res <- n.call(callSpec{Verb: "ADD", ID: a.ID, Stdin: a.netConf(30, nil), NetNS: netns,
			Env: []string{"PGS_RESTORE_DELAY=1", "PGS_MARK=" + mark}, Timeout: 60 * time.Second})
	}()
	waitMark(t, mark, 30*time.Second)
	return res
}

func (n *node) mustAdd(t *testing.T, a *attachment, netns string) callResult {
	t.Helper()
	r := n.call(callSpec{Verb: "ADD", ID: a.ID, Stdin: a.netConf(30, nil), NetNS: netns})
	if r.Exit != 0 {
		t.Fatalf("ADD %s: %s", a.Name, r)
	}
	return r
}

// TestEscalatingAddKeepsItsPorts: a dual-stack ADD (p) that must upgrade to the exclusive
// lock after its IPv4 payload landed (an outside writer removed an IPv6 entry jump
// meanwhile) keeps its port locks while it waits. An ADD of the same port (q) that came
// after p had the port must see p's whole attachment and take it over, and p must not
// take the port back. Before the fix p let go of everything while it waited: q took over
// p's half-installed claim and returned success, then p took the port back from q.
func TestEscalatingAddKeepsItsPorts(t *testing.T) {
	require(t, "socat")
	n := newNode(t, true)
	n.setupBridge()
	const port = 20001
	seed := &attachment{Name: "seed", Network: "race", ID: "race-seed", IP4: stormPrefix + "30/24", IP6: "fd00:240::30/64",
		Maps: []mapping{{"tcp", 20999, stormPodPort}}}
	// Both pods live, so the takeovers need conflictPolicy force (the race is in the locks,
	// not in judging owners).
	p := &attachment{Name: "p", Network: "race", ID: "race-p", IP4: stormPrefix + "31/24", IP6: "fd00:240::31/64",
		Maps: []mapping{{"tcp", port, stormPodPort}}, Policy: "force"}
	q := &attachment{Name: "q", Network: "race", ID: "race-q", IP4: stormPrefix + "32/24",
		Maps: []mapping{{"tcp", port, stormPodPort}}, Policy: "force"}
	pp, qp := n.newPod(0, "p", 31), n.newPod(1, "q", 32)
	n.mustAdd(t, seed, "") // the shared layout of both families exists

	pres := n.startDelayed(t, p, pp.ns)
	// An outside writer (a firewall reload) removes one of ip6tables' entry jumps while
	// p's IPv4 payload is pending: p's IPv6 family needs the layout restored, which only
	// the exclusive holder may do.
	n.inNode("ip6tables", "-w", "-t", "nat", "-D", "OUTPUT", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "CNI-HOSTPORT-DNAT")
	qr := n.call(callSpec{Verb: "ADD", ID: q.ID, Stdin: q.netConf(30, nil), NetNS: qp.ns, Timeout: 60 * time.Second})
	pr := <-pres
	if pr.Exit != 0 || qr.Exit != 0 {
		t.Fatalf("ADD p: %s\nADD q: %s", pr, qr)
	}
	for _, ev := range takeoverEvents(pr.Stderr) {
		if ev.From == q.owner() {
			t.Errorf("p, whose ADD held the port first, took it back from q, which had taken it over from p: %+v", ev)
		}
	}
	var fromP []string
	for _, ev := range takeoverEvents(qr.Stderr) {
		if ev.From == p.owner() {
			fromP = append(fromP, ev.Family)
		}
	}
	if len(fromP) != 1 || fromP[0] != "ipv4" {
		t.Errorf("q's takeovers from p: %v, want [ipv4]", fromP)
	}
	if got := claimants(n.mustObserve(hostport.V4), "tcp", port); len(got) != 1 || got[0] != q.chain() {
		t.Errorf("ipv4 tcp/%d claimed by %v, want q's %s only", port, got, q.chain())
	}
	if got := claimants(n.mustObserve(hostport.V6), "tcp", port); len(got) != 1 || got[0] != p.chain() {
		t.Errorf("ipv6 tcp/%d claimed by %v, want p's %s only", port, got, p.chain())
	}
	if ans, err := n.dialNode(port); err != nil || ans != "q" {
		t.Errorf("%s:%d answered %q (%v), want q", stormNodeIP, port, ans, err)
	}
	if t.Failed() {
		t.Logf("ADD p: %s\n%s\nADD q: %s\n%s", pr, pr.Stderr, qr, qr.Stderr)
	}
}

// TestRewrittenJumpKeepsItsPlace: a partial takeover rewrites the victim's jump to the
// ports it keeps; where another claim on such a port exists, the rewritten jump must keep
// its precedence over it, however parallel calls move the rule numbers meanwhile.
// Before the fix the rewritten jump was inserted at the rule number read before the
// payload, and a concurrent insert at the top (an ADD of another port) or delete above it
// (DELs) moved it across the other claim.
func TestRewrittenJumpKeepsItsPlace(t *testing.T) {
	require(t, "socat")
	tcp := func(ports ...int) []mapping {
		var out []mapping
		for _, p := range ports {
			out = append(out, mapping{"tcp", p, stormPodPort})
		}
		return out
	}
	att := func(name string, host int, policy string, ports ...int) *attachment {
		return &attachment{Name: name, Network: "race", ID: "race-" + name, IP4: stormPrefix + strconv.Itoa(host) + "/24",
			Maps: tcp(ports...), Policy: policy}
	}

	// The other claim comes first: w (conflictPolicy allow) claims 20012 after v, which
	// keeps it, so w's jump is above v's and w answers. Meanwhile an ADD of another port
	// inserts its jump at the top.
	t.Run("insert above", func(t *testing.T) {
		n := newNode(t, true)
		n.setupBridge()
		v, w := att("v", 40, "", 20011, 20012), att("w", 41, "allow", 20012)
		p, q := att("p", 42, "force", 20011), att("q", 43, "", 20013) // v lives: force
		vp, wp := n.newPod(0, "v", 40), n.newPod(1, "w", 41)
		n.mustAdd(t, v, vp.ns)
		n.mustAdd(t, w, wp.ns)
		pres := n.startDelayed(t, p, "")
		n.mustAdd(t, q, "")
		if pr := <-pres; pr.Exit != 0 {
			t.Fatalf("ADD p: %s", pr)
		}
		o := n.mustObserve(hostport.V4)
		if got := claimants(o, "tcp", 20012); len(got) != 2 || got[0] != w.chain() || got[1] != v.chain() {
			t.Errorf("tcp/20012 claimed by %v, want w's %s before v's %s:\n%s", got, w.chain(), v.chain(), o.raw)
		}
		if ans, err := n.dialNode(20012); err != nil || ans != "w" {
			t.Errorf("%s:20012 answered %q (%v), want w", stormNodeIP, ans, err)
		}
	})

	// The other claim comes after: v (allow) claims 20022 after w, so v's jump is above
	// w's and v answers; two jumps above v's are DELeted while p's payload is pending.
	t.Run("delete above", func(t *testing.T) {
		n := newNode(t, true)
		n.setupBridge()
		w, v := att("w", 41, "", 20022), att("v", 40, "allow", 20021, 20022)
		x2, x1 := att("x2", 110, "", 20024), att("x1", 111, "", 20025)
		p := att("p", 42, "force", 20021) // v lives: force
		wp, vp := n.newPod(0, "w", 41), n.newPod(1, "v", 40)
		n.mustAdd(t, w, wp.ns)
		n.mustAdd(t, v, vp.ns)
		n.mustAdd(t, x2, "")
		n.mustAdd(t, x1, "")
		pres := n.startDelayed(t, p, "")
		dels := make(chan callResult, 2)
		for _, x := range []*attachment{x1, x2} {
			go func(x *attachment) {
				dels <- n.call(callSpec{Verb: "DEL", ID: x.ID, Stdin: x.netConf(30, nil), Timeout: 60 * time.Second})
			}(x)
		}
		for i := 0; i < 2; i++ {
			if r := <-dels; r.Exit != 0 {
				t.Errorf("DEL: %s", r)
			}
		}
		if pr := <-pres; pr.Exit != 0 {
			t.Fatalf("ADD p: %s", pr)
		}
		o := n.mustObserve(hostport.V4)
		if got := claimants(o, "tcp", 20022); len(got) != 2 || got[0] != v.chain() || got[1] != w.chain() {
			t.Errorf("tcp/20022 claimed by %v, want v's %s before w's %s:\n%s", got, v.chain(), w.chain(), o.raw)
		}
		if ans, err := n.dialNode(20022); err != nil || ans != "v" {
			t.Errorf("%s:20022 answered %q (%v), want v", stormNodeIP, ans, err)
		}
	})
}
