package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/metrics"
	"github.com/portguard/portguard/pkg/plan"
	"github.com/portguard/portguard/pkg/state"
)

const auditHelp = `Usage: portguardctl audit [-o text|json|prometheus [--textfile PATH]] [--family 4|6|all]

Reads each family's nat table once (iptables-save -t nat) and reports, per host port, every
claim in CNI-HOSTPORT-DNAT order (network, container ID, pod IP:port, chain), which one
receives the traffic, and whether its owner is alive, stale or unknown (a record of the
attachment in portguard's records or the libcni cache names a netns that exists, a process
lives in it and its interface holds the destination), then every problem with its fix:
  shadowed-claim      an earlier conflicting claim wins; this pod never gets the port
  duplicate-jump      the same jump twice in CNI-HOSTPORT-DNAT
  orphan-chain        a CNI-DN chain no jump enters (leaked by a DEL)
  port-mismatch       a jump's ports and its chain's DNAT ports disagree
  address-reused      a claim whose owner is gone forwards to an address a live pod now holds
  missing-entry-jump  PREROUTING/OUTPUT do not enter CNI-HOSTPORT-DNAT
  missing-setmark, missing-masq, missing-masq-jump
                      chains mark packets for masquerade but the mark/masquerade is gone

Output: -o text (default; "table" is its former name, accepted for one release), -o json
(shape in docs/audit-json.md), -o prometheus (node-exporter textfile metrics; names in
docs/cli.md, label backend="iptables"); with --textfile PATH the metrics go to PATH,
written atomically (a temporary file in PATH's directory renamed over it), for
node-exporter's textfile collector.

Exit status: 0 healthy, 1 problems found, 2 usage or environment error. With -o prometheus:
0 whenever the nat tables could be read, problems or not (they are in the metrics:
portguard_problems, portguard_audit_healthy), 2 when collection failed.

Examples:
  portguardctl audit
  portguardctl audit --family 4 -o json
  ip netns exec node1 portguardctl audit -o prometheus
  portguardctl audit -o prometheus --textfile /var/lib/node_exporter/textfile/portguard.prom
`

// observeAll reads every selected family once. A family whose iptables is unusable is
// reported as unavailable, unless it was asked for explicitly or none is usable.
func observeAll(r iptables.Runner, ff *familyFlag) ([]*state.State, []plan.FamilyAudit, error) {
	var states []*state.State
	var unavailable []plan.FamilyAudit
	for _, f := range ff.families() {
		s, err := state.ObserveAll(r, f)
		if err != nil {
			if errors.Is(err, iptables.ErrUnavailable) && !ff.explicit() {
				unavailable = append(unavailable, plan.UnavailableAudit(f, err))
				continue
			}
			return nil, nil, envError{fmt.Errorf("%s: %w", f, err)}
		}
		states = append(states, s)
	}
	if len(states) == 0 {
		return nil, nil, envError{errors.New("neither iptables nor ip6tables is usable: " + unavailable[0].Error)}
	}
	return states, unavailable, nil
}

// auditStates audits each state and judges every claim's owner (pkg/liveness: portguard's
// records, the libcni cache, namespaces, processes, addresses).
func auditStates(states []*state.State, unavailable []plan.FamilyAudit) plan.AuditReport {
	var fas []plan.FamilyAudit
	j := liveness.New()
	for _, s := range states {
		fa := plan.Audit(s)
		fa.JudgeOwners(j)
		fas = append(fas, fa)
	}
	return plan.NewAuditReport(append(fas, unavailable...))
}

func cmdAudit(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("audit", auditHelp, stdout)
	var ff familyFlag
	output := fs.String("o", "text", "output format: "+formatList(textJSONOrPrometheus))
	fs.Var(&ff, "family", "address family: 4, 6 or all")
	textfile := fs.String("textfile", "", "with -o prometheus: write the metrics to this file atomically (temporary file in its directory, then rename) instead of stdout")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *output == "table" { // deprecated alias of text, for one release
		*output = "text"
	}
	if err := checkFormat(*output, textJSONOrPrometheus); err != nil {
		return err
	}
	if *textfile != "" && *output != "prometheus" {
		return usageError{"--textfile needs -o prometheus"}
	}
	render := map[string]func(io.Writer, plan.AuditReport) error{
		"text": renderTable, "json": renderJSON, "prometheus": renderPrometheus,
	}[*output]
	states, unavailable, err := observeAll(newRunner(10*time.Second), &ff)
	if err != nil {
		return err
	}
	rep := auditStates(states, unavailable)
	if *textfile != "" {
		if err := metrics.WriteTextfile(*textfile, auditRegistry(rep)); err != nil {
			return envError{fmt.Errorf("--textfile: %w", err)}
		}
		return nil
	}
	if err := render(stdout, rep); err != nil {
		return envError{err}
	}
	// An exporter reports what it found and exits 0 once it could collect; the problems are
	// in the metrics. Collection errors returned above (exit 2).
	if !rep.Healthy && *output != "prometheus" {
		return exitError(exitProblems)
	}
	return nil
}

func renderJSON(w io.Writer, rep plan.AuditReport) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(rep)
}

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	if id == "" {
		return "-"
	}
	return id
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func renderTable(w io.Writer, rep plan.AuditReport) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "FAMILY\tPROTO\tHOST PORT\tRULE\tNETWORK\tCONTAINER\tDESTINATION\tCHAIN\tSTATUS\tOWNER")
	rows := 0
	for _, fa := range rep.Families {
		for _, pc := range fa.Ports {
			for _, c := range pc.Claims {
				host := "*"
				if c.HostIP != "" {
					host = c.HostIP
				}
				status := c.Status
				if c.Status == plan.StatusShadowed {
					status = "shadowed by " + c.ShadowedBy
				}
				owner := dash(c.OwnerState)
				if c.Evidence != nil && c.Evidence.PID != 0 {
					owner += fmt.Sprintf(" (pid %d)", c.Evidence.PID)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\n", fa.Family, pc.Protocol,
					fmt.Sprintf("%s:%d", host, pc.HostPort), c.Position, dash(c.Network), shortID(c.ContainerID),
					dash(c.Destination), c.Chain, status, owner)
				rows++
			}
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if rows == 0 {
		fmt.Fprintln(w, "(no host-port claims)")
	}
	fmt.Fprintln(w)
	var problems int
	for _, fa := range rep.Families {
		problems += len(fa.Problems)
	}
	for _, fa := range rep.Families {
		if !fa.Available {
			fmt.Fprintf(w, "%s: not audited: %s\n", fa.Family, fa.Error)
		}
	}
	if problems == 0 {
		var parts []string
		for _, fa := range rep.Families {
			if fa.Available {
				parts = append(parts, fmt.Sprintf("%s: %d claims on %d host ports in %d chains", fa.Family, fa.Summary.Claims, fa.Summary.HostPorts, fa.Summary.Chains))
			}
		}
		fmt.Fprintf(w, "Healthy: %s.\n", strings.Join(parts, "; "))
		return nil
	}
	fmt.Fprintf(w, "PROBLEMS (%d)\n", problems)
	for _, fa := range rep.Families {
		for _, p := range fa.Problems {
			fmt.Fprintf(w, "%s  %s  %s\n", fa.Family, p.Kind, p.Message)
			fmt.Fprintf(w, "      fix: %s\n", p.Fix)
		}
	}
	return nil
}

// renderPrometheus writes the audit's metrics (pkg/metrics: the agent's collector) in the
// Prometheus text format, one sample per family and backend.
func renderPrometheus(w io.Writer, rep plan.AuditReport) error {
	return metrics.WriteText(w, auditRegistry(rep))
}

func auditRegistry(rep plan.AuditReport) *prometheus.Registry {
	c := metrics.NewAuditCollector()
	c.Set(metrics.FromReport(rep), time.Now())
	return metrics.Registry(c)
}
