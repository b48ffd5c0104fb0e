package plan

import (
	"fmt"
	"sort"
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/liveness"
)

var (
	ownerX      = hostport.Owner{Network: "net", ContainerID: "x9090"}
	ownerY      = hostport.Owner{Network: "net", ContainerID: "y9090"}
	ownerOrphan = hostport.Owner{Network: "net", ContainerID: "orphan"}
)

// twoBrokenPorts: the blog post's node (tcp/8080: bad's jump without DNAT, old shadowing
// new) plus a second contested port (tcp/9090: x shadowing y), an orphan chain of
// ownerOrphan that DNATs tcp/7070, and a missing OUTPUT entry jump.
func twoBrokenPorts(t *testing.T) string {
	text := blogState(t)
	jx, cx := upstreamChain(ownerX, 9090, 9090, "10.88.0.20", 90)
	jy, cy := upstreamChain(ownerY, 9090, 9090, "10.88.0.21", 90)
	_, co := upstreamChain(ownerOrphan, 7070, 7070, "10.88.0.30", 70)
	extra := strings.Join(cx, "\n") + "\n" + strings.Join(cy, "\n") + "\n" + strings.Join(co, "\n") + "\n" + jx + "\n" + jy + "\nCOMMIT\n"
	text = strings.Replace(text, "COMMIT\n", extra, 1)
	return strings.Replace(text, "-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT\n", "", 1)
}

// problemSet lists an audit's problems as "kind chain-owner port" for comparison.
func problemSet(fa FamilyAudit) []string {
	var out []string
	for _, p := range fa.Problems {
		out = append(out, fmt.Sprintf("%s %s %s/%d", p.Kind, p.ContainerID, p.Protocol, p.HostPort))
	}
	sort.Strings(out)
	return out
}

func removalSet(rs []RepairRemoval) []string {
	var out []string
	for _, r := range rs {
		var claims []string
		for _, c := range r.Claims {
			claims = append(claims, c.String())
		}
		out = append(out, fmt.Sprintf("%s %s removed=%v %s %s", r.Chain, r.Owner.ContainerID, r.ChainRemoved, strings.Join(claims, ","), strings.Join(r.Reasons, ",")))
	}
	sort.Strings(out)
	return out
}

func TestRepairScopeNarrows(t *testing.T) {
	text := twoBrokenPorts(t)
	all := problemSet(Audit(stateOf(t, text)))
	if len(all) != 5 {
		t.Fatalf("fixture problems %v, want shadowed 8080 and 9090, mismatch, orphan, entry jump", all)
	}
	ch := hostport.ChainName
	cases := []struct {
		name  string
		scope RepairScope
		// fixed are the problems (problemSet form) the narrowed repair removes; every
		// other problem of the fixture must be left, and reported in Skipped.
		fixed    []string
		removals []string
	}{
		{"port tcp/8080", RepairScope{Proto: "tcp", Port: 8080},
			[]string{"port-mismatch bad tcp/8080", "shadowed-claim new tcp/8080"},
			[]string{
				ch(ownerBad) + " bad removed=true ipv4/tcp *:8080,ipv4/tcp *:8086 port-mismatch",
				ch(ownerOld) + " old removed=true ipv4/tcp *:8080 shadowed-claim",
			}},
		{"port tcp/9090", RepairScope{Proto: "tcp", Port: 9090},
			[]string{"shadowed-claim y9090 tcp/9090"},
			[]string{ch(ownerX) + " x9090 removed=true ipv4/tcp *:9090 shadowed-claim"}},
		{"port tcp/8086: the other half of bad's mismatch", RepairScope{Proto: "tcp", Port: 8086},
			[]string{"port-mismatch bad tcp/8080"},
			[]string{ch(ownerBad) + " bad removed=true ipv4/tcp *:8080,ipv4/tcp *:8086 port-mismatch"}},
		{"port udp/8080 involves nothing", RepairScope{Proto: "udp", Port: 8080}, nil, nil},
		{"port tcp/7070: the orphan DNATs it", RepairScope{Proto: "tcp", Port: 7070},
			[]string{"orphan-chain  /0"},
			[]string{ch(ownerOrphan) + "  removed=true ipv4/tcp *:7070 orphan-chain"}},
		{"owner of the losing claim", RepairScope{Owner: ownerOld},
			[]string{"shadowed-claim new tcp/8080"},
			[]string{ch(ownerOld) + " old removed=true ipv4/tcp *:8080 shadowed-claim"}},
		{"owner of the kept claim: its contest is fixed", RepairScope{Owner: ownerNew},
			[]string{"shadowed-claim new tcp/8080"},
			[]string{ch(ownerOld) + " old removed=true ipv4/tcp *:8080 shadowed-claim"}},
		{"owner of a chain no jump names", RepairScope{Owner: ownerOrphan},
			[]string{"orphan-chain  /0"},
			[]string{ch(ownerOrphan) + "  removed=true ipv4/tcp *:7070 orphan-chain"}},
		{"owner and port must both match", RepairScope{Owner: ownerX, Proto: "tcp", Port: 8080}, nil, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			res, err := RepairScoped(stateOf(t, text), nil, nil, tc.scope)
			if err != nil {
				t.Fatal(err)
			}
			sort.Strings(tc.removals)
			if got := removalSet(res.Removals); fmt.Sprint(got) != fmt.Sprint(tc.removals) {
				t.Errorf("removals\n %q\nwant\n %q", got, tc.removals)
			}
			if len(tc.fixed) == 0 && res.Tx.Changes() {
				p, _ := res.Tx.Render()
				t.Fatalf("a scope that involves nothing changes the table:\n%s", p)
			}
			after := text
			if res.Tx.Changes() {
				after = applyTx(t, text, res.Tx)
			}
			fixed := map[string]bool{}
			for _, p := range tc.fixed {
				fixed[p] = true
			}
			var want []string
			for _, p := range all {
				if !fixed[p] {
					want = append(want, p)
				}
			}
			if got := problemSet(Audit(stateOf(t, after))); fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("problems after the narrowed repair\n %q\nwant\n %q\n%s", got, want, after)
			}
			// Each problem left is reported as left alone, by its chain (the entry jump
			// as the shared rule the full repair would restore).
			for _, p := range Audit(stateOf(t, after)).Problems {
				if !strings.Contains(strings.Join(res.Skipped, "\n"), p.Chain) {
					t.Errorf("problem left but not reported as left alone: %s\n%s", p.Message, strings.Join(res.Skipped, "\n"))
				}
			}
			for _, s := range res.Skipped {
				if !strings.Contains(s, "left alone (outside "+tc.scope.String()+")") {
					t.Errorf("skip line does not name the scope: %s", s)
				}
			}
		})
	}
}

// The full repair records every removal, and its records match its actions.
func TestRepairRecordsRemovals(t *testing.T) {
	text := twoBrokenPorts(t)
	jn, _ := upstreamChain(ownerNew, 8080, 8080, "10.88.0.3", 80)
	text = strings.Replace(text, "COMMIT\n", jn+"\nCOMMIT\n", 1) // a repeated jump too
	res, err := Repair(stateOf(t, text), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	ch := hostport.ChainName
	want := []string{
		ch(ownerBad) + " bad removed=true ipv4/tcp *:8080,ipv4/tcp *:8086 port-mismatch",
		ch(ownerNew) + " new removed=false  duplicate-jump",
		ch(ownerOld) + " old removed=true ipv4/tcp *:8080 shadowed-claim",
		ch(ownerOrphan) + "  removed=true ipv4/tcp *:7070 orphan-chain",
		ch(ownerX) + " x9090 removed=true ipv4/tcp *:9090 shadowed-claim",
	}
	sort.Strings(want)
	if got := removalSet(res.Removals); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("removals\n %q\nwant\n %q", got, want)
	}
	for _, r := range res.Removals {
		switch {
		case r.Chain == ch(ownerOld):
			if r.KeptFor == nil || *r.KeptFor != ownerNew || fmt.Sprint(r.Destinations) != "[10.88.0.2:80]" {
				t.Errorf("old's record: kept for %v, destinations %v", r.KeptFor, r.Destinations)
			}
		case r.Chain == ch(ownerBad):
			// the jump port without a DNAT rule has no destination
			if fmt.Sprintf("%q", r.Destinations) != `["" "10.88.0.9:80"]` {
				t.Errorf("bad's destinations %q", r.Destinations)
			}
		case r.Chain == ch(ownerNew):
			if !strings.HasPrefix(r.Rule, "-A CNI-HOSTPORT-DNAT ") || !strings.Contains(r.Rule, "--dports 8080") {
				t.Errorf("repeated jump's record names rule %q", r.Rule)
			}
		}
	}
	if fa := Audit(stateOf(t, applyTx(t, text, res.Tx))); !fa.Healthy() {
		t.Fatalf("after repair: %v", problemSet(fa))
	}
}

func TestParsePortScope(t *testing.T) {
	for in, want := range map[string]string{"tcp/8080": "tcp/8080", "UDP/53": "udp/53", "sctp/65535": "sctp/65535"} {
		p, n, err := ParsePortScope(in)
		if err != nil || portKey(p, n) != want {
			t.Errorf("%q: %s/%d %v, want %s", in, p, n, err, want)
		}
	}
	for _, in := range []string{"8080", "tcp/0", "tcp/65536", "icmp/1", "tcp/", "/80", "tcp/80x"} {
		if _, _, err := ParsePortScope(in); err == nil || !strings.Contains(err.Error(), "--port") {
			t.Errorf("%q: accepted or unclear error: %v", in, err)
		}
	}
}

// A removal records its owner's liveness judgement: stale evidence for a stale owner, and
// the live owner's own when --keep takes its port; without a judge, none.
func TestRepairRemovalCarriesEvidence(t *testing.T) {
	text := blogState(t)
	for _, tc := range []struct {
		name  string
		j     Liveness
		keep  map[hostport.Owner]bool
		state string // ownerState of old's removal
	}{
		{"no judge", nil, nil, ""},
		{"stale owner", fakeLiveness{}, nil, "stale"},
		{"live owner taken by --keep", fakeLiveness{states: map[hostport.Owner]liveness.State{ownerOld: liveness.Alive}}, map[hostport.Owner]bool{ownerNew: true}, "alive"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res, err := Repair(stateOf(t, text), tc.keep, tc.j)
			if err != nil {
				t.Fatal(err)
			}
			var found bool
			for _, r := range res.Removals {
				if r.Owner != ownerOld {
					continue
				}
				found = true
				if r.OwnerState != tc.state || (tc.state == "") != (r.Evidence == nil) {
					t.Fatalf("old's removal: state %q evidence %+v, want %q", r.OwnerState, r.Evidence, tc.state)
				}
				if r.Evidence != nil && string(r.Evidence.State) != tc.state {
					t.Fatalf("evidence state %q, ownerState %q", r.Evidence.State, r.OwnerState)
				}
			}
			if !found {
				t.Fatalf("no removal of old: %+v", res.Removals)
			}
		})
	}
}
