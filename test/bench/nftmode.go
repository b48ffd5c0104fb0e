package main

// -backend nftables: each plugin gets a node namespace of its own, `<scenario>-<i>`,
// loaded alike with the M iptables-nft kube-proxy rules and kube-proxy's nftables table,
// and N existing attachments in that plugin's own format (upstream iptables: CNI-DN chains;
// upstream nftables: rules of `ip cni_hostport`; portguard: elements of `inet portguard`),
// as on a node that has run that plugin all along. So a plugin never pays for another's
// attachments, and the plugins still run interleaved, in the same run.

import (
	"fmt"
	"net/netip"
	"os/exec"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/portguard/portguard/pkg/backend/nftables"
	"github.com/portguard/portguard/pkg/hostport"
)

const maxServices = 20000 // keeps ClusterIPs in 10.96.0.0/16 and NodePorts below 32768

// inNS returns a command running in node namespace name ("" the runner's own).
func inNS(name, cmd string, args ...string) *exec.Cmd {
	if name == "" {
		return exec.Command(cmd, args...)
	}
	return exec.Command("ip", append([]string{"netns", "exec", name, cmd}, args...)...)
}

func runIn(name, cmd string, args ...string) (string, error) {
	out, err := inNS(name, cmd, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %v: %s", cmd, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// nftLoad runs `nft -f -` with script in namespace name.
func nftLoad(name, script string) error {
	c := inNS(name, "nft", "-f", "-")
	c.Stdin = strings.NewReader(script)
	if out, err := c.CombinedOutput(); err != nil {
		return fmt.Errorf("nft -f: %v: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// setupPluginNode loads plugin p's node namespace (see the file comment) and returns the
// counts for the report.
func setupPluginNode(cfg scenarioConfig, p plugin) (foreign, cni, chains int, err error) {
	for _, args := range [][]string{
		{"link", "set", "lo", "up"},
		{"link", "add", "cni0", "type", "bridge"},
		{"addr", "add", "10.244.0.1/16", "dev", "cni0"},
		{"link", "set", "cni0", "up"},
	} {
		if _, err := runIn(p.NS, "ip", args...); err != nil {
			return 0, 0, 0, err
		}
	}
	existing := cfg.N
	if p.Empty {
		existing = 0
	}
	n := 0
	if p.Backend == "" {
		n = existing // upstream's iptables backend: the attachments are iptables rules
	}
	payload, foreign, cni := natPayload(cfg.M, n)
	c := inNS(p.NS, "iptables-restore", "-w")
	c.Stdin = strings.NewReader(payload)
	if out, err := c.CombinedOutput(); err != nil {
		return 0, 0, 0, fmt.Errorf("iptables-restore: %v: %s", err, out)
	}
	if _, err := runIn(p.NS, "ip6tables", "-w", "-t", "nat", "-S", "OUTPUT"); err != nil {
		return 0, 0, 0, err
	}
	script, chains := kubeProxyNFT(cfg.Services)
	if err := nftLoad(p.NS, script); err != nil {
		return 0, 0, 0, fmt.Errorf("kube-proxy table: %w", err)
	}
	switch {
	case p.Backend == "nftables" && !p.portguard():
		if existing > 0 {
			if err := nftLoad(p.NS, upstreamNFTTable(existing)); err != nil {
				return 0, 0, 0, fmt.Errorf("upstream cni_hostport: %w", err)
			}
		}
		cni = 4 * existing
	case p.portguard() && p.Backend == "nftables":
		if err := prefillPortguard(p.NS, existing); err != nil {
			return 0, 0, 0, fmt.Errorf("portguard table: %w", err)
		}
		cni = 3 * existing
	}
	return foreign, cni, chains, nil
}

// prefillPortguard writes existing attachments 0..n-1 into portguard's table of namespace
// name with the backend's own transaction API, so they are exactly what its ADD writes
// (network pgbnet, 2 TCP mappings, snat), in one batch.
func prefillPortguard(name string, n int) error {
	return ns.WithNetNSPath("/var/run/netns/"+name, func(ns.NetNS) error {
		t, err := nftables.Open()
		if err != nil {
			return err
		}
		defer t.Close()
		if _, err := t.Ensure(); err != nil {
			return err
		}
		if n == 0 {
			return nil
		}
		tx, err := t.Begin()
		if err != nil {
			return err
		}
		for i := 0; i < n; i++ {
			a := existingAttachment(i)
			att := nftables.Attachment{Owner: hostport.Owner{Network: netName, ContainerID: a.ID},
				SNAT: []nftables.SNAT{{Pod: netip.PrefixFrom(a.IP, podCIDRBits)}}}
			for k, hp := range a.Ports {
				att.Mappings = append(att.Mappings, nftables.Mapping{
					Claim: hostport.Claim{Family: hostport.V4, Proto: "tcp", HostPort: hp},
					Dest:  netip.AddrPortFrom(a.IP, uint16(containerPorts[k]))})
			}
			if err := tx.AddAttachment(att); err != nil {
				return err
			}
		}
		return tx.Commit()
	})
}

// nodeState returns a node's state for the before/after comparisons: the nat tables and,
// with nft, the host-port tables of both nftables plugins; and its foreign part: the
// KUBE-* rules and, withForeign, kube-proxy's nftables table (thousands of chains: seconds
// to list).
func nodeState(name string, nft, withForeign bool) (all, foreign string, err error) {
	st, err := natStateIn(name)
	if err != nil {
		return "", "", err
	}
	foreign = foreignLines(st)
	if !nft {
		return st, foreign, nil
	}
	var b strings.Builder
	b.WriteString(st)
	for _, tbl := range [][]string{{"ip", "cni_hostport"}, {"ip6", "cni_hostport"}, {"inet", nftables.TableName}} {
		out, err := inNS(name, "nft", "list", "table", tbl[0], tbl[1]).CombinedOutput()
		if err != nil && !strings.Contains(string(out), "No such file") {
			return "", "", fmt.Errorf("nft list table %s %s: %v: %s", tbl[0], tbl[1], err, out)
		}
		if err == nil {
			b.Write(out)
		}
	}
	if !withForeign {
		return b.String(), foreign, nil
	}
	kp, err := runIn(name, "nft", "list", "table", "ip", "kube-proxy")
	if err != nil {
		return "", "", err
	}
	return b.String(), foreign + kp, nil
}

// pluginState is what plugin p writes on its node: the nat tables (iptables backend), or
// its own nftables table; for the checks after its calls, cheaper than nodeState.
func pluginState(p plugin) (string, error) {
	var tables [][]string
	switch {
	case p.Backend != "nftables":
		return natStateIn(p.NS)
	case p.portguard():
		tables = [][]string{{"inet", nftables.TableName}}
	default:
		tables = [][]string{{"ip", "cni_hostport"}, {"ip6", "cni_hostport"}}
	}
	var b strings.Builder
	for _, tbl := range tables {
		out, err := inNS(p.NS, "nft", "list", "table", tbl[0], tbl[1]).CombinedOutput()
		if err != nil && !strings.Contains(string(out), "No such file") {
			return "", fmt.Errorf("nft list table %s %s: %v: %s", tbl[0], tbl[1], err, out)
		}
		if err == nil {
			b.Write(out)
		}
	}
	return b.String(), nil
}

// installedIn reports whether attachment a's forwarding is in a node's state, in any of
// the three formats: iptables' `--to-destination IP:port`, upstream nftables'
// `dnat to IP:port`, portguard's map element `… : IP . port`, and its container ID.
func installedIn(state string, a attachment) bool {
	for _, cp := range containerPorts {
		found := false
		for _, f := range []string{"%s:%d ", "%s:%d\n", ": %s . %d,", ": %s . %d\n", ": %s . %d }"} {
			found = found || strings.Contains(state, fmt.Sprintf(f, a.IP, cp))
		}
		if !found {
			return false
		}
	}
	return strings.Contains(state, a.ID)
}

// leftIn reports whether anything of attachment a is still in a node's state.
func leftIn(state string, a attachment) bool {
	return strings.Contains(state, a.ID) || strings.Contains(state, a.IP.String()+":") || strings.Contains(state, " "+a.IP.String()+" . ")
}
