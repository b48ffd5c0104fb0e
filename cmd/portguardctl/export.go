package main

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/portguard/portguard/pkg/backend"
	iptb "github.com/portguard/portguard/pkg/backend/iptables"
	"github.com/portguard/portguard/pkg/backend/nftables"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/lock"
	"github.com/portguard/portguard/pkg/nftexport"
)

const exportHelp = `Usage: portguardctl export --to portmap-nftables|portmap-iptables [--dry-run]

Writes every claim of portguard's nftables table (inet portguard) in upstream portmap's
format, then deletes portguard's table: the way back to upstream's plugin (downgrade).
Upstream's own CHECK and DEL then find the exported claims, as if its ADD had written them.

  --to portmap-nftables  upstream's nftables backend: tables ip/ip6 cni_hostport, one rule
                         per mapping in chain hostports, masquerade rules per pod, each
                         commented with the container ID. Written together with the
                         deletion of portguard's table in ONE netlink batch, so no port is
                         unclaimed at any moment (no nft binary needed).
  --to portmap-iptables  upstream's iptables backend: CNI-HOSTPORT-DNAT jumps and
                         CNI-DN-<hash> chains with upstream's names and hash (written by
                         portguard's iptables backend, whose layout is upstream's), then
                         portguard's table is deleted. iptables' nat runs before portguard's
                         table, so traffic moves to the new rules as each lands.

What upstream cannot hold is refused before anything changes: claims with conditions
(upstream's conditionsV4/V6 apply to its whole table), owners portguard cannot name
(element comments that are hashes of owners it has no record of), and ports another
container already claims in the target format (run portguardctl repair first).
Differences to know: upstream masquerades hairpin traffic only from the pod itself (not
its subnet); its DEL matches the container ID in every network.

--dry-run prints the batch as an nft script (portmap-nftables) or the attachments and their configs
(portmap-iptables) and changes nothing. Runs under portguard's host-wide lock.

Exit status: 0 exported, 2 usage or environment error (nothing changed).

Examples:
  portguardctl export --to portmap-nftables --dry-run
  portguardctl export --to portmap-nftables && cp portmap.orig /opt/cni/bin/portmap
`

func cmdExport(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("export", exportHelp, stdout)
	to := fs.String("to", "", "target format: portmap-nftables or portmap-iptables")
	dry := fs.Bool("dry-run", false, "print what would be written, change nothing")
	timeout := fs.Duration("lock-timeout", 60*time.Second, "how long to wait for the portguard lock")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *to != "portmap-nftables" && *to != "portmap-iptables" {
		return usageError{fmt.Sprintf("--to %q: must be portmap-nftables or portmap-iptables", *to)}
	}
	if !*dry {
		l, err := lock.Acquire(lock.Path(), lock.Exclusive, *timeout)
		if err != nil {
			return envError{err}
		}
		defer l.Release()
	}
	side, err := observeNFT()
	if err != nil {
		return envError{fmt.Errorf("nftables: %w", err)}
	}
	defer side.Close()
	if !side.obs.Table {
		return envError{fmt.Errorf("no table inet %s here: nothing to export", nftables.TableName)}
	}
	j := liveness.New()
	atts, err := nftexport.Attachments(side.obs, knownOwners(j))
	if err != nil {
		return envError{err}
	}
	if *to == "portmap-nftables" {
		p, err := nftexport.PlanUpstream(atts, side.obs)
		if err != nil {
			return envError{err}
		}
		if *dry {
			fmt.Fprintf(stdout, "# one netlink batch (all or nothing), as nft syntax: %d attachments\n", len(atts))
			fmt.Fprint(stdout, p.Script())
			return nil
		}
		if err := p.Apply(); err != nil {
			return envError{err}
		}
		for _, a := range atts {
			fmt.Fprintf(stdout, "exported %s: %d mappings\n", a.Owner, len(a.Mappings))
		}
		fmt.Fprintf(stdout, "wrote upstream's ip/ip6 %s rules and deleted table inet %s in one transaction\n", nftables.UpstreamTable, nftables.TableName)
		return nil
	}
	return exportIPTables(atts, *dry, *timeout, stdout)
}

// exportIPTables writes each attachment with portguard's iptables backend (upstream's
// layout) and refuses any takeover: a port already claimed in iptables stops the export
// before that attachment (the ones written before stay; their claims are in both places,
// iptables' winning, until the table goes).
func exportIPTables(atts []nftexport.Attachment, dry bool, timeout time.Duration, stdout io.Writer) error {
	if dry {
		for _, a := range atts {
			c := nftexport.IPTablesConfig(a)
			var ms []string
			for _, m := range c.Mappings {
				h := ""
				if m.HostIP.IsValid() {
					h = m.HostIP.String() + ":"
				}
				ms = append(ms, fmt.Sprintf("%s/%s%d->%d", m.Proto, h, m.HostPort, m.ContainerPort))
			}
			fmt.Fprintf(stdout, "# %s: chain %s, mappings %s, pod addresses %v, snat %v, masqAll %v\n",
				a.Owner, chainName(a), strings.Join(ms, " "), c.PodIPs, c.SNAT, c.MasqAll)
		}
		fmt.Fprintf(stdout, "# then: delete table inet %s\n", nftables.TableName)
		return nil
	}
	b := iptb.New(newRunner(timeout))
	refuse := backend.Hooks{Decide: func(ts []backend.Takeover, cs []backend.Conflict) error {
		if len(cs) > 0 {
			return fmt.Errorf("%s is already claimed in iptables by %s (%s): run portguardctl repair first", cs[0].Claim, cs[0].Owner, cs[0].Chain)
		}
		return nil
	}}
	for _, a := range atts {
		if _, err := b.Add(nftexport.IPTablesConfig(a), a.Owner, false, refuse); err != nil {
			return envError{fmt.Errorf("export of %s: %w (portguard's table is kept)", a.Owner, err)}
		}
		fmt.Fprintf(stdout, "exported %s: chain %s\n", a.Owner, chainName(a))
	}
	t, err := nftables.Open()
	if err != nil {
		return envError{err}
	}
	defer t.Close()
	if err := t.Drop(); err != nil {
		return envError{fmt.Errorf("delete table inet %s: %w (the claims are in iptables now; delete it by hand)", nftables.TableName, err)}
	}
	fmt.Fprintf(stdout, "deleted table inet %s\n", nftables.TableName)
	return nil
}

func chainName(a nftexport.Attachment) string { return hostport.ChainName(a.Owner) }
