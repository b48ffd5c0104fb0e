// Package nftaudit is the operator side of the nftables backend: it turns the backend's
// observed model (nftables.Observed: portguard's table, upstream's cni_hostport rules)
// into the audit report iptables audits use (pkg/plan, Backend "nftables"), and plans the
// repair of what it finds as one transaction of the backend (nftables.Tx).
//
// Order of evaluation, which decides who gets a packet: upstream's cni_hostport chains and
// iptables' nat (kube-proxy, CNI-HOSTPORT-DNAT) hook at priority -100, portguard's table at
// -99 (nftables.PriorityDNAT). A claim there shadows portguard's claim of the same port;
// within upstream's hostports chain, the first matching rule wins.
package nftaudit

import (
	"fmt"
	"net/netip"
	"sort"
	"strings"

	"github.com/portguard/portguard/pkg/backend/nftables"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/plan"
)

// Resolve names the owner of an element whose comment is a hash (owners longer than an
// element comment): it returns the owner whose nftables.OwnerComment is comment. The CLI
// builds it from portguard's records and the libcni cache; nil resolves nothing.
type Resolve func(comment string) (hostport.Owner, bool)

// Resolver matches comments against known owners.
func Resolver(known []hostport.Owner) Resolve {
	m := map[string]hostport.Owner{}
	for _, o := range known {
		m[nftables.OwnerComment(o)] = o
	}
	return func(c string) (hostport.Owner, bool) { o, ok := m[c]; return o, ok }
}

// claim is one claim of the nftables side, in evaluation order.
type claim struct {
	owner    hostport.Owner
	claim    hostport.Claim
	dest     netip.AddrPort
	chain    string
	elem     *nftables.Element      // portguard's element
	upstream *nftables.UpstreamRule // upstream's rule
	ac       *plan.AuditClaim
}

// ElementChain names where an element of portguard's table lives: its map.
func ElementChain(e nftables.Element) string { return "inet " + nftables.TableName + " " + e.Map() }

// UpstreamChain names an upstream rule's chain, "ip cni_hostport hostports".
func UpstreamChain(u nftables.UpstreamRule) string {
	fam := "ip"
	if u.Family == hostport.V6 {
		fam = "ip6"
	}
	return fam + " " + nftables.UpstreamTable + " " + u.Chain
}

func elementOwner(e nftables.Element, res Resolve) hostport.Owner {
	if !e.Owner.IsZero() || res == nil {
		return e.Owner
	}
	o, _ := res(e.Comment)
	return o
}

// claims lists family f's claims in evaluation order: upstream's rules, then portguard's
// hostIP map, then its wildcard map.
func claims(o nftables.Observed, f hostport.Family, res Resolve) []*claim {
	var out []*claim
	for i := range o.Upstream {
		u := &o.Upstream[i]
		if u.Family == f && u.Chain == nftables.UpstreamHostports {
			out = append(out, &claim{owner: hostport.Owner{ContainerID: u.ContainerID}, claim: u.Claim, dest: u.Dest, chain: UpstreamChain(*u), upstream: u})
		}
	}
	for _, hostIP := range []bool{true, false} {
		for i := range o.Dump.Claims {
			e := &o.Dump.Claims[i]
			if e.Claim.Family == f && e.Claim.AnyHostIP() != hostIP {
				out = append(out, &claim{owner: elementOwner(*e, res), claim: e.Claim, dest: e.Dest, chain: ElementChain(*e), elem: e})
			}
		}
	}
	return out
}

// iptClaim is a winning claim of an iptables family audit, for split claims.
type iptClaim struct {
	owner hostport.Owner
	claim hostport.Claim
	chain string
	dest  string
}

func iptablesClaims(ipt []plan.FamilyAudit, f hostport.Family) []iptClaim {
	var out []iptClaim
	for _, fa := range ipt {
		if fa.Family != f || !fa.Available {
			continue
		}
		for _, pc := range fa.Ports {
			for _, c := range pc.Claims {
				if c.Status != plan.StatusWins {
					continue
				}
				if cl, ok := c.Claim(); ok {
					out = append(out, iptClaim{c.Owner(), cl, c.Chain, c.Destination})
				}
			}
		}
	}
	return out
}

// ownerName names a claim's owner and where it lives, as audit messages do; upstream's
// rules know only the container ID.
func ownerName(o hostport.Owner, chain string) string {
	if o.Network == "" && o.ContainerID != "" {
		return fmt.Sprintf("container %s (chain %s)", o.ContainerID, chain)
	}
	return plan.OwnerText(o, chain)
}

// InUse reports whether the nftables side has anything to audit: portguard's table or an
// upstream cni_hostport table.
func InUse(o nftables.Observed) bool { return o.Table || len(o.UpstreamTables) > 0 }

// Audit reports, per family, every claim of the nftables side with its owner's state and
// evidence (j; nil leaves them unjudged) and every problem: shadowed upstream rules, claims
// split across backends (ipt: the iptables families' audits of the same node, may be
// empty), stale upstream rules, address reuse, layout damage, orphan gate elements,
// masquerade entries and conditions chains. Problems of the whole table (layout,
// conditions chains of both families) are listed under the family whose name they carry,
// IPv4 otherwise.
func Audit(o nftables.Observed, ipt []plan.FamilyAudit, j plan.Liveness, res Resolve) []plan.FamilyAudit {
	var out []plan.FamilyAudit
	for _, f := range hostport.Families {
		out = append(out, auditFamily(o, f, ipt, j, res))
	}
	return out
}

func auditFamily(o nftables.Observed, f hostport.Family, ipt []plan.FamilyAudit, j plan.Liveness, res Resolve) plan.FamilyAudit {
	fa := plan.FamilyAudit{Family: f, Backend: plan.BackendNFTables, Available: true,
		Ports: []plan.PortClaims{}, OrphanChains: []string{}, Problems: []plan.Problem{}}
	fnum := int(f)
	cs := claims(o, f, res)
	byPort := map[string]*plan.PortClaims{}
	var keys []string
	for i, c := range cs {
		k := fmt.Sprintf("%s/%05d", c.claim.Proto, c.claim.HostPort)
		if byPort[k] == nil {
			byPort[k] = &plan.PortClaims{Protocol: c.claim.Proto, HostPort: c.claim.HostPort}
			keys = append(keys, k)
		}
		ac := plan.NewClaim(i+1, c.owner, c.claim, c.dest, c.chain)
		c.ac = &ac
	}
	// Shadowing within the nftables side: the first claim (evaluation order) of a port wins.
	var winners []*claim
	for _, c := range cs {
		for _, w := range winners {
			if w.claim.Conflicts(c.claim) {
				c.ac.Shadow(w.chain)
				break
			}
		}
		if c.ac.Status == plan.StatusWins {
			winners = append(winners, c)
		}
	}
	for _, c := range cs {
		pc := byPort[fmt.Sprintf("%s/%05d", c.claim.Proto, c.claim.HostPort)]
		pc.Claims = append(pc.Claims, *c.ac)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fa.Ports = append(fa.Ports, *byPort[k])
	}
	fa.Summary.Claims = len(cs)
	fa.Summary.HostPorts = len(keys)
	fa.Summary.Chains = len(o.CondChains)
	// Owners (and address reuse) are judged on the claims as listed.
	fa.JudgeOwners(j)
	state := map[*claim]string{} // the owner state JudgeOwners gave each claim (by position)
	for _, pc := range fa.Ports {
		for _, ac := range pc.Claims {
			state[cs[ac.Position-1]] = ac.OwnerState
		}
	}
	add := func(p plan.Problem) { fa.Problems = append(fa.Problems, p) }
	for _, c := range cs {
		if c.ac.Status != plan.StatusShadowed {
			continue
		}
		var w *claim
		for _, x := range winners {
			if x.chain == c.ac.ShadowedBy && x.claim.Conflicts(c.claim) {
				w = x
				break
			}
		}
		kind, fix := plan.KindShadowedClaim, fmt.Sprintf("portguardctl repair --backend nftables --family %d (removes the stale claim), or --keep %s to keep this one", fnum, c.owner)
		msg := fmt.Sprintf("%s: the claim of %s (-> %s) is shadowed by %s (-> %s), which upstream portmap's chain evaluates first: packets to the port go to %s, never to this pod",
			c.claim, ownerName(c.owner, c.chain), c.dest, ownerName(w.owner, w.chain), w.dest, w.dest)
		if c.elem != nil && w.upstream != nil {
			kind = plan.KindSplitClaim
			msg = fmt.Sprintf("%s is claimed in two backends: by %s (-> %s) in portguard's table and by %s (-> %s) in upstream portmap's nftables table, whose hook (priority -100) runs before portguard's (-99): packets go to %s",
				c.claim, ownerName(c.owner, c.chain), c.dest, ownerName(w.owner, w.chain), w.dest, w.dest)
			fa.Summary.SplitClaims++
		} else {
			fa.Summary.ShadowedClaims++
			fa.Summary.DuplicateClaims = fa.Summary.ShadowedClaims
		}
		add(plan.Problem{Kind: kind, Chain: c.chain, Network: c.owner.Network, ContainerID: c.owner.ContainerID,
			Protocol: c.claim.Proto, HostPort: c.claim.HostPort, Message: msg, Fix: fix})
	}
	// Split with iptables: any nftables claim that an iptables CNI claim of the port shadows
	// (iptables' nat runs at -100: before portguard's table; beside upstream's, in an order
	// the kernel does not promise).
	for _, ic := range iptablesClaims(ipt, f) {
		for _, c := range cs {
			if !ic.claim.Conflicts(c.claim) {
				continue
			}
			who := "portguard's table"
			if c.upstream != nil {
				who = "upstream portmap's nftables table"
			}
			fa.Summary.SplitClaims++
			add(plan.Problem{Kind: plan.KindSplitClaim, Chain: c.chain, Network: c.owner.Network, ContainerID: c.owner.ContainerID,
				Protocol: c.claim.Proto, HostPort: c.claim.HostPort,
				Message: fmt.Sprintf("%s is claimed in two backends: by %s (-> %s) in %s and by %s (-> %s) in iptables' nat table, which runs first: packets go to %s",
					c.claim, ownerName(c.owner, c.chain), c.dest, who, ownerName(ic.owner, ic.chain), ic.dest, ic.dest),
				Fix: fmt.Sprintf("portguardctl repair --backend nftables --family %d (removes whichever claim's owner is stale), or DEL the attachment that should not have the port", fnum)})
		}
	}
	// Upstream rules of stale owners (upstream's DEL never ran): a hostports rule takes
	// the port from any later claim, a masquerading rule masquerades a reused address.
	staleUp := map[string]bool{}
	for _, c := range cs {
		if c.upstream != nil && state[c] == string(liveness.Stale) {
			staleUp[c.owner.ContainerID] = true
			fa.Summary.StaleUpstreamRules++
			add(plan.Problem{Kind: plan.KindStaleUpstreamRule, Chain: c.chain, ContainerID: c.owner.ContainerID,
				Protocol: c.claim.Proto, HostPort: c.claim.HostPort,
				Message: fmt.Sprintf("%s: upstream portmap's rule of container %s (-> %s, handle %d) outlived its owner: it still takes the port from every later claim",
					c.claim, c.owner.ContainerID, c.dest, c.upstream.Handle),
				Fix: fmt.Sprintf("portguardctl repair --backend nftables --family %d (deletes the container's rules in %s only)", fnum, nftables.UpstreamTable)})
		}
	}
	if j != nil {
		for _, u := range o.Upstream {
			if u.Family != f || u.Chain != nftables.UpstreamMasquerades || staleUp[u.ContainerID] || hasUpstreamClaim(o, u) {
				continue
			}
			ev := j.Owner(hostport.Owner{ContainerID: u.ContainerID}, u.Dest.Addr())
			if ev.State != liveness.Stale {
				continue
			}
			fa.Summary.StaleUpstreamRules++
			add(plan.Problem{Kind: plan.KindStaleUpstreamRule, Chain: UpstreamChain(u), ContainerID: u.ContainerID,
				Message: fmt.Sprintf("upstream portmap's masquerade rule of container %s (pod %s, handle %d) outlived its owner (%s)", u.ContainerID, u.Dest.Addr(), u.Handle, ev.Reason),
				Fix:     fmt.Sprintf("portguardctl repair --backend nftables --family %d", fnum)})
		}
	}
	// The table's own damage.
	for _, l := range o.Layout {
		if !o.Table || !familyOf(l, f) {
			continue
		}
		fa.Summary.LayoutProblems++
		add(plan.Problem{Kind: plan.KindLayoutDamaged, Chain: "inet " + nftables.TableName,
			Message: fmt.Sprintf("portguard's table differs from its layout: %s; claims may not be forwarded (or masqueraded)", l),
			Fix:     "portguardctl repair --backend nftables (rewrites the layout; elements stay)"})
	}
	for _, g := range o.OrphanGates {
		if g.Claim.Family != f {
			continue
		}
		ow, _ := nftables.ParseOwner(g.Comment)
		fa.Summary.OrphanElements++
		add(plan.Problem{Kind: plan.KindOrphanGate, Chain: "inet " + nftables.TableName + " " + g.Jump, Network: ow.Network, ContainerID: ow.ContainerID,
			Protocol: g.Claim.Proto, HostPort: g.Claim.HostPort,
			Message: fmt.Sprintf("%s: a conditions gate (jump %s) of %s is left without its claim: a later claim of the port would be filtered by conditions that are not its own", g.Claim, g.Jump, g.Comment),
			Fix:     fmt.Sprintf("portguardctl repair --backend nftables --family %d", fnum)})
	}
	claimed := map[string]bool{}
	for _, e := range o.Dump.Claims {
		claimed[e.Claim.Family.String()+"/"+e.Comment] = true
	}
	for _, m := range o.Dump.Masq {
		if m.Family != f || claimed[f.String()+"/"+m.Comment] {
			continue
		}
		ow := m.Owner
		if ow.IsZero() && res != nil {
			ow, _ = res(m.Comment)
		}
		fa.Summary.OrphanElements++
		add(plan.Problem{Kind: plan.KindOrphanMasquerade, Chain: "inet " + nftables.TableName, Network: ow.Network, ContainerID: ow.ContainerID,
			Message: fmt.Sprintf("masquerade entry of %s for pod %s without any claim of its owner: flows DNATed to that address by anything else are masqueraded", m.Comment, m.PodIP),
			Fix:     fmt.Sprintf("portguardctl repair --backend nftables --family %d", fnum)})
	}
	for _, ch := range o.OrphanCondChains {
		if !strings.HasPrefix(ch, fmt.Sprintf("cond-%d-", fnum)) {
			continue
		}
		fa.OrphanChains = append(fa.OrphanChains, ch)
		fa.Summary.OrphanChains++
		add(plan.Problem{Kind: plan.KindOrphanChain, Chain: "inet " + nftables.TableName + " " + ch,
			Message: fmt.Sprintf("conditions chain %s is used by no claim any more (left by removed attachments); it forwards nothing", ch),
			Fix:     "portguardctl repair --backend nftables"})
	}
	fa.Summary.Problems = len(fa.Problems)
	return fa
}

// familyOf reports whether a table-wide problem line belongs to family f: lines naming a
// map whose name ends in 6 are IPv6's, everything else (shared chains) IPv4's.
func familyOf(line string, f hostport.Family) bool {
	six := false
	for _, w := range strings.Fields(line) {
		if len(w) > 1 && w[0] >= 'a' && w[0] <= 'z' && strings.HasSuffix(w, "6") {
			six = true
		}
	}
	return six == (f == hostport.V6)
}

// hasUpstreamClaim reports whether the container of masquerading rule u still has a
// hostports rule in its family.
func hasUpstreamClaim(o nftables.Observed, u nftables.UpstreamRule) bool {
	for _, x := range o.Upstream {
		if x.Family == u.Family && x.Chain == nftables.UpstreamHostports && x.ContainerID == u.ContainerID {
			return true
		}
	}
	return false
}
