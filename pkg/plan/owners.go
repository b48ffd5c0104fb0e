package plan

import (
	"fmt"
	"net/netip"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/liveness"
)

// Liveness judges the owners of claims (pkg/liveness.Judge). Audit and repair take it
// optionally: without one every owner's state is "unknown" in an audit, and repair decides
// by jump order and --keep alone.
type Liveness interface {
	// Owner judges o as the owner of a claim forwarding to dest.
	Owner(o hostport.Owner, dest netip.Addr) liveness.Evidence
	// Holders lists the owners whose records name addr as theirs.
	Holders(addr netip.Addr) []hostport.Owner
}

// KindAddressReused: a claim forwards to an address that now belongs to another, live
// attachment, so its host port reaches an unrelated pod.
const KindAddressReused = "address-reused"

// claimDest is the destination address of an audit claim (invalid for no-dnat claims).
func claimDest(c *AuditClaim) netip.Addr {
	if c.m == nil {
		return netip.Addr{}
	}
	return c.m.Dest.Addr()
}

// protected reports whether repair must keep c's claim although it lost its port: its
// owner is alive, or cannot be judged (the same rule as ADD's takeover).
func protected(j Liveness, c *AuditClaim) bool {
	if j == nil || c.owner.IsZero() {
		return false
	}
	return j.Owner(c.owner, claimDest(c)).State != liveness.Stale
}

// JudgeOwners fills in each claim's owner state and evidence, and reports every claim
// whose destination address is now held by another live attachment (address reuse). It
// changes fa in place; a nil j leaves it as it is.
func (fa *FamilyAudit) JudgeOwners(j Liveness) {
	if j == nil {
		return
	}
	for pi := range fa.Ports {
		pc := &fa.Ports[pi]
		for ci := range pc.Claims {
			c := &pc.Claims[ci]
			dest := claimDest(c)
			ev := j.Owner(c.owner, dest)
			c.OwnerState, c.Evidence = string(ev.State), &ev
			switch ev.State {
			case liveness.Alive:
				fa.Summary.AliveOwners++
			case liveness.Stale:
				fa.Summary.StaleOwners++
			}
			h, hev, ok := ReusedBy(j, c.owner, dest, ev)
			if !ok {
				continue
			}
			fa.Summary.AddressReuses++
			fa.Problems = append(fa.Problems, Problem{Kind: KindAddressReused, Chain: c.Chain, Network: c.Network,
				ContainerID: c.ContainerID, Protocol: pc.Protocol, HostPort: pc.HostPort,
				Message: fmt.Sprintf("%s: the claim of %s forwards to %s, which now belongs to live attachment %s (%s): the host port reaches an unrelated pod",
					c.m.Claim, ownerText(c.owner, c.Chain), c.Destination, h, hev.Reason),
				Fix: fmt.Sprintf("remove the stale claim: CNI DEL of %s, or portguardctl gc --network %s with the valid container IDs", ownerText(c.owner, c.Chain), dash(c.Network))})
		}
	}
	fa.Summary.Problems = len(fa.Problems)
}

// ReusedBy decides address reuse for one claim: o, judged ev, forwards to dest, and dest
// now belongs to another attachment that is alive (the holder and its evidence are
// returned). An owner judged alive, or a claim without a destination, is never reused.
// The audit (JudgeOwners) and the node agent both decide through it.
func ReusedBy(j Liveness, o hostport.Owner, dest netip.Addr, ev liveness.Evidence) (hostport.Owner, liveness.Evidence, bool) {
	if ev.State == liveness.Alive || !dest.IsValid() {
		return hostport.Owner{}, liveness.Evidence{}, false
	}
	for _, h := range j.Holders(dest) {
		if h == o {
			continue
		}
		if hev := j.Owner(h, dest); hev.State == liveness.Alive {
			return h, hev, true
		}
	}
	return hostport.Owner{}, liveness.Evidence{}, false
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
