package main

import (
	"errors"
	"fmt"
	"time"

	"github.com/portguard/portguard/pkg/backend/nftables"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/nftaudit"
	"github.com/portguard/portguard/pkg/plan"
	"github.com/portguard/portguard/pkg/state"
)

// backendFlag is --backend iptables|nftables|all: which backend's state audit, repair and
// gc look at. all (the default) takes iptables when its tools work and nftables when the
// node has portguard's table or upstream's cni_hostport tables; naming one makes its
// absence an error.
type backendFlag struct{ v string }

func (b *backendFlag) String() string { return "all" }

func (b *backendFlag) Set(v string) error {
	switch v {
	case "iptables", "nftables", "all":
		b.v = v
		return nil
	}
	return fmt.Errorf("must be iptables, nftables or all")
}

func (b *backendFlag) iptables() bool { return b.v != "nftables" }
func (b *backendFlag) nftables() bool { return b.v != "iptables" }
func (b *backendFlag) explicit() bool { return b.v == "iptables" || b.v == "nftables" }

// nftSide is one observation of the nftables side of the node, with its transaction.
type nftSide struct {
	t   *nftables.Table
	tx  *nftables.Tx
	obs nftables.Observed
}

// observeNFT opens portguard's table (in this network namespace) and observes it. inUse is
// false when neither portguard's nor upstream's tables exist; err when nf_tables does not
// answer.
func observeNFT() (*nftSide, error) {
	t, err := nftables.Open()
	if err != nil {
		return nil, err
	}
	tx, o, err := t.Observe()
	if err != nil {
		t.Close()
		return nil, err
	}
	return &nftSide{t: t, tx: tx, obs: o}, nil
}

func (s *nftSide) Close() { s.t.Close() }

// knownOwners are the owners portguard recorded and the libcni cache holds: what an
// element comment that is a hash can be matched against.
func knownOwners(j *liveness.Judge) nftaudit.Resolve {
	return nftaudit.Resolver(j.KnownOwners())
}

// filterFamilies keeps the family audits ff selects.
func filterFamilies(fas []plan.FamilyAudit, ff *familyFlag) []plan.FamilyAudit {
	var out []plan.FamilyAudit
	for _, fa := range fas {
		for _, f := range ff.families() {
			if fa.Family == f {
				out = append(out, fa)
			}
		}
	}
	return out
}

// observeIPT is observeAll for the backends flag: iptables skipped when not selected, and
// its absence no error when nftables may stand in.
func observeIPT(r iptables.Runner, ff *familyFlag, bf *backendFlag) ([]*state.State, []plan.FamilyAudit, error) {
	if !bf.iptables() {
		return nil, nil, nil
	}
	states, unavailable, err := observeAll(r, ff)
	if err != nil && !bf.explicit() && errors.Is(err, errNoIPTables) {
		// No usable iptables at all: a node of the nftables backend. Report the families
		// as unavailable; audit fails only if nftables has nothing either.
		unavailable = nil
		for _, f := range ff.families() {
			unavailable = append(unavailable, plan.UnavailableAudit(f, iptables.ErrUnavailable))
		}
		return nil, unavailable, nil
	}
	return states, unavailable, err
}

// auditNode audits the selected backends: iptables' nat tables as before, and the nftables
// side (portguard's table, upstream's cni_hostport rules) when it is in use or asked for,
// every owner judged by one liveness.Judge.
func auditNode(r iptables.Runner, ff *familyFlag, bf *backendFlag) (plan.AuditReport, error) {
	states, unavailable, err := observeIPT(r, ff, bf)
	if err != nil {
		return plan.AuditReport{}, err
	}
	j := liveness.New()
	var fas []plan.FamilyAudit
	for _, s := range states {
		fa := plan.Audit(s)
		fa.JudgeOwners(j)
		fas = append(fas, fa)
	}
	nfas, nftErr := auditNFT(fas, ff, bf, j)
	if nftErr != nil {
		return plan.AuditReport{}, nftErr
	}
	if len(states) == 0 && len(nfas) == 0 && bf.iptables() {
		return plan.AuditReport{}, envError{errors.New("neither iptables nor ip6tables is usable, and the node has no nftables host-port table")}
	}
	if len(states) == 0 && len(nfas) > 0 {
		unavailable = nil // a node without iptables: nothing to report about it
	}
	return plan.NewAuditReport(append(append(fas, unavailable...), nfas...)), nil
}

// selectedNFT observes the nftables side when bf selects it: nil (and no error) when it is
// not selected, or, unless --backend names it, when nf_tables does not answer (the node cannot
// have the backend) or neither portguard's nor upstream's tables are in use. The caller
// closes a side it gets.
func selectedNFT(bf *backendFlag) (*nftSide, error) {
	if !bf.nftables() {
		return nil, nil
	}
	side, err := observeNFT()
	if err != nil {
		if bf.explicit() {
			return nil, envError{fmt.Errorf("nftables: %w", err)}
		}
		return nil, nil
	}
	if !nftaudit.InUse(side.obs) && !bf.explicit() {
		side.Close()
		return nil, nil
	}
	return side, nil
}

// auditNFT is the nftables part of auditNode (ipt: the iptables families, for split claims).
func auditNFT(ipt []plan.FamilyAudit, ff *familyFlag, bf *backendFlag, j *liveness.Judge) ([]plan.FamilyAudit, error) {
	side, err := selectedNFT(bf)
	if side == nil || err != nil {
		return nil, err
	}
	defer side.Close()
	return filterFamilies(nftaudit.Audit(side.obs, ipt, j, knownOwners(j)), ff), nil
}

// nftLockTimeout is how long the nftables repair and export wait for portguard's lock.
var nftLockTimeout = 60 * time.Second
