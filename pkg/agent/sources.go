package agent

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	gnft "github.com/google/nftables"

	iptbackend "github.com/portguard/portguard/pkg/backend/iptables"
	nftbackend "github.com/portguard/portguard/pkg/backend/nftables"
	"github.com/portguard/portguard/pkg/engine"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/metrics"
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
func (s *IPTables) Observe(j *liveness.Judge) ([]Claim, []metrics.Audit, error) {
	var claims []Claim
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
		for _, pc := range fa.Ports {
			for _, c := range pc.Claims {
				cl := Claim{Backend: s.Name(), Owner: c.Owner(),
					Claim: hostport.Claim{Family: f, Proto: pc.Protocol, HostPort: pc.HostPort}}
				if c.HostIP != "" {
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
	return claims, metrics.FromReport(plan.NewAuditReport(fas)), nil
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

// NFTables is the nftables backend's view: the claims (map elements) of portguard's inet
// table, read with the backend's own Dump.
//
// TODO(nftops): switch to the nftables audit's model once it lands on main; until then the
// nftables gauges cover claims, host ports, owner states and address reuse only.
type NFTables struct {
	LockTimeout time.Duration
	NewJudge    func() *liveness.Judge
}

// Name implements Source.
func (s *NFTables) Name() string { return metrics.BackendNFTables }

// exists reports whether portguard's table is in this network namespace; an error means
// nf_tables cannot be asked (no kernel support, no permission).
func exists() (bool, error) {
	c, err := gnft.New()
	if err != nil {
		return false, err
	}
	ts, err := c.ListTablesOfFamily(gnft.TableFamilyINet)
	if err != nil {
		return false, err
	}
	for _, t := range ts {
		if t.Name == nftbackend.TableName {
			return true, nil
		}
	}
	return false, nil
}

// dump reads the table's claims, with the owners of hashed comments matched against
// portguard's records; ok is false when the table does not exist (or nf_tables cannot be
// asked): the backend is not in use on this node.
func (s *NFTables) dump(records []liveness.Record) (_ []nftbackend.Element, ok bool, err error) {
	if there, err := exists(); err != nil || !there {
		return nil, false, nil
	}
	t, err := nftbackend.Open()
	if err != nil {
		return nil, false, err
	}
	defer t.Close()
	d, err := t.Dump()
	if err != nil {
		return nil, false, err
	}
	for i := range d.Claims {
		e := &d.Claims[i]
		if !e.Owner.IsZero() {
			continue
		}
		for _, r := range records {
			if e.OwnedBy(r.Owner) {
				e.Owner = r.Owner
				break
			}
		}
	}
	return d.Claims, true, nil
}

// Observe implements Source.
func (s *NFTables) Observe(j *liveness.Judge) ([]Claim, []metrics.Audit, error) {
	es, ok, err := s.dump(j.Records.All())
	if err != nil || !ok {
		return nil, nil, err
	}
	var claims []Claim
	sum := map[hostport.Family]*plan.AuditSummary{}
	ports := map[hostport.Family]map[string]bool{}
	for _, f := range hostport.Families {
		sum[f], ports[f] = &plan.AuditSummary{}, map[string]bool{}
	}
	for _, e := range es {
		f := e.Claim.Family
		c := Claim{Backend: s.Name(), Claim: e.Claim, Owner: e.Owner, Dest: e.Dest}
		if e.Owner.IsZero() {
			c.Evidence = liveness.Evidence{State: liveness.Unknown, Reason: "the element's comment names no owner portguard recorded"}
		} else {
			c.Evidence = j.Owner(e.Owner, e.Dest.Addr())
		}
		claims = append(claims, c)
		su := sum[f]
		su.Claims++
		ports[f][fmt.Sprintf("%s/%d", e.Claim.Proto, e.Claim.HostPort)] = true
		switch c.Evidence.State {
		case liveness.Alive:
			su.AliveOwners++
		case liveness.Stale:
			su.StaleOwners++
		}
		if _, _, reused := plan.ReusedBy(j, c.Owner, c.Dest.Addr(), c.Evidence); reused && !c.Owner.IsZero() {
			su.AddressReuses++
			su.Problems++
		}
	}
	var audits []metrics.Audit
	for _, f := range hostport.Families {
		su := sum[f]
		su.HostPorts = len(ports[f])
		audits = append(audits, metrics.Audit{Backend: s.Name(), Family: f.String(), Available: true,
			Healthy: su.Problems == 0, Summary: *su})
	}
	return claims, audits, nil
}

// Present lists the container IDs of network's claims in the table.
func (s *NFTables) Present(network string) (map[string]bool, error) {
	es, _, err := s.dump(judgeOf(s.NewJudge).Records.All())
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
