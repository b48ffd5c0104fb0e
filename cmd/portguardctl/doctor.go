package main

import (
	"encoding/json"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"time"

	"github.com/portguard/portguard/pkg/doctor"
)

const doctorHelp = `Usage: portguardctl doctor [--conf-dir /etc/cni/net.d] [--bin-dir /opt/cni/bin] [-o text|json]

Runs the checks an operator does by hand when a host port does not work, and says for each
finding what is wrong, why it breaks host ports, and the exact fix:
  conflist      which file the runtime uses (the lexically first .conf/.conflist/.json, as
                libcni, containerd and CRI-O pick it) and whether it parses
  port-mapping  whether it chains portmap or portguard with "capabilities": {"portMappings": true}
  binary        whether every plugin of the chain is an executable file in --bin-dir, and
                what it is (run without CNI_COMMAND, a CNI plugin prints its name and
                version): portguard and its version and commit, upstream portmap, or
                unknown; a portmap drop-in that another installer overwrote is an error
  iptables      whether iptables / ip6tables can use the nat table
  backend       CNI chains in the other iptables backend (legacy vs nft) that the kernel
                still runs but "iptables" does not show
  sysctl        net.ipv4.ip_forward; bridge-nf-call-iptables when the main plugin is bridge
                or flannel; route_localnet where a claim accepts 127.0.0.1
  audit         everything "portguardctl audit" reports (the nftables side too)
  net-backend   per conflist, which backend its port-mapping plugin uses (the "backend" it
                sets, or the one picked when unset)
  nftables      whether the kernel has every feature of portguard's nftables table, probed
                with a batch the kernel refuses by design (nothing changes)

Exit status: 0 no error found (warnings allowed), 1 errors found, 2 usage or environment error.

Examples:
  portguardctl doctor
  portguardctl doctor --conf-dir /etc/cni/net.d --bin-dir /opt/cni/bin:/usr/libexec/cni
  portguardctl doctor -o json | jq '.findings[] | select(.severity != "ok")'
`

func cmdDoctor(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("doctor", doctorHelp, stdout)
	confDir := fs.String("conf-dir", "/etc/cni/net.d", "CNI network config directory the runtime uses")
	binDir := fs.String("bin-dir", "/opt/cni/bin", "CNI plugin directories, colon-separated like CNI_PATH")
	output := fs.String("o", "text", "output format: "+formatList(textOrJSON))
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := checkFormat(*output, textOrJSON); err != nil {
		return err
	}
	dirs := filepath.SplitList(*binDir)
	env := doctor.DefaultEnv(*confDir, dirs, newRunner(10*time.Second))
	rep := doctor.Run(env)
	doctor.RunNFT(env, nftDoctor, &rep)
	if *output == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return envError{err}
		}
	} else {
		renderFindings(stdout, rep.Findings)
	}
	if !rep.Healthy() {
		return exitError(exitProblems)
	}
	return nil
}

func renderFindings(w io.Writer, fs []doctor.Finding) {
	errs, warns := 0, 0
	for _, f := range fs {
		tag := "[ok]     "
		switch f.Severity {
		case doctor.Error:
			tag = "[ERROR]  "
			errs++
		case doctor.Warning:
			tag = "[warning]"
			warns++
		}
		fmt.Fprintf(w, "%s %-12s %s\n", tag, f.Check, f.What)
		if f.Why != "" {
			fmt.Fprintf(w, "%s why: %s\n", strings.Repeat(" ", 22), f.Why)
		}
		if f.Fix != "" {
			fmt.Fprintf(w, "%s fix: %s\n", strings.Repeat(" ", 22), f.Fix)
		}
	}
	fmt.Fprintf(w, "\n%d errors, %d warnings\n", errs, warns)
}
