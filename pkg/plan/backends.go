package plan

import (
	"net/netip"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/state"
)

// Backends a family audit is about (FamilyAudit.Backend, the metrics' backend label).
const (
	BackendIPTables = "iptables"
	BackendNFTables = "nftables"
)

// Problem kinds of the nftables backend's audit (pkg/nftaudit). Like every kind, the names
// are part of the documented JSON shape.
const (
	// KindSplitClaim: one host port claimed in two backends (portguard's nftables table and
	// iptables CNI chains or upstream's cni_hostport tables); the one whose hook runs first
	// gets every packet.
	KindSplitClaim = "split-claim"
	// KindStaleUpstreamRule: a rule of upstream's cni_hostport tables whose owner is stale.
	KindStaleUpstreamRule = "stale-upstream-rule"
	// KindLayoutDamaged: portguard's table differs from its layout (a map, a chain or the
	// base chains' rules).
	KindLayoutDamaged = "layout-damaged"
	// KindOrphanGate: a conditions gate element without the claim it guards.
	KindOrphanGate = "orphan-gate"
	// KindOrphanMasquerade: a masquerade entry whose owner has no claim in the family.
	KindOrphanMasquerade = "orphan-masquerade"
)

// NewClaim is an audit claim that is not a jump of CNI-HOSTPORT-DNAT: an element of
// portguard's nftables table or a rule of upstream's cni_hostport table. position is its
// 1-based place in the order the kernel looks claims up in (see docs/audit-json.md),
// chain names where it lives. It wins until the backend's audit says otherwise.
func NewClaim(position int, owner hostport.Owner, c hostport.Claim, dest netip.AddrPort, chain string) AuditClaim {
	return AuditClaim{Position: position, Network: owner.Network, ContainerID: owner.ContainerID, Chain: chain,
		HostIP: hostIPString(c), Destination: dest.String(), Status: StatusWins,
		owner: owner, m: &state.Mapping{Claim: c, Dest: dest}}
}

// Claim is the host-port claim the audit claim stands for (ok false for none).
func (c AuditClaim) Claim() (hostport.Claim, bool) {
	if c.m == nil {
		return hostport.Claim{}, false
	}
	return c.m.Claim, true
}

// Shadow marks c shadowed by the claim in chain by.
func (c *AuditClaim) Shadow(by string) { c.Status, c.ShadowedBy = StatusShadowed, by }

// OwnerText names an owner and where its claim lives, as audit messages do.
func OwnerText(o hostport.Owner, chain string) string { return ownerText(o, chain) }
