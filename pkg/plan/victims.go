package plan

import "github.com/portguard/portguard/pkg/state"

// Victim is another attachment that loses mappings to a wanted attachment's claims: what
// ADD would take from it. It is the iptables planner's own finding (findVictims), shown to
// backends that remove iptables-format claims in their own terms (the nftables backend
// takes iptables-nft claims over in its netlink batch), so both judge the same rules.
type Victim struct {
	Attachment *state.Attachment
	Lost       []state.Mapping // the mappings that conflict with a wanted claim
	// Kept holds "proto/port" of the ports the victim still serves afterwards (another
	// mapping on the same port, or ports of a chain read in part): its jumps keep them.
	Kept map[string]bool
	// RemoveAll says nothing of the victim remains: its chain and jumps go.
	RemoveAll bool
}

// KeepsPort reports whether the victim still serves proto/port after losing Lost.
func (v Victim) KeepsPort(proto string, port int) bool { return v.Kept[portKey(proto, port)] }

// Victims lists the attachments of s other than d.Chain whose mappings conflict with d's
// claims, in chain order; need names the chains to read before asking again (a jump on a
// wanted port enters them, their rules were not read). Only d.Chain and d.Claims are used.
func Victims(s *state.State, d Desired) (vs []Victim, need []string) {
	found, need := findVictims(s, d)
	if len(need) > 0 {
		return nil, need
	}
	for _, v := range found {
		vs = append(vs, Victim{Attachment: v.a, Lost: v.lost, Kept: v.keep, RemoveAll: v.removeAll})
	}
	return vs, nil
}
