package doctor

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"sort"

	"github.com/portguard/portguard/pkg/plan"
)

// NFT is what the nftables backend's checks need; the CLI wires the backend's probe and
// its audit (pkg/nftaudit) here, tests fakes.
type NFT struct {
	// Probe checks the kernel features of portguard's layout without changing the ruleset
	// (nftables.Probe).
	Probe func() error
	// Audit audits the nftables side, given the iptables families' audits (for claims split
	// across backends); inUse says the node has portguard's or upstream's nftables tables.
	Audit func(ipt []plan.FamilyAudit) (fas []plan.FamilyAudit, inUse bool, err error)
}

// Backends of a network's port-mapping plugin.
const (
	backendIPTables = "iptables"
	backendNFTables = "nftables"
)

// RunNFT adds the nftables backend's checks to a report of Run:
//
//	net-backend  per conflist in ConfDir, which backend its port-mapping plugin uses: the
//	             "backend" it sets, or with none the one portguard and upstream pick (nftables
//	             when no iptables binary works and nf_tables does, iptables otherwise)
//	nftables     whether the kernel has what portguard's layout needs (a probe batch the
//	             kernel refuses by design, so nothing changes); an error when a network uses
//	             the nftables backend, a warning otherwise
//	audit        the nftables side's audit: every problem, claims split across backends
//	             included
//
// When every port-mapping network uses nftables, iptables being unusable is no error.
func RunNFT(env Env, n NFT, rep *Report) {
	d := &doc{env: env}
	probeErr := n.Probe()
	_, iptErr := env.Command("iptables", "-V")
	defaultBackend := backendIPTables
	if iptErr != nil && probeErr == nil {
		defaultBackend = backendNFTables
	}
	nets := d.networkBackends(defaultBackend)
	nftUsed, iptUsed := false, false
	for _, b := range nets {
		nftUsed = nftUsed || b == backendNFTables
		iptUsed = iptUsed || b == backendIPTables
	}
	if probeErr != nil {
		sev := Warning
		why := "the nftables backend cannot work on this kernel (no network uses it now)"
		if nftUsed {
			sev, why = Error, "every ADD of a network with the nftables backend fails, so its pods get no host port"
		}
		d.add("nftables", sev, fmt.Sprintf("nf_tables lacks what portguard's table needs: %v", probeErr), why,
			"use a kernel with nf_tables, nft_chain_nat, nft_nat, nft_fib_inet, nft_ct, nft_masq and concatenated/interval set support (Linux 5.6 or later), or \"backend\": \"iptables\"")
	} else {
		d.add("nftables", OK, "nf_tables has every feature of portguard's layout (probed with a batch the kernel refused as designed: nothing was changed)", "", "")
	}
	if nftUsed && !iptUsed {
		// iptables is not needed on this node: its absence is not an error.
		for i := range rep.Findings {
			if rep.Findings[i].Check == "iptables" && rep.Findings[i].Severity == Error {
				rep.Findings[i].Severity = Warning
				rep.Findings[i].Why = "no network uses the iptables backend here, so nothing depends on it"
			}
		}
	}
	var ipt []plan.FamilyAudit
	for _, fa := range rep.Audit.Families {
		if fa.Backend != plan.BackendNFTables {
			ipt = append(ipt, fa)
		}
	}
	if probeErr == nil || nftUsed {
		fas, inUse, err := n.Audit(ipt)
		switch {
		case err != nil:
			sev := Warning
			if nftUsed {
				sev = Error
			}
			d.add("audit", sev, fmt.Sprintf("nftables: cannot read the ruleset: %v", err), "nothing about the nftables backend's host ports can be checked", "run as root")
		case inUse || nftUsed:
			rep.Audit = plan.NewAuditReport(append(append([]plan.FamilyAudit(nil), rep.Audit.Families...), fas...))
			for _, fa := range fas {
				if len(fa.Problems) == 0 {
					d.add("audit", OK, fmt.Sprintf("%s nftables: %d claims on %d host ports, no problem", fa.Family, fa.Summary.Claims, fa.Summary.HostPorts), "", "")
				}
				for _, p := range fa.Problems {
					d.add("audit", Error, fmt.Sprintf("%s nftables: %s: %s", fa.Family, p.Kind, p.Message), whyOfNFT(p.Kind), p.Fix)
				}
			}
		}
	}
	rep.Findings = append(rep.Findings, d.findings...)
}

// networkBackends reports, for every conflist of ConfDir that chains a port-mapping
// plugin, its backend, and returns them by file.
func (d *doc) networkBackends(defaultBackend string) map[string]string {
	out := map[string]string{}
	entries, err := d.env.ReadDir(d.env.ConfDir)
	if err != nil {
		return out
	}
	var files []string
	for _, e := range entries {
		for _, ext := range ConfExtensions {
			if !e.IsDir() && filepath.Ext(e.Name()) == ext {
				files = append(files, e.Name())
			}
		}
	}
	sort.Strings(files)
	for _, name := range files {
		path := filepath.Join(d.env.ConfDir, name)
		data, err := d.env.ReadFile(path)
		if err != nil {
			continue
		}
		var raw struct {
			Name    string           `json:"name"`
			Type    string           `json:"type"`
			Backend *string          `json:"backend"`
			Plugins []map[string]any `json:"plugins"`
		}
		if json.Unmarshal(data, &raw) != nil {
			continue
		}
		plugins := raw.Plugins
		if filepath.Ext(name) != ".conflist" {
			p := map[string]any{"type": raw.Type}
			if raw.Backend != nil {
				p["backend"] = *raw.Backend
			}
			plugins = []map[string]any{p}
		}
		for _, p := range plugins {
			typ, _ := p["type"].(string)
			if !PortPlugins[typ] {
				continue
			}
			b, set := p["backend"].(string)
			how := "set in the config"
			if !set || b == "" {
				b, how = defaultBackend, "unset: iptables when it works, else nftables"
			}
			out[path] = b
			d.add("net-backend", OK, fmt.Sprintf("network %q (%s): %s uses the %s backend (%s)", raw.Name, path, typ, b, how), "", "")
			break
		}
	}
	return out
}

func whyOfNFT(kind string) string {
	switch kind {
	case plan.KindSplitClaim:
		return "the port is claimed in two backends; the one whose nat hook runs first (iptables and upstream's cni_hostport at -100, portguard's table at -99) gets every packet"
	case plan.KindStaleUpstreamRule:
		return "upstream portmap's rule outlived its pod: it takes the port (or masquerades the address) for nobody"
	case plan.KindLayoutDamaged:
		return "portguard's base chains or maps differ from its layout, so claims may not be forwarded or masqueraded"
	case plan.KindOrphanGate, plan.KindOrphanMasquerade, plan.KindOrphanChain:
		return "a leftover of a removed claim; a later claim of the port or address inherits it"
	}
	return whyOf(kind)
}
