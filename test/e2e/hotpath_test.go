package e2e

import (
	"strings"
	"testing"

	tb "github.com/portguard/portguard/test/testbed"
)

// TestHotPathProcessesOnNft: on the nf_tables backend a dual-stack ADD starts one
// iptables-restore per family and nothing else (CNI-HOSTPORT-DNAT and the shared layout are
// read over netlink), and CHECK and DEL no process at all; packets prove that the
// rules ADD wrote work and that DEL removed exactly this attachment's.
func TestHotPathProcessesOnNft(t *testing.T) {
	t.Parallel()
	b, n := pgBed(t)
	if v, _ := b.Exec(b.Node, "iptables", "-V"); !strings.Contains(v, "nf_tables") {
		t.Skip("iptables here is not the nf_tables backend: " + v)
	}
	other := b.NewPod("other")
	n.MustAdd(other, tb.TCP(7070, 80)) // creates the shared layout
	other.Serve(80)
	p := b.NewPod("beta")

	restores := func(what string, calls []string) {
		t.Helper()
		var seen []string
		for _, c := range calls {
			seen = append(seen, strings.Fields(c)[0])
		}
		if strings.Join(seen, " ") != "iptables-restore ip6tables-restore" {
			t.Errorf("%s started %d iptables processes, want one iptables-restore per family:\n%s", what, len(calls), strings.Join(calls, "\n"))
		}
	}
	b.ResetShim()
	n.MustAdd(p, tb.TCP(8080, 80), tb.TCP(8081, 81))
	restores("ADD", b.ShimCalls())
	for _, c := range b.ShimCalls() {
		if strings.Contains(c, " -C ") {
			t.Errorf("ADD asserted with -C although the shared layout was shown over netlink: %s", c)
		}
	}
	p.Serve(80, 81)
	for _, f := range families {
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8080, "beta")
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8081, "beta")
	}

	b.ResetShim()
	if err := n.Check(p); err != nil {
		t.Errorf("CHECK right after ADD: %v", err)
	}
	if calls := b.ShimCalls(); len(calls) != 0 {
		t.Errorf("CHECK started %d iptables processes, want none:\n%s", len(calls), strings.Join(calls, "\n"))
	}

	// iptables-save without its "# Generated ... on <time>" comments.
	save := func(f tb.Family) string {
		var keep []string
		for _, l := range strings.Split(b.MustSaveNAT(f), "\n") {
			if !strings.HasPrefix(l, "#") {
				keep = append(keep, l)
			}
		}
		return strings.Join(keep, "\n")
	}
	before := map[tb.Family]string{}
	for _, f := range families {
		before[f] = save(f)
	}
	b.ResetShim()
	n.MustDel(p)
	if calls := b.ShimCalls(); len(calls) != 0 {
		t.Errorf("DEL started %d iptables processes, want none:\n%s", len(calls), strings.Join(calls, "\n"))
	}
	for _, f := range families {
		expectNoAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8080)
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 7070, "other")
		// Exactly the attachment's chain and jump went; every other line is unchanged.
		var want []string
		for _, l := range strings.Split(before[f], "\n") {
			if !strings.Contains(l, p.Chain(n)) {
				want = append(want, l)
			}
		}
		if got := save(f); got != strings.Join(want, "\n") {
			t.Errorf("%s: nat table after DEL:\n%s\nwant:\n%s", f, got, strings.Join(want, "\n"))
		}
	}
}
