package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	iptbackend "github.com/portguard/portguard/pkg/backend/iptables"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/lock"
	"github.com/portguard/portguard/pkg/plan"
	"github.com/portguard/portguard/pkg/state"
)

const repairHelp = `Usage: portguardctl repair [--dry-run] [--keep NETWORK/CONTAINERID ...] [--port PROTO/PORT]
                         [--owner NETWORK/CONTAINERID] [--log-file PATH] [--family 4|6|all]
                         [--backend iptables|nftables|all]

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

nftables backend (when its tables are on the node, or --backend nftables): one netlink
batch, all or nothing, that removes only what audit reports there, never a live owner's
claim: a contested port keeps the --keep owner's claim, else a live (or unjudgeable)
owner's, else portguard's element, else upstream's last rule; two live claimants are left
alone. Upstream cni_hostport rules of dead owners (and their masquerade rules) are deleted
rule by rule; their chains and tables stay, and no other table (kube-proxy's, yours) is
ever written. Masquerade entries, gates and conditions chains left without a claim go; a
damaged layout is rewritten first (a batch of its own that never touches elements).
An iptables claim that loses a split port to it is removed only when its owner is stale:
the owner's whole iptables attachment goes, as its DEL would (iptables backend, after the
batch). --dry-run prints the batch in nft syntax.

--port PROTO/PORT and --owner NETWORK/CONTAINERID narrow the repair to the problems
involving that host port or that owner (both given: involving both). Which claim keeps a
contested port is still decided over the whole table; everything else is reported as
"left alone" and stays, so the audit after a narrowed repair may still find problems
(exit 1). Shared rules (entry jumps, SETMARK/MASQ) involve no one port or owner: a
narrowed repair reports them and leaves them.

Every removal is logged as one JSON line on stderr, like the plugin's takeover events:
  {"event":"repair","repair":{"family","owner","chain","claims","destinations",
   "chainRemoved","rule","reasons","keptFor","ownerState","evidence"},"time":...}
and appended to --log-file PATH when given (reasons are audit problem kinds; ownerState
and evidence are the owner's liveness judgement). --dry-run logs nothing.

--dry-run prints the exact iptables-restore payloads (with # comments saying what each
family's payload does) and changes nothing; pipe one family's payload into
"iptables-restore --noflush" to apply it by hand.

Exit status: 0 healthy afterwards, 1 problems left, 2 usage or environment error.

Examples:
  portguardctl repair --dry-run
  portguardctl repair
  portguardctl repair --keep cbr0/9f86d081884c7d65 --family 4
  portguardctl repair --port tcp/8080 --log-file /var/log/portguard-repair.log
  portguardctl repair --owner cbr0/9f86d081884c7d65 --dry-run
`

func parseOwner(s string) (hostport.Owner, error) { return parseOwnerFlag("--keep", s) }

func parseOwnerFlag(flag, s string) (hostport.Owner, error) {
	net, id, ok := strings.Cut(s, "/")
	if !ok || !hostport.ValidNetworkName(net) || !hostport.ValidContainerID(id) {
		return hostport.Owner{}, fmt.Errorf("%s %q: want NETWORK/CONTAINERID (as in the rule comment dnat name: \"NETWORK\" id: \"CONTAINERID\")", flag, s)
	}
	return hostport.Owner{Network: net, ContainerID: id}, nil
}

func cmdRepair(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("repair", repairHelp, stdout)
	var ff familyFlag
	var bf backendFlag
	var keeps listFlag
	dry := fs.Bool("dry-run", false, "print the iptables-restore payloads (and the nftables changes), change nothing")
	fs.Var(&bf, "backend", "iptables, nftables or all (all: iptables when usable, nftables when its tables exist)")
	fs.Var(&keeps, "keep", "NETWORK/CONTAINERID whose claims win contested ports (repeatable)")
	fs.Var(&ff, "family", "address family: 4, 6 or all")
	timeout := fs.Duration("lock-timeout", 60*time.Second, "how long to wait for the portguard and xtables locks")
	port := fs.String("port", "", "PROTO/PORT: fix only problems involving this host port (e.g. tcp/8080)")
	ownerArg := fs.String("owner", "", "NETWORK/CONTAINERID: fix only problems involving this owner")
	logFile := fs.String("log-file", "", "append one JSON line per removal to this file (also written to stderr)")
	if err := parse(fs, args); err != nil {
		return err
	}
	var scope plan.RepairScope
	if *port != "" {
		p, n, err := plan.ParsePortScope(*port)
		if err != nil {
			return usageError{err.Error()}
		}
		scope.Proto, scope.Port = p, n
	}
	if *ownerArg != "" {
		o, err := parseOwnerFlag("--owner", *ownerArg)
		if err != nil {
			return usageError{err.Error()}
		}
		scope.Owner = o
	}
	var logw io.Writer
	if *logFile != "" && !*dry {
		// Opened before anything changes: a log that cannot be written stops the repair.
		f, err := os.OpenFile(*logFile, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err != nil {
			return envError{fmt.Errorf("--log-file: %w", err)}
		}
		defer f.Close()
		logw = f
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
		// Through the iptables backend, so the iptables-restore child inherits the lock: a repair
		// killed mid-payload keeps the lock held until the payload has landed.
		l, err := iptbackend.Hold(r, lock.Path(), lock.Exclusive, *timeout)
		if err != nil {
			return envError{err}
		}
		defer l.Release()
	}
	states, unavailable, err := observeIPT(r, &ff, &bf)
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
	ownerSeen := false
	for _, s := range states {
		res, err := plan.RepairScoped(s, keep, judge, scope)
		if err != nil {
			return usageError{err.Error()}
		}
		ownerSeen = ownerSeen || res.ScopeOwnerSeen
		for _, o := range res.UnknownKeep {
			unknown[o]++
		}
		plans = append(plans, planned{s, res})
	}
	nrep, err := planNFT(&bf, iptAudits(states, judge), keep, judge, scope)
	if err != nil {
		return err
	}
	places := len(states)
	if nrep != nil {
		defer nrep.side.Close()
		places++
		ownerSeen = ownerSeen || nrep.plan.ScopeOwnerSeen
		for _, o := range nrep.plan.UnknownKeep {
			unknown[o]++
		}
	}
	if places == 0 {
		return envError{errors.New("neither iptables nor the nftables backend's tables are here: nothing to repair")}
	}
	for o, n := range unknown {
		if n == places {
			return usageError{fmt.Sprintf("--keep %s: no claim of that owner in the audited families (see portguardctl audit)", o)}
		}
	}
	if !scope.Owner.IsZero() && !ownerSeen {
		return usageError{fmt.Sprintf("--owner %s: no chain of that owner in the audited families (see portguardctl audit)", scope.Owner)}
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
		if nrep != nil {
			nrep.dryRun(stdout)
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
		if err := iptbackend.Apply(r, p.s.Family, p.res.Tx); err != nil {
			failed = append(failed, fmt.Errorf("%s: %w (nothing of this family's repair was applied)", p.s.Family, err))
			continue
		}
		for _, a := range p.res.Actions {
			fmt.Fprintln(stdout, a)
		}
		for _, rm := range p.res.Removals {
			logRemoval(rm, stderr, logw)
		}
		fmt.Fprintf(stdout, "%s: repaired with one %s (%d operations)\n", p.s.Family, restoreTool(p.s.Family), len(p.res.Tx.Ops))
	}
	if nrep != nil {
		if err := nrep.apply(r, stdout, stderr, logw, keep, judge, scope); err != nil {
			failed = append(failed, err)
		}
	}
	if len(failed) > 0 {
		return envError{errors.Join(failed...)}
	}

	// Audit again, still under the lock, so the verdict is about what repair left.
	rep, err := auditNode(r, &ff, &bf)
	if err != nil {
		return err
	}
	if rep.Healthy {
		fmt.Fprintln(stdout, "audit after repair: healthy")
		return nil
	}
	fmt.Fprintln(stdout, "audit after repair: problems left:")
	for _, fa := range rep.Families {
		for _, p := range fa.Problems {
			fmt.Fprintf(stdout, "%s  %s  %s\n      fix: %s\n", familyText(fa), p.Kind, p.Message, p.Fix)
		}
	}
	return exitError(exitProblems)
}

// logRemoval writes one removal as a JSON line, the shape of the plugin's takeover events
// ({"event":"repair","repair":{...},"time":RFC 3339 UTC}), to stderr and, when set, to log.
func logRemoval(rm plan.RepairRemoval, stderr, log io.Writer) {
	b, err := json.Marshal(map[string]any{"event": "repair", "repair": rm, "time": time.Now().UTC().Format(time.RFC3339Nano)})
	if err != nil {
		return
	}
	b = append(b, '\n')
	stderr.Write(b)
	if log != nil {
		if _, err := log.Write(b); err != nil {
			fmt.Fprintf(stderr, "portguardctl repair: --log-file: %v\n", err)
		}
	}
}

func restoreTool(f hostport.Family) string {
	if f == hostport.V6 {
		return "ip6tables-restore"
	}
	return "iptables-restore"
}

// apply renders and applies one transaction; a refused payload is explained by the
// purpose of the line that failed.
