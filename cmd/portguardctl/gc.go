package main

import (
	"fmt"
	"io"
	"strings"
	"time"

	iptbackend "github.com/portguard/portguard/pkg/backend/iptables"
	"github.com/portguard/portguard/pkg/cnicache"
	"github.com/portguard/portguard/pkg/engine"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/liveness"
)

const gcHelp = `Usage: portguardctl gc --network NAME (--valid ID[/IFNAME] ... | --remove-all)

Removes every attachment of network NAME whose container ID is not listed with --valid:
its jumps in CNI-HOSTPORT-DNAT and its CNI-DN chain, for IPv4 and IPv6. This is the plugin's
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
	e := engine.NewWith(iptbackend.New(newRunner(*timeout)), *timeout)
	// As the plugin's GC: the owners portguard recorded are suspects too, and the records
	// of collected owners go with their rules.
	e.Judge = liveness.New()
	suspects := cnicache.Owners(cnicache.Dir(), *network)
	for _, r := range e.Judge.Records.All() {
		suspects = append(suspects, r.Owner)
	}
	removed, err := e.GC(*network, valid, suspects)
	for _, o := range removed {
		fmt.Fprintf(stdout, "removed %s (chain %s)\n", o, hostport.ChainName(o))
	}
	if err != nil {
		return envError{err}
	}
	if len(removed) == 0 {
		fmt.Fprintf(stdout, "nothing to collect in network %s\n", *network)
	}
	return nil
}
