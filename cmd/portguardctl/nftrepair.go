package main

import (
	"errors"
	"fmt"
	"io"

	iptb "github.com/portguard/portguard/pkg/backend/iptables"
	"github.com/portguard/portguard/pkg/backend/nftables"
	"github.com/portguard/portguard/pkg/config"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/nftaudit"
	"github.com/portguard/portguard/pkg/plan"
	"github.com/portguard/portguard/pkg/state"
)

// nftRepair is the nftables side of one repair: its observation and plan.
type nftRepair struct {
	side *nftSide
	plan nftaudit.RepairPlan
	ipt  []plan.FamilyAudit
}

// iptAudits are the iptables families' audits, for the split claims the nftables repair
// weighs (iptables claims are never changed by it).
func iptAudits(states []*state.State, j *liveness.Judge) []plan.FamilyAudit {
	var out []plan.FamilyAudit
	for _, s := range states {
		fa := plan.Audit(s)
		fa.JudgeOwners(j)
		out = append(out, fa)
	}
	return out
}

// planNFT observes the nftables side and plans its repair; nil when the backend is not
// selected, or (unless named by --backend) not in use or nf_tables does not answer.
func planNFT(bf *backendFlag, ipt []plan.FamilyAudit, keep map[hostport.Owner]bool, j *liveness.Judge, scope plan.RepairScope) (*nftRepair, error) {
	side, err := selectedNFT(bf)
	if side == nil || err != nil {
		return nil, err
	}
	p, err := nftaudit.PlanRepair(side.tx, side.obs, ipt, keep, j, knownOwners(j), scope)
	if err != nil {
		side.Close()
		return nil, usageError{err.Error()}
	}
	return &nftRepair{side: side, plan: p, ipt: ipt}, nil
}

// dryRun prints the plan in nft syntax, each line with why.
func (n *nftRepair) dryRun(w io.Writer) {
	for _, s := range n.plan.Skipped {
		fmt.Fprintf(w, "# nftables: %s\n", s)
	}
	if n.plan.Empty() {
		fmt.Fprintln(w, "# nftables: nothing to repair")
		return
	}
	if len(n.plan.Actions) > 0 || n.plan.Layout {
		fmt.Fprintln(w, "# nftables: one netlink batch (all or nothing):")
		for _, a := range n.plan.Actions {
			fmt.Fprintln(w, a)
		}
	}
	for _, o := range iptOwners(n.plan.IPTables) {
		fmt.Fprintf(w, "# iptables: remove the attachment of stale owner %s (chain %s, both families), whose claim shadows the nftables side's\n", o, hostport.ChainName(o))
	}
}

// iptOwners are the owners of the iptables removals, each once.
func iptOwners(rs []plan.RepairRemoval) []hostport.Owner {
	var out []hostport.Owner
	seen := map[hostport.Owner]bool{}
	for _, r := range rs {
		if !seen[r.Owner] {
			seen[r.Owner] = true
			out = append(out, r.Owner)
		}
	}
	return out
}

// removeIPTables removes each stale owner's whole iptables attachment through the iptables
// backend, as the DEL of a dead attachment does (its chain and jumps, both families).
func (n *nftRepair) removeIPTables(r iptables.Runner, stdout, stderr, logw io.Writer) error {
	if len(n.plan.IPTables) == 0 {
		return nil
	}
	b := iptb.New(r)
	for _, o := range iptOwners(n.plan.IPTables) {
		slow, err := b.Del(&config.Config{Network: o.Network}, o)
		if err == nil && len(slow) > 0 {
			err = b.DelRest(o, slow)
		}
		if err != nil {
			return envError{fmt.Errorf("iptables: remove the attachment of %s: %w", o, err)}
		}
		fmt.Fprintf(stdout, "iptables: removed the attachment of stale owner %s (chain %s)\n", o, hostport.ChainName(o))
		for _, rm := range n.plan.IPTables {
			if rm.Owner == o {
				logRemoval(rm, stderr, logw)
			}
		}
	}
	return nil
}

// apply rewrites the layout when needed, then commits the plan as one batch. A layout
// rewrite, or a writer that commits in between, moves the ruleset's generation: the side is
// then observed and planned again (same keep, judge and scope), at most maxNFTRounds times.
func (n *nftRepair) apply(r iptables.Runner, stdout, stderr, logw io.Writer, keep map[hostport.Owner]bool, j *liveness.Judge, scope plan.RepairScope) error {
	const maxNFTRounds = 5
	var last error
	for range maxNFTRounds {
		for _, s := range n.plan.Skipped {
			fmt.Fprintf(stdout, "nftables: %s\n", s)
		}
		if n.plan.Empty() {
			fmt.Fprintln(stdout, "nftables: nothing to repair")
			return nil
		}
		if n.plan.Layout {
			if _, err := n.side.t.Ensure(); err != nil {
				return envError{fmt.Errorf("nftables: rewrite the layout: %w", err)}
			}
			fmt.Fprintf(stdout, "nftables: layout of inet %s rewritten\n", nftables.TableName)
			if err := n.replan(keep, j, scope); err != nil {
				return err
			}
			continue
		}
		err := n.side.tx.Commit()
		if err == nil {
			for _, a := range n.plan.Actions {
				fmt.Fprintln(stdout, a)
			}
			for _, rm := range n.plan.Removals {
				logRemoval(rm, stderr, logw)
			}
			if len(n.plan.Actions) > 0 {
				fmt.Fprintf(stdout, "nftables: repaired with one netlink batch (%d changes)\n", len(n.plan.Actions))
			}
			return n.removeIPTables(r, stdout, stderr, logw)
		}
		if !errors.Is(err, nftables.ErrChanged) && !errors.Is(err, nftables.ErrGone) {
			return envError{fmt.Errorf("nftables: %w (nothing of the nftables repair was applied)", err)}
		}
		last = err
		if err := n.replan(keep, j, scope); err != nil {
			return err
		}
	}
	return envError{fmt.Errorf("nftables: the ruleset kept changing after %d rounds: %w", maxNFTRounds, last)}
}

func (n *nftRepair) replan(keep map[hostport.Owner]bool, j *liveness.Judge, scope plan.RepairScope) error {
	tx, o, err := n.side.t.Observe()
	if err != nil {
		return envError{fmt.Errorf("nftables: %w", err)}
	}
	p, err := nftaudit.PlanRepair(tx, o, n.ipt, keep, j, knownOwners(j), scope)
	if err != nil {
		return usageError{err.Error()}
	}
	n.side.tx, n.side.obs, n.plan = tx, o, p
	return nil
}
