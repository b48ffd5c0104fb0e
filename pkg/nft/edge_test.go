package nft

// Edge cases found in review: each failed before its fix. Kernel tests, in throwaway
// namespaces (root only).

import (
	"encoding/binary"
	"os/exec"
	"reflect"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/state"
)

// observeBoth reads CNI-HOSTPORT-DNAT with `iptables -S` and with the netlink Reader.
func observeBoth(t *testing.T, n *node, f hostport.Family) (viaIptables, viaNetlink *state.State, fellBack []string) {
	t.Helper()
	exe := &iptables.Exec{WaitSeconds: 5, Prefix: []string{"ip", "netns", "exec", n.name}}
	want, err := state.Observe(exe, f, hostport.DNATChain)
	if err != nil {
		t.Fatal(err)
	}
	c := n.conn()
	rec := &recorder{inner: exe}
	var got *state.State
	n.do(func() { got, err = state.Observe(&Reader{Runner: rec, Conn: c}, f, hostport.DNATChain) })
	if err != nil {
		t.Fatal(err)
	}
	return want, got, rec.listed
}

// Finding: a rule whose comment is nf_tables rule userdata (what `nft ... comment "x"`
// writes) is printed by `iptables -S` as `-m comment --comment "x"`, but the Reader
// ignores NFTA_RULE_USERDATA and accepts the rule without its comment: the model loses
// the jump's owner.
func TestKernelReaderDeclinesUserdataComment(t *testing.T) {
	n := newNode(t, layout)
	chain, p := attachment("ud", "8080")
	n.restore(p)
	n.run("", "nft", `add rule ip nat CNI-HOSTPORT-DNAT meta l4proto tcp counter jump `+chain+` comment "dnat name: knet id: other"`)
	want, got, fellBack := observeBoth(t, n, hostport.V4)
	if len(fellBack) == 0 && !reflect.DeepEqual(got.Jumps, want.Jumps) {
		t.Fatalf("the Reader accepted a rule iptables shows differently:\nnetlink: %v\niptables -S: %v",
			rules(got.Jumps), rules(want.Jumps))
	}
}

// Finding: comments containing a single quote. iptables -S prints `'` as `\'` inside
// double quotes; SplitArgs (pkg/iptables) keeps the backslash, the Reader does not, so the
// two read paths give different models of the same kernel rules.
func TestKernelReaderSingleQuoteComment(t *testing.T) {
	n := newNode(t, layout)
	n.restore("*nat\n:CNI-DN-aaaaaaaaaaaaaaaaaaaaa - [0:0]\n" +
		`-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"it's\" id: \"c1\"" -m multiport --dports 80 -j CNI-DN-aaaaaaaaaaaaaaaaaaaaa` +
		"\nCOMMIT\n")
	want, got, fellBack := observeBoth(t, n, hostport.V4)
	if len(fellBack) == 0 && !reflect.DeepEqual(got.Jumps, want.Jumps) {
		t.Fatalf("the two read paths disagree:\nnetlink: %v\niptables -S: %v", rules(got.Jumps), rules(want.Jumps))
	}
}

func rules(js []state.Jump) []string {
	var out []string
	for _, j := range js {
		out = append(out, j.Rule.String()+" owner="+j.Owner.Network+"/"+j.Owner.ContainerID)
	}
	return out
}

// Finding: SharedLayout accepts any MASQUERADE target in CNI-HOSTPORT-MASQ (its info,
// e.g. --random or --to-ports, is not compared), so it says "shown" where the
// `iptables -C CNI-HOSTPORT-MASQ -m mark --mark B/B -j MASQUERADE` assertion it replaces
// fails; ADD then never restores the exact rule.
func TestKernelSharedLayoutMasqueradeOptions(t *testing.T) {
	n := newNode(t, strings.Replace(layout, "-j MASQUERADE\n", "-j MASQUERADE --random\n", 1))
	c := n.conn()
	var shown bool
	var err error
	n.do(func() { shown, err = c.SharedLayout(hostport.V4, true, 13) })
	if err != nil {
		t.Fatal(err)
	}
	check := exec.Command("ip", "netns", "exec", n.name, "iptables", "-w", "-t", "nat", "-C", "CNI-HOSTPORT-MASQ",
		"-m", "mark", "--mark", "0x2000/0x2000", "-j", "MASQUERADE")
	checkFails := check.Run() != nil
	if shown && checkFails {
		t.Fatal("SharedLayout shows the layout, but iptables -C of the MASQ rule fails")
	}
}

// Finding: when the chain has no reference (use == its rules), RemoveAttachment returns
// done=true together with the commit's error, and Engine.Del ignores the error: DEL exits
// 0 with the chain still there. A refused DELCHAIN is made deterministic here by an
// owned table (NFT_TABLE_F_OWNER: others get EPERM); the realistic trigger is a jump
// added between the reads and the commit (EBUSY).
func TestKernelRemoveAttachmentFailedCommitNotDone(t *testing.T) {
	n := newNode(t, "")
	const chain = "CNI-DN-bbbbbbbbbbbbbbbbbbbbb"
	owner := n.conn()
	const nftTableFOwner = 0x2
	table := newMsg(nftType(unix.NFT_MSG_NEWTABLE), unix.NLM_F_REQUEST|unix.NLM_F_CREATE|unix.NLM_F_ACK, unix.NFPROTO_IPV4)
	table.str(unix.NFTA_TABLE_NAME, "nat").attr(unix.NFTA_TABLE_FLAGS, binary.BigEndian.AppendUint32(nil, nftTableFOwner))
	ch := newMsg(nftType(unix.NFT_MSG_NEWCHAIN), unix.NLM_F_REQUEST|unix.NLM_F_CREATE|unix.NLM_F_ACK, unix.NFPROTO_IPV4)
	ch.str(unix.NFTA_CHAIN_TABLE, "nat").str(unix.NFTA_CHAIN_NAME, chain)
	var err error
	n.do(func() { err = owner.Commit(Op{table}, Op{ch}) })
	if err != nil {
		t.Skipf("cannot create an owned table: %v", err)
	}
	other := n.conn()
	var done bool
	n.do(func() { done, err = other.RemoveAttachment(hostport.V4, chain) })
	var exists bool
	n.do(func() { _, exists, _ = other.Chain(hostport.V4, chain) })
	if done && exists {
		t.Fatalf("RemoveAttachment reported done (err %v) but the chain is still there; Engine.Del ignores err when done", err)
	}
}
