package nftaudit

import (
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"unicode"

	"github.com/portguard/portguard/pkg/backend/nftables"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/plan"
)

// RepairPlan is what PlanRepair put in the transaction, and what it left alone.
type RepairPlan struct {
	// Layout: the layout of portguard's table must be rewritten (nftables.Table.Ensure, a
	// batch of its own before the transaction; it never touches elements).
	Layout bool
	// Actions are the transaction's changes in nft syntax with a comment saying why, in
	// order (the layout rewrite first when Layout).
	Actions []string
	// Skipped are problems left alone, and why.
	Skipped []string
	// Removals are the log records of what the transaction removes, one per owner and
	// place (map or upstream chain) and family.
	Removals []plan.RepairRemoval
	// IPTables are the iptables attachments of stale owners whose claim loses a port to a
	// claim of the nftables side: not part of the batch, the CLI removes each whole (as a DEL
	// of the dead attachment would) through the iptables backend.
	IPTables []plan.RepairRemoval
	// UnknownKeep are --keep owners without any claim on the nftables side.
	UnknownKeep []hostport.Owner
	// ScopeOwnerSeen says the scope's owner has something on the nftables side.
	ScopeOwnerSeen bool
}

// Empty reports whether the plan changes nothing.
func (p RepairPlan) Empty() bool { return !p.Layout && len(p.Actions) == 0 && len(p.IPTables) == 0 }

// Tiers of a contested port, as iptables' repair and ADD's takeover rank claims: the
// owners named by --keep, then owners alive or not judgeable (never removed on a guess),
// then the rest.
const (
	tierKept = iota
	tierLive
	tierRest
)

// PlanRepair plans, into tx (from the Observe that gave o), the fix of what Audit reports:
//
//   - a port claimed more than once (in portguard's table, upstream's cni_hostport rules
//     and iptables' CNI chains) keeps one claim: a --keep owner's, else a live (or not
//     judgeable) owner's, else portguard's element, else upstream's last rule (upstream
//     appends, so its last rule is its newest). Two live claimants are both left alone
//     (choose with --keep). Losers in portguard's table or upstream's chains are removed;
//     an iptables claim is never removed here (Skipped names the fix);
//   - upstream rules of stale owners are removed (their masquerade rules with them), and
//     nothing else of upstream's tables: their chains and tables stay, as upstream's DEL
//     leaves them. Foreign tables are never read for changes, let alone written;
//   - masquerade entries whose owner has no claim left in the family, gate elements
//     without their claim, and conditions chains no gate uses are removed;
//   - a damaged layout is rewritten (Layout).
//
// With a scope, only removals involving its port and/or owner are planned; the layout and
// conditions chains (shared) are then left alone. ipt are the iptables families' audits
// (for split claims), j judges owners (nil: every owner counts as stale, keep decides).
func PlanRepair(tx *nftables.Tx, o nftables.Observed, ipt []plan.FamilyAudit, keep map[hostport.Owner]bool,
	j plan.Liveness, res Resolve, scope plan.RepairScope) (RepairPlan, error) {
	var p RepairPlan
	kept := map[hostport.Owner]bool{}
	keeps := func(c *claim) bool {
		for k := range keep {
			if k == c.owner || (c.upstream != nil && k.ContainerID == c.owner.ContainerID) {
				kept[k] = true
				return true
			}
		}
		return false
	}
	ownerIn := func(ow hostport.Owner, upstream bool) bool {
		return scope.Owner.IsZero() || ow == scope.Owner || (upstream && ow.ContainerID == scope.Owner.ContainerID)
	}
	portIn := func(c hostport.Claim) bool {
		return scope.Port == 0 || (c.HostPort == scope.Port && c.Proto == scope.Proto)
	}
	judge := func(ow hostport.Owner, c *claim) *liveness.Evidence {
		if j == nil || ow.IsZero() {
			return nil
		}
		ev := j.Owner(ow, c.dest.Addr())
		return &ev
	}
	removedElem := map[*nftables.Element]bool{}
	upGone := map[*nftables.UpstreamRule]bool{}
	gatesGone := map[string]bool{} // orphan gates removed, by map and key
	rems := map[string]*plan.RepairRemoval{}
	var remOrder []string
	record := func(f hostport.Family, c *claim, reason string, keptFor *hostport.Owner) {
		k := f.String() + "\x00" + c.chain + "\x00" + c.owner.String()
		r := rems[k]
		if r == nil {
			r = &plan.RepairRemoval{Family: f.String(), Owner: c.owner, Chain: c.chain, Claims: []hostport.Claim{}, Destinations: []string{}, ChainRemoved: true}
			if ev := judge(c.owner, c); ev != nil {
				r.OwnerState, r.Evidence = string(ev.State), ev
			}
			rems[k] = r
			remOrder = append(remOrder, k)
		}
		r.Claims = append(r.Claims, c.claim)
		r.Destinations = append(r.Destinations, c.dest.String())
		if !contains(r.Reasons, reason) {
			r.Reasons = append(r.Reasons, reason)
			sort.Strings(r.Reasons)
		}
		if keptFor != nil {
			kf := *keptFor
			r.KeptFor = &kf
		}
	}
	remove := func(f hostport.Family, c *claim, reason string, keptFor *hostport.Owner) {
		switch {
		case c.elem != nil && !removedElem[c.elem]:
			removedElem[c.elem] = true
			tx.RemoveClaims(*c.elem)
			why := reason
			if keptFor != nil {
				why += ", the port stays with " + keptFor.String()
			}
			p.Actions = append(p.Actions, fmt.Sprintf("delete element inet %s %s { %s }  # %s -> %s (%s)",
				nftables.TableName, c.elem.Map(), nftables.KeyText(c.claim), printable(c.elem.Comment), c.dest, why))
			if c.elem.Gate != "" {
				p.Actions = append(p.Actions, fmt.Sprintf("delete element inet %s gate%s { %s }  # its conditions gate (jump %s)",
					nftables.TableName, c.elem.Map(), nftables.KeyText(c.claim), c.elem.Gate))
			}
		case c.upstream != nil && !upGone[c.upstream]:
			upGone[c.upstream] = true
			tx.RemoveUpstream(*c.upstream)
			p.Actions = append(p.Actions, fmt.Sprintf("delete rule %s handle %d  # container %s: %s -> %s (%s)",
				c.chain, c.upstream.Handle, c.owner.ContainerID, c.claim, c.dest, reason))
		default:
			return
		}
		record(f, c, reason, keptFor)
	}

	for _, f := range hostport.Families {
		cs := claims(o, f, res)
		for _, c := range cs {
			if !scope.Owner.IsZero() && ownerIn(c.owner, c.upstream != nil) {
				p.ScopeOwnerSeen = true
			}
		}
		// Contests: the nftables side's claims and iptables' winners, ranked.
		type cand struct {
			c    *claim
			ipt  *iptClaim
			tier int
			pref int // within a tier: portguard's element, upstream's newest rule first, iptables
			ord  int
		}
		var cands []cand
		for i, c := range cs {
			t := tierRest
			switch {
			case keeps(c):
				t = tierKept
			case c.owner.IsZero():
				// A hashed comment no record resolves: its owner cannot be judged, so it
				// ranks with live owners (never removed on a guess).
				t = tierLive
			case j != nil && j.Owner(c.owner, c.dest.Addr()).State != liveness.Stale:
				t = tierLive
			}
			pref, ord := 0, i
			if c.upstream != nil {
				pref, ord = 1, -i
			}
			cands = append(cands, cand{c: c, tier: t, pref: pref, ord: ord})
		}
		ics := iptablesClaims(ipt, f)
		for i := range ics {
			ic := &ics[i]
			t := tierRest
			if keep[ic.owner] {
				t, kept[ic.owner] = tierKept, true
			} else if j != nil && !ic.owner.IsZero() && j.Owner(ic.owner, destAddr(ic.dest)).State != liveness.Stale {
				t = tierLive
			}
			cands = append(cands, cand{ipt: ic, tier: t, pref: 2, ord: i})
		}
		sort.SliceStable(cands, func(a, b int) bool {
			x, y := cands[a], cands[b]
			if x.tier != y.tier {
				return x.tier < y.tier
			}
			if x.pref != y.pref {
				return x.pref < y.pref
			}
			return x.ord < y.ord
		})
		claimOf := func(x cand) hostport.Claim {
			if x.c != nil {
				return x.c.claim
			}
			return x.ipt.claim
		}
		ownerOf := func(x cand) hostport.Owner {
			if x.c != nil {
				return x.c.owner
			}
			return x.ipt.owner
		}
		nameOf := func(x cand) string {
			if x.c != nil {
				return ownerName(x.c.owner, x.c.chain)
			}
			return ownerName(x.ipt.owner, x.ipt.chain) + " in iptables"
		}
		var winners []cand
		for _, x := range cands {
			lost := false
			for _, w := range winners {
				if !claimOf(w).Conflicts(claimOf(x)) {
					continue
				}
				lost = true
				cl := claimOf(x)
				inScope := portIn(cl) && (ownerIn(ownerOf(x), x.c != nil && x.c.upstream != nil) || ownerIn(ownerOf(w), w.c != nil && w.c.upstream != nil))
				switch {
				case x.tier == tierKept && w.tier == tierKept:
					return RepairPlan{}, fmt.Errorf("--keep: %s and %s both claim %s", ownerOf(w), ownerOf(x), cl)
				case x.tier == tierLive && w.tier == tierLive:
					p.Skipped = append(p.Skipped, fmt.Sprintf("%s: %s has several live claimants, %s and %s; left alone: choose one with --keep", f, cl, nameOf(w), nameOf(x)))
				case !inScope:
					p.Skipped = append(p.Skipped, fmt.Sprintf("%s: %s of %s loses to %s; left alone (outside %s)", f, cl, nameOf(x), nameOf(w), scope))
				case x.ipt != nil && (x.tier != tierRest || x.ipt.owner.IsZero()):
					p.Skipped = append(p.Skipped, fmt.Sprintf("%s: %s of %s loses to %s, but only a stale owner's iptables attachment is removed here: CNI DEL that attachment", f, cl, nameOf(x), nameOf(w)))
				case x.ipt != nil:
					ko := ownerOf(w)
					r := plan.RepairRemoval{Family: f.String(), Owner: x.ipt.owner, Chain: x.ipt.chain, Claims: []hostport.Claim{cl},
						Destinations: []string{x.ipt.dest}, ChainRemoved: true, Reasons: []string{plan.KindSplitClaim}, KeptFor: &ko}
					if j != nil {
						ev := j.Owner(x.ipt.owner, destAddr(x.ipt.dest))
						r.OwnerState, r.Evidence = string(ev.State), &ev
					}
					p.IPTables = append(p.IPTables, r)
				default:
					ko := ownerOf(w)
					reason := plan.KindShadowedClaim
					if (x.c.elem != nil) != (w.c != nil && w.c.elem != nil) {
						reason = plan.KindSplitClaim
					}
					remove(f, x.c, reason, &ko)
				}
				break
			}
			if !lost {
				winners = append(winners, x)
			}
		}
		// Upstream rules of stale owners, contested or not (unless --keep names them).
		for _, c := range cs {
			if c.upstream == nil || upGone[c.upstream] || keeps(c) || j == nil {
				continue
			}
			if j.Owner(c.owner, c.dest.Addr()).State != liveness.Stale {
				continue
			}
			if !portIn(c.claim) || !ownerIn(c.owner, true) {
				p.Skipped = append(p.Skipped, fmt.Sprintf("%s: stale upstream rule of container %s (%s); left alone (outside %s)", f, c.owner.ContainerID, c.claim, scope))
				continue
			}
			remove(f, c, plan.KindStaleUpstreamRule, nil)
		}
		// Upstream masquerade rules of containers left without hostports rules in the family,
		// when this repair removed their last one or their owner is stale.
		for i := range o.Upstream {
			u := &o.Upstream[i]
			if u.Family != f || u.Chain != nftables.UpstreamMasquerades {
				continue
			}
			had, left := false, false
			for k := range o.Upstream {
				x := &o.Upstream[k]
				if x.Family == f && x.Chain == nftables.UpstreamHostports && x.ContainerID == u.ContainerID {
					had = true
					left = left || !upGone[x]
				}
			}
			ow := hostport.Owner{ContainerID: u.ContainerID}
			if left || keep[ow] {
				continue
			}
			if !had && (j == nil || j.Owner(ow, u.Dest.Addr()).State != liveness.Stale) {
				continue
			}
			if scope.Port != 0 && !had || !ownerIn(ow, true) {
				p.Skipped = append(p.Skipped, fmt.Sprintf("%s: upstream masquerade rule of container %s; left alone (outside %s)", f, u.ContainerID, scope))
				continue
			}
			tx.RemoveUpstream(*u)
			upGone[u] = true
			c := &claim{owner: ow, dest: u.Dest, chain: UpstreamChain(*u), upstream: u}
			p.Actions = append(p.Actions, fmt.Sprintf("delete rule %s handle %d  # container %s: masquerade to %s (%s)",
				c.chain, u.Handle, u.ContainerID, u.Dest.Addr(), plan.KindStaleUpstreamRule))
			reason := plan.KindStaleUpstreamRule
			k := f.String() + "\x00" + c.chain + "\x00" + ow.String()
			if rems[k] == nil {
				rems[k] = &plan.RepairRemoval{Family: f.String(), Owner: ow, Chain: c.chain, Claims: []hostport.Claim{}, Destinations: []string{}, ChainRemoved: true, Reasons: []string{reason}}
				remOrder = append(remOrder, k)
			}
		}
		// portguard's masquerade entries whose owner has no claim left in the family.
		left := map[string]bool{}
		for i := range o.Dump.Claims {
			e := &o.Dump.Claims[i]
			if e.Claim.Family == f && !removedElem[e] {
				left[e.Comment] = true
			}
		}
		for _, m := range o.Dump.Masq {
			if m.Family != f || left[m.Comment] {
				continue
			}
			ow := m.Owner
			if ow.IsZero() && res != nil {
				ow, _ = res(m.Comment)
			}
			if scope.Port != 0 || !ownerIn(ow, false) {
				p.Skipped = append(p.Skipped, fmt.Sprintf("%s: masquerade entry of %s for %s; left alone (outside %s)", f, printable(m.Comment), m.PodIP, scope))
				continue
			}
			tx.RemoveMasq(m)
			p.Actions = append(p.Actions, fmt.Sprintf("delete element inet %s %s { %s }  # masquerade of %s: no claim of its owner left (%s)",
				nftables.TableName, m.Map(), m.PodIP, printable(m.Comment), plan.KindOrphanMasquerade))
		}
		for _, g := range o.OrphanGates {
			if g.Claim.Family != f {
				continue
			}
			ow, _ := nftables.ParseOwner(g.Comment)
			if !portIn(g.Claim) || !ownerIn(ow, false) {
				p.Skipped = append(p.Skipped, fmt.Sprintf("%s: orphan gate of %s (%s); left alone (outside %s)", f, printable(g.Comment), g.Claim, scope))
				continue
			}
			tx.RemoveGates(g)
			gatesGone[g.Map()+nftables.KeyText(g.Claim)] = true
			p.Actions = append(p.Actions, fmt.Sprintf("delete element inet %s %s { %s }  # gate of %s without its claim (%s)",
				nftables.TableName, g.Map(), nftables.KeyText(g.Claim), printable(g.Comment), plan.KindOrphanGate))
		}
	}
	// Conditions chains no gate will jump to once the batch is in: the orphans observed,
	// and those whose last gates go with the claims and gates removed above.
	used := map[string]bool{}
	for i := range o.Dump.Claims {
		if e := &o.Dump.Claims[i]; e.Gate != "" && !removedElem[e] {
			used[e.Gate] = true
		}
	}
	for _, g := range o.OrphanGates {
		if !gatesGone[g.Map()+nftables.KeyText(g.Claim)] {
			used[g.Jump] = true
		}
	}
	var unused []string
	for _, ch := range o.CondChains {
		if !used[ch] {
			unused = append(unused, ch)
		}
	}
	if len(unused) > 0 {
		if scope.IsZero() {
			tx.RemoveCondChains(unused...)
			for _, ch := range unused {
				p.Actions = append(p.Actions, fmt.Sprintf("delete chain inet %s %s  # no gate jumps to it (%s)", nftables.TableName, ch, plan.KindOrphanChain))
			}
		} else {
			p.Skipped = append(p.Skipped, fmt.Sprintf("conditions chains %v are shared; left alone (outside %s)", unused, scope))
		}
	}
	if o.Table && len(o.Layout) > 0 {
		if scope.IsZero() {
			p.Layout = true
			p.Actions = append([]string{fmt.Sprintf("# rewrite the layout of inet %s (maps, base chains and their rules; elements stay): %v", nftables.TableName, o.Layout)}, p.Actions...)
		} else {
			p.Skipped = append(p.Skipped, fmt.Sprintf("the layout of inet %s is shared; left alone (outside %s)", nftables.TableName, scope))
		}
	}
	for k := range keep {
		if !kept[k] {
			p.UnknownKeep = append(p.UnknownKeep, k)
		}
	}
	sort.Slice(p.UnknownKeep, func(a, b int) bool { return p.UnknownKeep[a].String() < p.UnknownKeep[b].String() })
	for _, k := range remOrder {
		p.Removals = append(p.Removals, *rems[k])
	}
	// ChainRemoved: nothing of the owner is left in that place.
	left := map[string]bool{}
	for _, f := range hostport.Families {
		for _, c := range claims(o, f, res) {
			if !(c.elem != nil && removedElem[c.elem]) && !(c.upstream != nil && upGone[c.upstream]) {
				left[f.String()+"\x00"+c.chain+"\x00"+c.owner.String()] = true
			}
		}
	}
	for i := range p.Removals {
		r := &p.Removals[i]
		if left[r.Family+"\x00"+r.Chain+"\x00"+r.Owner.String()] {
			r.ChainRemoved = false
		}
	}
	return p, nil
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

// destAddr is the address of an audit destination "IP:port" (invalid when there is none).
func destAddr(s string) netip.Addr {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr()
}

// printable returns a comment read from the kernel as it is when every rune is printable,
// quoted (strconv.Quote) otherwise: another writer's comment with a newline must not start
// a line of its own in repair's actions, which --dry-run documents as nft syntax.
func printable(s string) string {
	if strings.IndexFunc(s, func(r rune) bool { return !unicode.IsPrint(r) }) < 0 {
		return s
	}
	return strconv.Quote(s)
}
