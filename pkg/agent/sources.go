package agent

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	iptbackend "github.com/portguard/portguard/pkg/backend/iptables"
	nftbackend "github.com/portguard/portguard/pkg/backend/nftables"
	"github.com/portguard/portguard/pkg/engine"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/metrics"
	"github.com/portguard/portguard/pkg/nftaudit"
	"github.com/portguard/portguard/pkg/plan"
	"github.com/portguard/portguard/pkg/state"
)

// IPTables is the iptables backend's view: both families' nat tables, audited as
// `portguardctl audit` does (state.ObserveAll, plan.Audit, JudgeOwners).
type IPTables struct {
	Runner      iptables.Runner
	LockTimeout time.Duration
	// NewJudge makes the judge whose records a removal forgets (liveness.New).
	NewJudge func() *liveness.Judge
}

// Name implements Source.
func (s *IPTables) Name() string { return metrics.BackendIPTables }

// Observe implements Source. A family whose iptables is unusable (no ip6tables, no
// iptables at all on an nftables node) is an unavailable audit, not an error.
func (s *IPTables) Observe(j *liveness.Judge, _ []plan.FamilyAudit) ([]Claim, []plan.FamilyAudit, error) {
	var fas []plan.FamilyAudit
	for _, f := range hostport.Families {
		st, err := state.ObserveAll(s.Runner, f)
		if errors.Is(err, iptables.ErrUnavailable) {
			fas = append(fas, plan.UnavailableAudit(f, err))
			continue
		}
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", f, err)
		}
		fa := plan.Audit(st)
		fa.JudgeOwners(j)
		fas = append(fas, fa)
	}
	return claimsOf(s.Name(), fas, func(plan.AuditClaim) bool { return true }), fas, nil
}

// claimsOf lists the claims of family audits that keep says the backend can remove.
func claimsOf(backend string, fas []plan.FamilyAudit, keep func(plan.AuditClaim) bool) []Claim {
	var claims []Claim
	for _, fa := range fas {
		for _, pc := range fa.Ports {
			for _, c := range pc.Claims {
				if !keep(c) {
					continue
				}
				cl := Claim{Backend: backend, Owner: c.Owner(),
					Claim: hostport.Claim{Family: fa.Family, Proto: pc.Protocol, HostPort: pc.HostPort}}
				if hc, ok := c.Claim(); ok {
					cl.Claim = hc
				} else if c.HostIP != "" {
					cl.Claim.HostIP, _ = netip.ParseAddr(c.HostIP)
				}
				if c.Destination != "" {
					cl.Dest, _ = netip.ParseAddrPort(c.Destination)
				}
				if c.Evidence != nil {
					cl.Evidence = *c.Evidence
				}
				claims = append(claims, cl)
			}
		}
	}
	return claims
}

// Present lists the container IDs of network's attachments that have a jump in
// CNI-HOSTPORT-DNAT in either family (the ownership GC goes by).
func (s *IPTables) Present(network string) (map[string]bool, error) {
	ids := map[string]bool{}
	for _, f := range hostport.Families {
		st, err := state.Observe(s.Runner, f, state.DNATChain)
		if errors.Is(err, iptables.ErrUnavailable) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", f, err)
		}
		for _, a := range st.Attachments {
			if len(a.Jumps) > 0 && a.Owner.Network == network {
				ids[a.Owner.ContainerID] = true
			}
		}
	}
	return ids, nil
}

// Collect implements Source: engine.Collect over the iptables backend.
func (s *IPTables) Collect(owners []hostport.Owner) ([]hostport.Owner, error) {
	e := engine.NewWith(iptbackend.New(s.Runner), s.LockTimeout)
	e.Judge = judgeOf(s.NewJudge)
	return e.Collect(owners, s.Present)
}

func judgeOf(f func() *liveness.Judge) *liveness.Judge {
	if f == nil {
		return liveness.New()
	}
	return f()
}

// NFTables is the nftables backend's view: portguard's inet table and upstream portmap's
// ip/ip6 cni_hostport tables, observed and audited as `portguardctl audit --backend
// nftables` does (nftables.Observe, pkg/nftaudit). Only the elements of portguard's table are
// the backend's to remove; upstream's rules are in the metrics (and for portguardctl repair).
type NFTables struct {
	LockTimeout time.Duration
	NewJudge    func() *liveness.Judge
}

// Name implements Source.
func (s *NFTables) Name() string { return metrics.BackendNFTables }

// resolver matches hashed element comments against the owners portguard recorded and the
// libcni cache holds (as portguardctl does).
func resolver(j *liveness.Judge) nftaudit.Resolve {
	return nftaudit.Resolver(j.KnownOwners())
}

// Observe implements Source. nf_tables not answering, or neither portguard's nor upstream's
// tables existing, means the backend is not in use here: no claim, no audit.
func (s *NFTables) Observe(j *liveness.Judge, earlier []plan.FamilyAudit) ([]Claim, []plan.FamilyAudit, error) {
	t, err := nftbackend.Open()
	if err != nil {
		return nil, nil, nil
	}
	defer t.Close()
	_, obs, err := t.Observe()
	if err != nil {
		return nil, nil, err
	}
	if !nftaudit.InUse(obs) {
		return nil, nil, nil
	}
	var ipt []plan.FamilyAudit
	for _, fa := range earlier {
		if fa.Backend == plan.BackendIPTables && fa.Available {
			ipt = append(ipt, fa)
		}
	}
	fas := nftaudit.Audit(obs, ipt, j, resolver(j))
	own := "inet " + nftbackend.TableName + " "
	return claimsOf(s.Name(), fas, func(c plan.AuditClaim) bool { return strings.HasPrefix(c.Chain, own) }), fas, nil
}

// dump reads the elements of portguard's table, with the owners of hashed comments resolved
// as in Observe (an absent table reads as empty).
func (s *NFTables) dump(j *liveness.Judge) ([]nftbackend.Element, error) {
	t, err := nftbackend.Open()
	if err != nil {
		return nil, err
	}
	defer t.Close()
	d, err := t.Dump()
	if err != nil {
		return nil, err
	}
	res := resolver(j)
	for i := range d.Claims {
		if e := &d.Claims[i]; e.Owner.IsZero() {
			if o, ok := res(e.Comment); ok {
				e.Owner = o
			}
		}
	}
	return d.Claims, nil
}

// Present lists the container IDs of network's claims in the table.
func (s *NFTables) Present(network string) (map[string]bool, error) {
	es, err := s.dump(judgeOf(s.NewJudge))
	if err != nil {
		return nil, err
	}
	ids := map[string]bool{}
	for _, e := range es {
		if e.Owner.Network == network {
			ids[e.Owner.ContainerID] = true
		}
	}
	return ids, nil
}

// Collect implements Source: engine.Collect over the nftables backend.
func (s *NFTables) Collect(owners []hostport.Owner) ([]hostport.Owner, error) {
	e := engine.NewWith(nftbackend.New(), s.LockTimeout)
	e.Judge = judgeOf(s.NewJudge)
	return e.Collect(owners, s.Present)
}
