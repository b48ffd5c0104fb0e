// Command portguardctl audits, repairs and diagnoses host-port state on a node: the nat
// rules that CNI portmap or portguard wrote, in the current network namespace.
//
// Exit status: 0 healthy / done, 1 problems found (or left), 2 usage or environment error.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
)

const (
	exitOK       = 0
	exitProblems = 1
	exitUsage    = 2
)

// usageError is a bad flag or argument: one line on stderr, exit 2.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

// envError is an environment error (iptables missing, not root, unreadable file): exit 2.
type envError struct{ err error }

func (e envError) Error() string { return e.err.Error() }
func (e envError) Unwrap() error { return e.err }

// exitError carries an exit status without a message (the command printed its result).
type exitError int

func (e exitError) Error() string { return fmt.Sprintf("exit %d", int(e)) }

const rootHelp = `portguardctl — audit, repair and diagnose CNI host ports on this node

Usage:
  portguardctl <command> [flags]

Commands:
  audit    list every host-port claim and every problem in the nat tables
  repair   fix what audit reports, in one iptables-restore per family
  doctor   check the CNI config, plugin binaries, iptables, sysctls, then audit
  gc       remove a network's attachments whose container IDs are not valid
  export   write the nftables backend's claims in upstream portmap's format (downgrade)
  version  print the version and the commit this binary was built from

Every command works on the current network namespace (run it through
"ip netns exec NAME" for another one) and needs root, except --help.
Rules written by upstream portmap are understood exactly like portguard's.

Exit status: 0 healthy / done, 1 problems found, 2 usage or environment error
(audit -o prometheus: 0 once collected; the problems are in the metrics).
Output: -o text (default) or -o json for audit, doctor and version; audit also
-o prometheus. Conventions and names: docs/cli.md.

Examples:
  portguardctl audit
  portguardctl audit -o json | jq '.families[].problems'
  portguardctl audit -o prometheus > /var/lib/node_exporter/textfile/portguard.prom.$$ && \
      mv /var/lib/node_exporter/textfile/portguard.prom.$$ /var/lib/node_exporter/textfile/portguard.prom
  portguardctl repair --dry-run
  portguardctl repair --keep k8s-pod-network/4f1c2a...
  portguardctl doctor --conf-dir /etc/cni/net.d --bin-dir /opt/cni/bin
  portguardctl gc --network k8s-pod-network --valid 4f1c2a... --valid 9be01d...
  portguardctl export --to portmap-nftables --dry-run

Run "portguardctl <command> --help" for the command's flags.
`

// runner is the iptables runner commands use; tests may replace it.
var newRunner = func(lockTimeout time.Duration) iptables.Runner {
	return &iptables.Exec{WaitSeconds: int(lockTimeout / time.Second)}
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, rootHelp)
		return exitUsage
	}
	var err error
	switch cmd := args[0]; cmd {
	case "-h", "--help", "-help", "help":
		fmt.Fprint(stdout, rootHelp)
		return exitOK
	case "--version":
		err = cmdVersion(nil, stdout, stderr)
	case "version":
		err = cmdVersion(args[1:], stdout, stderr)
	case "audit":
		err = cmdAudit(args[1:], stdout, stderr)
	case "repair":
		err = cmdRepair(args[1:], stdout, stderr)
	case "doctor":
		err = cmdDoctor(args[1:], stdout, stderr)
	case "gc":
		err = cmdGC(args[1:], stdout, stderr)
	case "export":
		err = cmdExport(args[1:], stdout, stderr)
	default:
		err = usageError{fmt.Sprintf("unknown command %q (commands: audit, repair, doctor, gc, export, version; see portguardctl --help)", cmd)}
	}
	var code exitError
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &code):
		return int(code)
	case errors.Is(err, flag.ErrHelp):
		return exitOK
	default:
		fmt.Fprintf(stderr, "portguardctl %s: %s\n", args[0], oneLine(err.Error()))
		return exitUsage
	}
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", " ")), " ")
}

// flags is a subcommand's flag set: --help prints the help (with examples) to stdout, and
// every parse error becomes a one-line usageError.
type flags struct {
	*flag.FlagSet
	help   string
	stdout io.Writer
}

func newFlags(name, help string, stdout io.Writer) *flags {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	return &flags{FlagSet: fs, help: help, stdout: stdout}
}

func parse(fs *flags, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(fs.stdout, fs.help)
			fmt.Fprintln(fs.stdout, "\nFlags:")
			fs.SetOutput(fs.stdout)
			fs.PrintDefaults()
			fs.SetOutput(io.Discard)
			return err
		}
		return usageError{fmt.Sprintf("%v (run \"portguardctl %s --help\" for the flags)", err, fs.Name())}
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Sprintf("unexpected argument %q (run \"portguardctl %s --help\" for the usage)", fs.Arg(0), fs.Name())}
	}
	return nil
}

// familyFlag is --family 4|6|all.
type familyFlag struct{ fams []hostport.Family }

func (f *familyFlag) String() string { return "all" }

func (f *familyFlag) Set(v string) error {
	switch v {
	case "4", "ipv4":
		f.fams = []hostport.Family{hostport.V4}
	case "6", "ipv6":
		f.fams = []hostport.Family{hostport.V6}
	case "all":
		f.fams = nil
	default:
		return fmt.Errorf("must be 4, 6 or all")
	}
	return nil
}

func (f *familyFlag) families() []hostport.Family {
	if f.fams == nil {
		return hostport.Families
	}
	return f.fams
}

// explicit reports whether one family was asked for (then its absence is an error).
func (f *familyFlag) explicit() bool { return f.fams != nil }

// listFlag collects repeated (or comma-separated) values.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*l = append(*l, s)
		}
	}
	return nil
}

// Output formats: every subcommand with -o takes "text" for the human output (the default)
// and "json" for the machine one; audit adds "prometheus". audit's former name for its text
// output, "table", is kept as an alias for one release (docs/cli.md).
var (
	textOrJSON           = []string{"text", "json"}
	textJSONOrPrometheus = []string{"text", "json", "prometheus"}
)

// formatList is "text or json", "text, json or prometheus".
func formatList(formats []string) string {
	if len(formats) == 1 {
		return formats[0]
	}
	return strings.Join(formats[:len(formats)-1], ", ") + " or " + formats[len(formats)-1]
}

// checkFormat refuses an -o value outside formats with a usage error.
func checkFormat(v string, formats []string) error {
	for _, f := range formats {
		if v == f {
			return nil
		}
	}
	return usageError{fmt.Sprintf("-o %q: must be %s", v, formatList(formats))}
}
