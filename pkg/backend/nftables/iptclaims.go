package nftables

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/portguard/portguard/pkg/backend"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/nft"
	"github.com/portguard/portguard/pkg/plan"
	"github.com/portguard/portguard/pkg/state"
)

// iptables-format claims: what portguard's iptables backend and upstream portmap's write
// in `ip nat` and `ip6 nat` (CNI-HOSTPORT-DNAT jumps into CNI-DN-<hash> chains), almost
// always through iptables-nft, i.e. as nf_tables rules this backend can read and delete
// over netlink. iptables' nat hooks at priority -100, before portguard's (-99), so such a
// claim on a port shadows the port's element: a node switched from the iptables backend
// keeps its stale claims until they are taken over.
//
// The reads are point reads: CNI-HOSTPORT-DNAT (one chain, filtered to the jumps on the
// claimed ports while decoding, nft.Conn.Excerpt), then only the chains those jumps enter
// (a big one only for the contested ports, nft.Conn.TakenRules). Which mappings of those
// chains a claim takes is the iptables planner's decision (plan.Victims), not written
// again here; the removal is nft.Conn.TakeOps, put into this backend's batch.

// ErrIptablesUnreadable says an iptables-nft nat chain on the path of a claim holds a
// rule the decoder does not know, so whether it claims the port cannot be told: the
// backend refuses rather than leave a claim that may shadow the new one unseen.
var ErrIptablesUnreadable = errors.New("an iptables-nft nat rule on a claimed port cannot be read")

// iptView is what one family's nat table (iptables-nft) holds that matters to an
// attachment: the jumps of CNI-HOSTPORT-DNAT on its ports or into its own iptables-format
// chain, the chains they enter, and the handles of those chains' rules.
type iptView struct {
	f       hostport.Family
	s       *state.State
	handles map[string]map[string]uint64 // chain -> rule spec -> handle
}

// iptChain names an iptables chain in reports: "ip nat CNI-DN-…" (or ip6).
func iptChain(f hostport.Family, chain string) string {
	if f == hostport.V6 {
		return "ip6 nat " + chain
	}
	return "ip nat " + chain
}

// observeIptables reads family f's iptables-nft claims that touch claims (all of f) or
// belong to owner's iptables-format chain.
func (t *Table) observeIptables(f hostport.Family, owner hostport.Owner, claims []hostport.Claim) (iptView, error) {
	v := iptView{f: f, handles: map[string]map[string]uint64{}}
	tab := iptables.NewTable()
	ex, exists, ok := t.nl.Excerpt(f, hostport.DNATChain, hostport.ChainName(owner), claims)
	if !ok {
		return v, fmt.Errorf("%s: %w", iptChain(f, hostport.DNATChain), ErrIptablesUnreadable)
	}
	if !exists {
		tab.Missing[hostport.DNATChain] = true
		v.s = state.New(f, tab)
		return v, nil
	}
	tab.Add(hostport.DNATChain, ex.Rules...)
	v.s = state.NewExcerpt(f, tab, ex.Pos)
	own := hostport.ChainName(owner)
	for _, a := range v.s.AttachmentsSorted() {
		if a.Chain == own || len(a.Jumps) == 0 {
			continue // the owner's own leftover goes whole: its rules need no reading
		}
		if err := t.readIptChain(&v, tab, a, claims); err != nil {
			return v, err
		}
	}
	v.s.Refresh()
	return v, nil
}

// readIptChain reads the chain a's jumps enter: only its rules for the contested ports
// when it is big enough for that to pay (nft.Conn.TakenRules), else whole.
func (t *Table) readIptChain(v *iptView, tab *iptables.Table, a *state.Attachment, claims []hostport.Claim) error {
	byProto := map[string][]int{}
	for _, j := range a.Jumps {
		for _, c := range claims {
			if j.Proto == c.Proto && j.HasPort(c.HostPort) && !slices.Contains(byProto[c.Proto], c.HostPort) {
				byProto[c.Proto] = append(byProto[c.Proto], c.HostPort)
			}
		}
	}
	part := nft.Taken{Handles: map[string]uint64{}}
	partial := len(byProto) > 0
	for proto, ports := range byProto {
		tk, found, err := t.nl.TakenRules(v.f, a.Chain, proto, ports)
		if err != nil {
			return err
		}
		if !found {
			partial = false
			break
		}
		part.Rules = append(part.Rules, tk.Rules...)
		for k, h := range tk.Handles {
			part.Handles[k] = h
		}
	}
	if partial {
		v.s.ReadPart(a.Chain, part.Rules)
		v.handles[a.Chain] = part.Handles
		return nil
	}
	rules, hs, exists, ok := t.nl.ReadChainHandles(v.f, a.Chain)
	if !ok {
		return fmt.Errorf("%s: %w", iptChain(v.f, a.Chain), ErrIptablesUnreadable)
	}
	if !exists {
		tab.Missing[a.Chain] = true
		return nil
	}
	tab.Add(a.Chain, rules...)
	m := make(map[string]uint64, len(rules))
	for i, r := range rules {
		m[r.Spec()] = hs[i]
	}
	v.handles[a.Chain] = m
	return nil
}

// iptPlan is what ADD does to one family's iptables-format claims: the operations of the
// batch, and the takeovers and conflicts for Decide.
type iptPlan struct {
	ops       []nft.Op
	takeovers []backend.Takeover
	conflicts []backend.Conflict
}

// planIptables plans the removal of every iptables-format claim of another owner that
// conflicts with claims (as a takeover, for Decide to judge) and of owner's own
// iptables-format chain (a leftover of the same attachment from before a switch of
// backend: the new elements replace it, nobody else is involved).
func (t *Table) planIptables(v iptView, owner hostport.Owner, claims []hostport.Claim) (iptPlan, error) {
	var p iptPlan
	d := plan.Desired{Family: v.f, Owner: owner, Chain: hostport.ChainName(owner), Claims: claims}
	vs, need := plan.Victims(v.s, d)
	if len(need) > 0 {
		// observeIptables read every chain a jump on a claimed port enters.
		return p, fmt.Errorf("iptables chains %v were not read", need)
	}
	for _, vi := range vs {
		a := vi.Attachment
		chain := iptChain(v.f, a.Chain)
		tk := backend.Takeover{Family: v.f.String(), From: a.Owner, Chain: chain, For: owner, ChainRemoved: vi.RemoveAll}
		drop := map[string][]int{}
		var hs []uint64
		for _, m := range vi.Lost {
			c := m.Claim
			if !vi.KeepsPort(c.Proto, c.HostPort) && !slices.Contains(drop[c.Proto], c.HostPort) {
				drop[c.Proto] = append(drop[c.Proto], c.HostPort)
			}
			for _, r := range m.Rules {
				if h, ok := v.handles[a.Chain][r.Spec()]; ok {
					hs = append(hs, h)
				}
			}
			tk.Claims = append(tk.Claims, c)
			tk.Destinations = append(tk.Destinations, m.Dest.String())
			p.conflicts = append(p.conflicts, backend.Conflict{Owner: a.Owner, Chain: chain, Claim: c, Dest: m.Dest.String()})
		}
		ops, err := t.nl.TakeOps(v.f, a.Chain, drop, hs)
		if err != nil {
			return p, err
		}
		p.ops = append(p.ops, ops...)
		p.takeovers = append(p.takeovers, tk)
	}
	if own := v.s.Attachments[d.Chain]; own != nil && len(own.Jumps) > 0 {
		ops, err := t.nl.TakeOps(v.f, d.Chain, jumpPorts(own.Jumps), nil)
		if err != nil {
			return p, err
		}
		p.ops = append(p.ops, ops...)
	}
	return p, nil
}

// jumpPorts lists the ports of jumps by protocol.
func jumpPorts(js []state.Jump) map[string][]int {
	out := map[string][]int{}
	for _, j := range js {
		for _, port := range j.Ports {
			if !slices.Contains(out[j.Proto], port) {
				out[j.Proto] = append(out[j.Proto], port)
			}
		}
	}
	return out
}

// iptShadows names, for CHECK, every iptables-format claim in v that conflicts with one
// of claims, live or not (iptables' nat runs first, so it gets the port's packets), and
// a leftover of owner's own iptables-format chain.
func iptShadows(v iptView, owner hostport.Owner, claims []hostport.Claim) []string {
	d := plan.Desired{Family: v.f, Owner: owner, Chain: hostport.ChainName(owner), Claims: claims}
	vs, need := plan.Victims(v.s, d)
	var out []string
	for _, c := range need {
		out = append(out, fmt.Sprintf("%s enters a claimed port but could not be read", iptChain(v.f, c)))
	}
	for _, vi := range vs {
		for _, m := range vi.Lost {
			out = append(out, fmt.Sprintf("%s is shadowed by an iptables claim in %s of %s (-> %s): iptables' nat (priority -100) runs before portguard's",
				m.Claim, iptChain(v.f, vi.Attachment.Chain), ownerName(vi.Attachment.Owner), m.Dest))
		}
	}
	if own := v.s.Attachments[d.Chain]; own != nil && len(own.Jumps) > 0 {
		out = append(out, fmt.Sprintf("%s: an iptables-format leftover of this attachment runs before portguard's claims", iptChain(v.f, d.Chain)))
	}
	return out
}

func ownerName(o hostport.Owner) string {
	if o.IsZero() {
		return "an unknown owner"
	}
	return o.String()
}

// claimsOf lists the claims of family f.
func claimsOf(cs []hostport.Claim, f hostport.Family) []hostport.Claim {
	var out []hostport.Claim
	for _, c := range cs {
		if c.Family == f {
			out = append(out, c)
		}
	}
	return out
}

// RemoveIptables adds operations on iptables-format chains (from planIptables) to the
// batch; they run first.
func (tx *Tx) RemoveIptables(ops ...nft.Op) { tx.delIpt = append(tx.delIpt, ops...) }

// iptLeftoverOps plans the removal of owner's own iptables-format chain in family f and
// the jumps into it: what the iptables backend or upstream portmap left of the same
// attachment before the node switched backends (a runtime DELs the attachment through
// this backend then). A point read of the chain (it is named by the owner) when it does
// not exist, which is the common case; its one jump is found by handle as
// nft.Conn.RemoveAttachment does, and only a chain with several jumps makes it read the
// jumps of CNI-HOSTPORT-DNAT. A chain it cannot read, or entered from elsewhere, is left
// alone (no error): a DEL that fails is retried forever.
func (t *Table) iptLeftoverOps(f hostport.Family, owner hostport.Owner) ([]nft.Op, error) {
	chain := hostport.ChainName(owner)
	ops, done, err := t.nl.RemoveAttachmentOps(f, chain)
	if err != nil || done {
		return ops, err
	}
	v, err := t.observeIptables(f, owner, nil)
	if errors.Is(err, ErrIptablesUnreadable) {
		return nil, nil // a DEL must not fail over a leftover it cannot read; left alone
	}
	if err != nil {
		return nil, err
	}
	own := v.s.Attachments[chain]
	if own == nil || len(own.Jumps) == 0 {
		return nil, nil // entered from outside CNI-HOSTPORT-DNAT: not a shape either writer leaves
	}
	return t.nl.TakeOps(f, chain, jumpPorts(own.Jumps), nil)
}

// legacyClaims lists, for family f, the jumps of iptables-legacy's CNI-HOSTPORT-DNAT that
// match one of claims' protocol and port. They run before portguard's table (iptables'
// nat, priority -100) and this backend cannot delete them (netlink reaches nf_tables
// only), so ADD refuses them whatever their owner's state, and CHECK reports them. The
// host IP is judged by the jump alone (it lives in the CNI-DN chain, which is not read):
// a legacy claim on another host IP of the same port refuses too. The read happens only
// where the legacy nat table exists (xtlegacy.Reader.Present), so a node without one pays
// a file read.
func (t *Table) legacyClaims(f hostport.Family, claims []hostport.Claim) ([]string, error) {
	js, err := t.legacy.Jumps(f)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, j := range js {
		for _, c := range claims {
			if j.HasPort(c.Proto, c.HostPort) {
				out = append(out, fmt.Sprintf("%s is claimed in iptables-legacy's nat table by %s (%s)", c, ownerName(j.Owner), iptChain(f, j.Chain)))
				break
			}
		}
	}
	return out, nil
}

// refuseLegacy is ADD's answer to legacy claims on its ports (legacyClaims).
func refuseLegacy(found []string) error {
	return backend.Mark(fmt.Errorf("%s: the nftables backend cannot remove iptables-legacy rules, and they run before its own; remove them with iptables-legacy or with the iptables backend (CNI DEL, portguardctl repair) first",
		strings.Join(found, "; ")), backend.ErrInUse)
}
