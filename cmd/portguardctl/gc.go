package main

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	iptbackend "github.com/portguard/portguard/pkg/backend/iptables"
	"github.com/portguard/portguard/pkg/backend/nftables"
	"github.com/portguard/portguard/pkg/cnicache"
	"github.com/portguard/portguard/pkg/engine"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/liveness"
)

const gcHelp = `Usage: portguardctl gc --network NAME (--valid ID[/IFNAME] ... | --remove-all)

Removes every attachment of network NAME whose container ID is not listed with --valid:
its jumps in CNI-HOSTPORT-DNAT and its CNI-DN chain, for IPv4 and IPv6, and (nftables
backend) its elements and masquerade entries in portguard's inet table, in one batch. This is the plugin's
own CNI GC code path (engine.GC, under the same host-wide lock), for runtimes that never call
CNI GC (containerd does not today). Ownership comes from the jump comments
(dnat name: "NAME" id: "ID"), so chains written by upstream portmap are collected too.

--valid takes container IDs (an "/IFNAME" suffix, as in cni.dev/valid-attachments, is
accepted and ignored: rules are per container); repeat it or separate IDs with commas.
With no valid attachment at all, pass --remove-all: it removes the whole network's claims.

Examples:
  portguardctl gc --network cbr0 --valid $(crictl pods -q | paste -sd, -)
  portguardctl gc --network podman --valid 3f2a9c/eth0 --valid 77b0e1/eth0
  portguardctl gc --network old-net --remove-all
`

func cmdGC(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("gc", gcHelp, stdout)
	network := fs.String("network", "", "CNI network name (as in the rule comments)")
	var valids listFlag
	fs.Var(&valids, "valid", "container ID still in use, optionally ID/IFNAME (repeatable)")
	removeAll := fs.Bool("remove-all", false, "no attachment is valid: remove every claim of the network")
	var bf backendFlag
	fs.Var(&bf, "backend", "iptables, nftables or all (all: iptables when usable, nftables when portguard's table exists)")
	timeout := fs.Duration("lock-timeout", 60*time.Second, "how long to wait for the portguard and xtables locks")
	if err := parse(fs, args); err != nil {
		return err
	}
	if !hostport.ValidNetworkName(*network) {
		return usageError{fmt.Sprintf("--network %q: want a CNI network name", *network)}
	}
	if len(valids) == 0 && !*removeAll {
		return usageError{"no --valid attachment: pass the container IDs still in use, or --remove-all to remove every claim of the network"}
	}
	if len(valids) > 0 && *removeAll {
		return usageError{"--remove-all contradicts --valid"}
	}
	valid := map[string]bool{}
	for _, v := range valids {
		id, _, _ := strings.Cut(v, "/")
		if !hostport.ValidContainerID(id) {
			return usageError{fmt.Sprintf("--valid %q: not a container ID", v)}
		}
		valid[id] = true
	}
	// As the plugin's GC: the owners portguard recorded are suspects too, and the records
	// of collected owners go with their rules.
	judge := liveness.New()
	suspects := cnicache.Owners(cnicache.Dir(), *network)
	for _, r := range judge.Records.All() {
		suspects = append(suspects, r.Owner)
	}
	type gcEngine struct {
		e     *engine.Engine
		where func(hostport.Owner) string
	}
	var engines []gcEngine
	r := newRunner(*timeout)
	if bf.iptables() && (bf.explicit() || iptablesUsable(r)) {
		engines = append(engines, gcEngine{engine.NewWith(iptbackend.New(r), *timeout),
			func(o hostport.Owner) string { return "chain " + hostport.ChainName(o) }})
	}
	if bf.nftables() && (bf.explicit() || nftTableExists()) {
		engines = append(engines, gcEngine{engine.NewWith(nftables.New(), *timeout),
			func(hostport.Owner) string { return "elements in inet " + nftables.TableName }})
	}
	if len(engines) == 0 {
		return envError{errors.New("neither iptables nor portguard's nftables table is here: nothing to collect")}
	}
	var removed []hostport.Owner
	var errs []error
	for _, g := range engines {
		g.e.Judge = judge
		rm, err := g.e.GC(*network, valid, suspects)
		for _, o := range rm {
			fmt.Fprintf(stdout, "removed %s (%s)\n", o, g.where(o))
		}
		removed = append(removed, rm...)
		if err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return envError{errors.Join(errs...)}
	}
	if len(removed) == 0 {
		fmt.Fprintf(stdout, "nothing to collect in network %s\n", *network)
	}
	return nil
}

// iptablesUsable: either family's iptables answers (Probe, which waits for no lock).
func iptablesUsable(r iptables.Runner) bool {
	for _, f := range hostport.Families {
		if r.Probe(f) == nil {
			return true
		}
	}
	return false
}

// nftTableExists: portguard's nftables table is in this network namespace.
func nftTableExists() bool {
	side, err := observeNFT()
	if err != nil {
		return false
	}
	defer side.Close()
	return side.obs.Table
}
