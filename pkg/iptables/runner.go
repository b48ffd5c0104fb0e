package iptables

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/portguard/portguard/pkg/hostport"
)

// Runner is how portguard talks to the kernel's nat tables. Each call is one process.
type Runner interface {
	// List reads one chain (`iptables -t nat -S CHAIN`) into t; a missing chain is recorded
	// in t.Missing, not returned as an error.
	List(f hostport.Family, chain string, t *Table) error
	// Save reads the whole nat table (`iptables-save -t nat`); audit and GC only.
	Save(f hostport.Family, t *Table) error
	// Restore applies a payload atomically (`iptables-restore --noflush --wait`).
	Restore(f hostport.Family, payload string) error
	// Probe checks that the family's iptables works without taking the xtables lock.
	Probe(f hostport.Family) error
}

// Exec runs the iptables binaries found on PATH.
type Exec struct {
	// WaitSeconds bounds how long iptables-restore waits for the xtables lock.
	WaitSeconds int
	// Prefix runs each binary through another command, e.g. "ip netns exec NAME" in tests.
	Prefix []string
	// Inherit are files every child process inherits. The engine passes its lock file: if
	// the plugin is SIGKILLed while iptables-restore runs, the child still holds the lock,
	// so the next call cannot read, plan and write before the orphaned payload has landed.
	Inherit   []*os.File
	processes atomic.Int64
}

// Processes is how many iptables processes this runner started.
func (e *Exec) Processes() int { return int(e.processes.Load()) }

func binary(f hostport.Family, tool string) string {
	if f == hostport.V6 {
		return "ip6" + tool
	}
	return "ip" + tool
}

// Path is where family f's tool ("tables", "tables-restore", ...) is found on PATH.
func (e *Exec) Path(f hostport.Family, tool string) (string, error) {
	return exec.LookPath(binary(f, tool))
}

// sameDescriptors arranges for a child to get each file at the descriptor number it has
// here (ExtraFiles entry i becomes descriptor 3+i; the gaps stay closed). The lock sits
// high (pkg/lock.HighFD) so that an exiting child closes its nf_tables socket before it
// lets go of the lock.
func sameDescriptors(files []*os.File) []*os.File {
	var out []*os.File
	for _, f := range files {
		i := int(f.Fd()) - 3
		if i < len(out) || i < 0 {
			out = append(out, f) // taken or a standard descriptor: next free number
			continue
		}
		out = append(out, make([]*os.File, i-len(out))...)
		out = append(out, f)
	}
	return out
}

// ErrUnavailable marks a family whose iptables binary is missing or cannot use its table.
var ErrUnavailable = errors.New("iptables unavailable")

func (e *Exec) run(f hostport.Family, tool string, stdin string, args ...string) (string, string, error) {
	path, err := exec.LookPath(binary(f, tool))
	if err != nil {
		return "", "", fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	// A child that hangs (a wedged kernel, a stopped process) must not hold the plugin, and
	// with it the runtime's call, forever: it may wait for the xtables lock (-w), then it
	// gets processDeadline more, and is killed. A killed iptables-restore commits nothing.
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(e.waitSeconds())*time.Second+processDeadline)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	if len(e.Prefix) > 0 {
		cmd = exec.CommandContext(ctx, e.Prefix[0], append(append(e.Prefix[1:len(e.Prefix):len(e.Prefix)], path), args...)...)
	}
	cmd.ExtraFiles = sameDescriptors(e.Inherit)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	e.processes.Add(1)
	err = cmd.Run()
	if ctx.Err() != nil {
		err = fmt.Errorf("%w: %s did not finish within %s and was killed", ErrHung, binary(f, tool), time.Duration(e.waitSeconds())*time.Second+processDeadline)
	}
	return out.String(), strings.TrimSpace(errb.String()), err
}

// ErrHung marks a child killed for running past its deadline (nothing it would have
// committed is in).
var ErrHung = errors.New("iptables child hung")

// processDeadline is how long an iptables child may run beyond its wait for the xtables
// lock. A restore of a whole kube-proxy-sized table takes well under a second here.
var processDeadline = 60 * time.Second // a variable for tests

// missingChain recognises "chain does not exist" in the words of iptables-legacy and
// iptables-nft (1.8.9 says "incompatible" for a chain it cannot find).
func missingChain(stderr string) bool {
	return strings.Contains(stderr, "No chain/target/match by that name") ||
		strings.Contains(stderr, "does not exist") ||
		strings.Contains(stderr, "is incompatible, use 'nft' tool")
}

func (e *Exec) wait() string { return strconv.Itoa(e.waitSeconds()) }

// waitSeconds is WaitSeconds, or 60 when unset.
func (e *Exec) waitSeconds() int {
	if e.WaitSeconds <= 0 {
		return 60
	}
	return e.WaitSeconds
}

// ErrXtablesLock is returned when iptables-legacy gave up waiting for the xtables lock
// (iptables-nft takes none).
var ErrXtablesLock = errors.New("timed out waiting for the xtables lock")

func lockError(f hostport.Family, stderr, wait string) error {
	if strings.Contains(stderr, "holding the xtables lock") {
		return fmt.Errorf("%w after %ss (%s: another program, e.g. kube-proxy, holds it)", ErrXtablesLock, wait, binary(f, "tables"))
	}
	return nil
}

func (e *Exec) List(f hostport.Family, chain string, t *Table) error {
	// -w bounds the wait: iptables-legacy otherwise waits for the xtables lock forever.
	out, stderr, err := e.run(f, "tables", "", "-w", e.wait(), "-t", "nat", "-S", chain)
	if err != nil {
		if missingChain(stderr) {
			t.Missing[chain] = true
			return nil
		}
		if lerr := lockError(f, stderr, e.wait()); lerr != nil {
			return lerr
		}
		return fmt.Errorf("%s -t nat -S %s: %v: %s", binary(f, "tables"), chain, err, stderr)
	}
	return t.Parse(out)
}

func (e *Exec) Save(f hostport.Family, t *Table) error {
	out, stderr, err := e.run(f, "tables-save", "", "-t", "nat")
	if err != nil {
		return fmt.Errorf("%s -t nat: %v: %s", binary(f, "tables-save"), err, stderr)
	}
	return t.Parse(out)
}

// RestoreError is a payload that iptables-restore refused; nothing of it was applied.
type RestoreError struct {
	Line   int
	Stderr string
}

func (r *RestoreError) Error() string { return "iptables-restore: " + r.Stderr }

func (e *Exec) Restore(f hostport.Family, payload string) error {
	_, stderr, err := e.run(f, "tables-restore", payload, "--noflush", "--wait="+e.wait())
	if err != nil {
		if errors.Is(err, ErrUnavailable) || errors.Is(err, ErrHung) {
			return err
		}
		if lerr := lockError(f, stderr, e.wait()); lerr != nil {
			return lerr
		}
		return &RestoreError{Line: FailedLine(stderr), Stderr: stderr}
	}
	return nil
}

func (e *Exec) Probe(f hostport.Family) error {
	// STATUS is polled: it must neither wait for the xtables lock nor read a whole table.
	// iptables-legacy takes the lock even to list one rule, so there the version answer is
	// the probe; iptables-nft takes no lock, so it also lists one built-in rule.
	out, stderr, err := e.run(f, "tables", "", "-V")
	if err != nil {
		if errors.Is(err, ErrUnavailable) {
			return err
		}
		return fmt.Errorf("%w: %s -V: %v %s", ErrUnavailable, binary(f, "tables"), err, stderr)
	}
	if !strings.Contains(out, "nf_tables") {
		return nil
	}
	_, stderr, err = e.run(f, "tables", "", "-t", "nat", "-S", "POSTROUTING", "1")
	if err != nil {
		if errors.Is(err, ErrUnavailable) {
			return err
		}
		return fmt.Errorf("%w: %s -t nat: %s", ErrUnavailable, binary(f, "tables"), stderr)
	}
	return nil
}
