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

	"github.com/portguard/portguard/pkg/backend/nftables"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/metrics"
	"github.com/portguard/portguard/pkg/plan"
	"github.com/portguard/portguard/pkg/state"
)

const auditHelp = `Usage: portguardctl audit [-o text|json|prometheus [--textfile PATH]] [--family 4|6|all] [--backend iptables|nftables|all]

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

With the nftables backend (portguard's table inet portguard, or upstream portmap's tables
ip/ip6 cni_hostport on the node), it also lists every claim there, in the order the kernel
looks them up (upstream's rules first: their hook runs at -100, portguard's at -99), with
its owner's state, and reports (backend "nftables"):
  split-claim          a port claimed in portguard's table and in iptables CNI chains or
                       upstream's cni_hostport rules: the earlier hook gets every packet
  shadowed-claim       an upstream rule behind an earlier one on the same port
  stale-upstream-rule  an upstream rule whose owner is gone
  layout-damaged       portguard's maps or base chains differ from its layout
  orphan-gate, orphan-masquerade, orphan-chain
                       conditions gates, masquerade entries or conditions chains left
                       without their claim
  address-reused       as above
--backend all (default) audits iptables when it works and nftables when its tables exist.

Output: -o text (default; "table" is its former name, accepted for one release), -o json
(shape in docs/audit-json.md), -o prometheus (node-exporter textfile metrics; names in
docs/cli.md); with --textfile PATH the metrics go to PATH,
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

// errNoIPTables: no family's iptables is usable (a node of the nftables backend may have none).
var errNoIPTables = errors.New("neither iptables nor ip6tables is usable")

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
		return nil, nil, envError{fmt.Errorf("%w: %s", errNoIPTables, unavailable[0].Error)}
	}
	return states, unavailable, nil
}

func cmdAudit(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("audit", auditHelp, stdout)
	var ff familyFlag
	var bf backendFlag
	output := fs.String("o", "text", "output format: "+formatList(textJSONOrPrometheus))
	fs.Var(&ff, "family", "address family: 4, 6 or all")
	textfile := fs.String("textfile", "", "with -o prometheus: write the metrics to this file atomically (temporary file in its directory, then rename) instead of stdout")
	fs.Var(&bf, "backend", "iptables, nftables or all (all: iptables when usable, nftables when its tables exist)")
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
	rep, err := auditNode(newRunner(10*time.Second), &ff, &bf)
	if err != nil {
		return err
	}
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
	var ipt, nft []plan.FamilyAudit
	for _, fa := range rep.Families {
		if fa.Backend == plan.BackendNFTables {
			nft = append(nft, fa)
		} else {
			ipt = append(ipt, fa)
		}
	}
	if len(ipt) > 0 || len(nft) == 0 {
		if err := claimsTable(w, ipt); err != nil {
			return err
		}
	}
	if len(nft) > 0 {
		if len(ipt) > 0 {
			fmt.Fprintln(w)
		}
		fmt.Fprintf(w, "nftables (inet %s, upstream ip/ip6 %s), in the order the kernel looks claims up:\n", nftables.TableName, nftables.UpstreamTable)
		if err := claimsTable(w, nft); err != nil {
			return err
		}
	}
	fmt.Fprintln(w)
	var problems int
	for _, fa := range rep.Families {
		problems += len(fa.Problems)
	}
	for _, fa := range rep.Families {
		if !fa.Available {
			fmt.Fprintf(w, "%s: not audited: %s\n", familyText(fa), fa.Error)
		}
	}
	if problems == 0 {
		var parts []string
		for _, fa := range rep.Families {
			if !fa.Available {
				continue
			}
			if fa.Backend == plan.BackendNFTables {
				parts = append(parts, fmt.Sprintf("%s: %d claims on %d host ports", familyText(fa), fa.Summary.Claims, fa.Summary.HostPorts))
				continue
			}
			parts = append(parts, fmt.Sprintf("%s: %d claims on %d host ports in %d chains", fa.Family, fa.Summary.Claims, fa.Summary.HostPorts, fa.Summary.Chains))
		}
		fmt.Fprintf(w, "Healthy: %s.\n", strings.Join(parts, "; "))
		return nil
	}
	fmt.Fprintf(w, "PROBLEMS (%d)\n", problems)
	for _, fa := range rep.Families {
		for _, p := range fa.Problems {
			fmt.Fprintf(w, "%s  %s  %s\n", familyText(fa), p.Kind, p.Message)
			fmt.Fprintf(w, "      fix: %s\n", p.Fix)
		}
	}
	return nil
}

// familyText names a family audit: "ipv4" for iptables (as always), "ipv4 nftables".
func familyText(fa plan.FamilyAudit) string {
	if fa.Backend == plan.BackendNFTables {
		return fa.Family.String() + " nftables"
	}
	return fa.Family.String()
}

// claimsTable prints every claim of the families, one row each.
func claimsTable(w io.Writer, fas []plan.FamilyAudit) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "FAMILY\tPROTO\tHOST PORT\tRULE\tNETWORK\tCONTAINER\tDESTINATION\tCHAIN\tSTATUS\tOWNER")
	rows := 0
	for _, fa := range fas {
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
