// Package state is the one model of what portguard observed in a nat table: the CNI
// chains, who owns each, the host ports they claim and in which order, and the shared
// chains around them. ADD, DEL, CHECK, GC, audit and repair all read it.
package state

import (
	"fmt"

	"github.com/portguard/portguard/pkg/iptables"
)

// Chain names upstream portmap uses; they must never change, or nodes could not switch
// between portmap and portguard.
const (
	DNATChain    = "CNI-HOSTPORT-DNAT"
	SetMarkChain = "CNI-HOSTPORT-SETMARK"
	MasqChain    = "CNI-HOSTPORT-MASQ"

	MasqJumpComment = "CNI portfwd requiring masquerade"
	SetMarkComment  = "CNI portfwd masquerade mark"
)

// EntryChains send locally-addressed traffic into CNI-HOSTPORT-DNAT.
var EntryChains = []string{"PREROUTING", "OUTPUT"}

// EntryJump is the rule in PREROUTING or OUTPUT that enters CNI-HOSTPORT-DNAT.
func EntryJump(chain string) iptables.Rule {
	return iptables.Rule{Chain: chain, Args: []string{"-m", "addrtype", "--dst-type", "LOCAL", "-j", DNATChain}}
}

// MasqJump is the rule upstream prepends to POSTROUTING.
func MasqJump() iptables.Rule {
	return iptables.Rule{Chain: "POSTROUTING", Args: []string{"-m", "comment", "--comment", MasqJumpComment, "-j", MasqChain}}
}

func markDef(bit int) string {
	v := uint32(1) << uint(bit)
	return fmt.Sprintf("%#x/%#x", v, v)
}

// SetMarkRule is CNI-HOSTPORT-SETMARK's rule for a mark bit.
func SetMarkRule(bit int) iptables.Rule {
	return iptables.Rule{Chain: SetMarkChain, Args: []string{"-m", "comment", "--comment", SetMarkComment, "-j", "MARK", "--set-xmark", markDef(bit)}}
}

// MasqRule is CNI-HOSTPORT-MASQ's rule for a mark bit.
func MasqRule(bit int) iptables.Rule {
	return iptables.Rule{Chain: MasqChain, Args: []string{"-m", "mark", "--mark", markDef(bit), "-j", "MASQUERADE"}}
}

// SharedChains are the chains an ADD needs to know to create the shared layout.
var SharedChains = []string{"PREROUTING", "OUTPUT", "POSTROUTING", SetMarkChain, MasqChain}

// Layout is the shared layout's rules for one family: the entry jumps and, when
// portguard masquerades with its own marks (masq), POSTROUTING's jump, CNI-HOSTPORT-SETMARK's
// rule and CNI-HOSTPORT-MASQ's rule for the mark bit. nft.Conn.SharedLayout shows exactly
// these.
func Layout(masq bool, markBit int) []iptables.Rule {
	var out []iptables.Rule
	for _, ch := range EntryChains {
		out = append(out, EntryJump(ch))
	}
	if masq {
		out = append(out, MasqJump(), SetMarkRule(markBit), MasqRule(markBit))
	}
	return out
}
