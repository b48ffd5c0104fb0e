package main

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/portguard/portguard/pkg/engine"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/lock"
	"github.com/portguard/portguard/pkg/plan"
	"github.com/portguard/portguard/pkg/state"
)

const repairHelp = `Usage: portguardctl repair [--dry-run] [--keep NETWORK/CONTAINERID ...] [--family 4|6|all]

Fixes what "portguardctl audit" reports, with one iptables-restore --noflush per family,
under the same host-wide lock as the plugin (` + "`$PORTGUARD_LOCK_FILE`" + `, default /run/portguard.lock):
  - a contested host port keeps ONE claim: the one of the owner named by --keep, otherwise
    the last added one, taken to be the LAST jump in CNI-HOSTPORT-DNAT (upstream portmap
    appends each new pod's jump, so there the first claim, the one traffic reaches today,
    is the stale one and the last is the live pod's). By default traffic therefore MOVES
    to the last claim. Under conflictPolicy allow portguard puts the newest jump first:
    name the claim to keep there. The other claims lose their conflicting DNAT and mark
    rules and jump ports (their whole chain when nothing else is left), exactly like the
    plugin's takeover on ADD. Check with --dry-run which claim is kept;
  - jump ports without a DNAT rule and DNAT rules without a jump port are removed;
  - repeated jumps and orphan CNI-DN chains are deleted;
  - missing PREROUTING/OUTPUT entry jumps, and SETMARK/MASQ with the POSTROUTING jump when
    chains mark packets, are restored.
Only CNI rules are written: KUBE-* chains and your own rules are never touched.
After the repair the nat tables are audited again; the exit status is the audit's.

--dry-run prints the exact iptables-restore payloads (with # comments saying what each
family's payload does) and changes nothing; pipe one family's payload into
"iptables-restore --noflush" to apply it by hand.

Exit status: 0 healthy afterwards, 1 problems left, 2 usage or environment error.

Examples:
  portguardctl repair --dry-run
  portguardctl repair
  portguardctl repair --keep cbr0/9f86d081884c7d65 --family 4
`

func parseOwner(s string) (hostport.Owner, error) {
	net, id, ok := strings.Cut(s, "/")
	if !ok || !hostport.ValidNetworkName(net) || !hostport.ValidContainerID(id) {
		return hostport.Owner{}, fmt.Errorf("--keep %q: want NETWORK/CONTAINERID (as in the rule comment dnat name: \"NETWORK\" id: \"CONTAINERID\")", s)
	}
	return hostport.Owner{Network: net, ContainerID: id}, nil
}

func cmdRepair(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("repair", repairHelp, stdout)
	var ff familyFlag
	var keeps listFlag
	dry := fs.Bool("dry-run", false, "print the iptables-restore payloads, change nothing")
	fs.Var(&keeps, "keep", "NETWORK/CONTAINERID whose claims win contested ports (repeatable)")
	fs.Var(&ff, "family", "address family: 4, 6 or all")
	timeout := fs.Duration("lock-timeout", 60*time.Second, "how long to wait for the portguard and xtables locks")
	if err := parse(fs, args); err != nil {
		return err
	}
	keep := map[hostport.Owner]bool{}
	for _, k := range keeps {
		o, err := parseOwner(k)
		if err != nil {
			return usageError{err.Error()}
		}
		keep[o] = true
	}
	r := newRunner(*timeout)
	if !*dry {
		// Through the engine, so the iptables-restore child inherits the lock: a repair
		// killed mid-payload keeps the lock held until the payload has landed.
		l, err := engine.Hold(r, lock.Path(), lock.Exclusive, *timeout)
		if err != nil {
			return envError{err}
		}
		defer l.Release()
	}
	states, unavailable, err := observeAll(r, &ff)
	if err != nil {
		return err
	}
	type planned struct {
		s   *state.State
		res plan.RepairResult
	}
	var plans []planned
	unknown := map[hostport.Owner]int{}
	judge := liveness.New()
	for _, s := range states {
		res, err := plan.Repair(s, keep, judge)
		if err != nil {
			return usageError{err.Error()}
		}
		for _, o := range res.UnknownKeep {
			unknown[o]++
		}
		plans = append(plans, planned{s, res})
	}
	for o, n := range unknown {
		if n == len(states) {
			return usageError{fmt.Sprintf("--keep %s: no claim of that owner in the audited families (see portguardctl audit)", o)}
		}
	}
	for _, fa := range unavailable {
		fmt.Fprintf(stderr, "portguardctl repair: %s skipped: %s\n", fa.Family, fa.Error)
	}

	if *dry {
		for _, p := range plans {
			for _, s := range p.res.Skipped {
				fmt.Fprintf(stdout, "# %s\n", s)
			}
			if !p.res.Tx.Changes() {
				fmt.Fprintf(stdout, "# %s: nothing to repair\n", p.s.Family)
				continue
			}
			payload, err := p.res.Tx.Render()
			if err != nil {
				return envError{err}
			}
			fmt.Fprintf(stdout, "# %s: payload for %s --noflush:\n", p.s.Family, restoreTool(p.s.Family))
			for _, a := range p.res.Actions {
				fmt.Fprintf(stdout, "#   %s\n", a)
			}
			fmt.Fprint(stdout, payload)
		}
		return nil
	}

	var failed []error
	for _, p := range plans {
		for _, s := range p.res.Skipped {
			fmt.Fprintf(stdout, "%s\n", s)
		}
		if !p.res.Tx.Changes() {
			fmt.Fprintf(stdout, "%s: nothing to repair\n", p.s.Family)
			continue
		}
		if err := engine.Apply(r, p.s.Family, p.res.Tx); err != nil {
			failed = append(failed, fmt.Errorf("%s: %w (nothing of this family's repair was applied)", p.s.Family, err))
			continue
		}
		for _, a := range p.res.Actions {
			fmt.Fprintln(stdout, a)
		}
		fmt.Fprintf(stdout, "%s: repaired with one %s (%d operations)\n", p.s.Family, restoreTool(p.s.Family), len(p.res.Tx.Ops))
	}
	if len(failed) > 0 {
		return envError{errors.Join(failed...)}
	}

	// Audit again, still under the lock, so the verdict is about what repair left.
	states, unavailable, err = observeAll(r, &ff)
	if err != nil {
		return err
	}
	rep := auditStates(states, unavailable)
	if rep.Healthy {
		fmt.Fprintln(stdout, "audit after repair: healthy")
		return nil
	}
	fmt.Fprintln(stdout, "audit after repair: problems left:")
	for _, fa := range rep.Families {
		for _, p := range fa.Problems {
			fmt.Fprintf(stdout, "%s  %s  %s\n      fix: %s\n", fa.Family, p.Kind, p.Message, p.Fix)
		}
	}
	return exitError(exitProblems)
}

func restoreTool(f hostport.Family) string {
	if f == hostport.V6 {
		return "ip6tables-restore"
	}
	return "iptables-restore"
}

// apply renders and applies one transaction; a refused payload is explained by the
// purpose of the line that failed.
