// Package iptablestest is a stateful stand-in for the kernel's nat tables, for unit tests
// of what reads, plans and writes them (pkg/plan, pkg/backend/iptables, pkg/engine, the plugin) without root.
// Test code only: production code never imports it.
package iptablestest

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/state"
)

// Kernel is an iptables.Runner that keeps one nat table per family and applies restore
// payloads to it the way `iptables-restore --noflush` does: line by line, and the whole
// payload or nothing. A line fails, and with it the payload (an *iptables.RestoreError
// naming the line, so Tx.Explain works), where the kernel would refuse it:
//
//   - -A, -I into a missing chain, or with a -j/-g target that is neither a chain nor a
//     known target extension; -I past the end of the chain;
//   - -D and -C of a rule the chain does not hold (rules are compared as state.Normalize
//     compares them: long and short flags, an implicit "-m tcp" and a bare address's /32
//     match as they do for iptables; unlike iptables, the order of the options does not);
//   - -N of a chain that exists; -F of a missing chain;
//   - -X of a missing or built-in chain, of a chain that still holds rules, or of one some
//     rule still jumps to.
//
// A ":CHAIN - [0:0]" line creates the chain, or flushes it when it exists. Reads (List is
// `iptables -S CHAIN`, Save is `iptables-save -t nat`) print the table back in iptables'
// own text format, so they go through the same parser as the real ones. Rules are kept as
// written: the fake does not rewrite them the way the kernel prints them (no added "-m
// tcp" or "/32"), which portguard's readers must accept anyway.
type Kernel struct {
	mu     sync.Mutex
	tables map[hostport.Family]*nat
	calls  []string
	sent   map[hostport.Family][]string
	errs   map[hostport.Family][]error
	// Unusable families answer every call with iptables.ErrUnavailable, like a node
	// without ip6tables.
	Unusable map[hostport.Family]bool
	// BeforeRestore, when set, runs before each payload given to Restore is applied, with
	// no lock of the fake held: a test changes the table there (Apply) the way another
	// writer would between a caller's read and its write.
	BeforeRestore func(f hostport.Family, payload string)
}

var _ iptables.Runner = (*Kernel)(nil)

// builtins are the nat table's built-in chains, in iptables-save's order.
var builtins = []string{"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"}

// targets are the target extensions a rule may jump to besides a chain.
var targets = map[string]bool{
	"ACCEPT": true, "DROP": true, "RETURN": true, "REJECT": true, "LOG": true, "DNAT": true,
	"SNAT": true, "MASQUERADE": true, "REDIRECT": true, "NETMAP": true, "MARK": true,
	"CONNMARK": true, "CT": true, "NOTRACK": true,
}

// nat is one family's table: chains in creation order (built-ins first) and their rules.
type nat struct {
	order []string
	rules map[string][]iptables.Rule
}

func (n *nat) clone() *nat {
	c := &nat{order: slices.Clone(n.order), rules: make(map[string][]iptables.Rule, len(n.rules))}
	for name, rs := range n.rules {
		c.rules[name] = slices.Clone(rs)
	}
	return c
}

func (n *nat) has(chain string) bool { _, ok := n.rules[chain]; return ok }

func (n *nat) create(chain string) {
	n.order = append(n.order, chain)
	n.rules[chain] = []iptables.Rule{}
}

// New returns a fake whose tables start as the given iptables-save text per family (the
// built-in chains are added when missing; a family not given starts with them only).
// The text is taken as it is, without the checks a payload gets.
func New(tables map[hostport.Family]string) (*Kernel, error) {
	k := &Kernel{tables: map[hostport.Family]*nat{}, sent: map[hostport.Family][]string{}, errs: map[hostport.Family][]error{}}
	for _, f := range hostport.Families {
		n := &nat{rules: map[string][]iptables.Rule{}}
		for _, b := range builtins {
			n.create(b)
		}
		t := iptables.NewTable()
		if err := t.Parse(tables[f]); err != nil {
			return nil, fmt.Errorf("%s: %w", f, err)
		}
		for _, name := range t.Order {
			if !n.has(name) {
				n.create(name)
			}
			n.rules[name] = append(n.rules[name], t.Rules(name)...)
		}
		k.tables[f] = n
	}
	return k, nil
}

// MustNew is New for fixed test fixtures: it panics when a table does not parse.
func MustNew(tables map[hostport.Family]string) *Kernel {
	k, err := New(tables)
	if err != nil {
		panic(err)
	}
	return k
}

// Calls lists the runner calls made so far ("list ipv4 CHAIN", "save ipv4", "restore
// ipv4", "probe ipv4"), in order; Apply is not a call.
func (k *Kernel) Calls() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.calls)
}

// ResetCalls forgets the calls and payloads recorded so far.
func (k *Kernel) ResetCalls() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.calls, k.sent, k.errs = nil, map[hostport.Family][]string{}, map[hostport.Family][]error{}
}

// Payloads lists the payloads given to Restore for family f, applied or refused.
func (k *Kernel) Payloads(f hostport.Family) []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.sent[f])
}

// Results lists what Restore returned for each of Payloads(f) (nil: applied).
func (k *Kernel) Results(f hostport.Family) []error {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.errs[f])
}

func (k *Kernel) record(format string, a ...any) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.calls = append(k.calls, fmt.Sprintf(format, a...))
}

func (k *Kernel) usable(f hostport.Family) error {
	if k.Unusable[f] {
		return fmt.Errorf("%w: fake %s", iptables.ErrUnavailable, f)
	}
	return nil
}

// Rules returns the rules of a chain of family f (nil when it does not exist).
func (k *Kernel) Rules(f hostport.Family, chain string) []iptables.Rule {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.tables[f].rules[chain])
}

// Has reports whether family f's table has the chain.
func (k *Kernel) Has(f hostport.Family, chain string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.tables[f].has(chain)
}

// Dump prints family f's table as iptables-save does.
func (k *Kernel) Dump(f hostport.Family) string {
	k.mu.Lock()
	defer k.mu.Unlock()
	n := k.tables[f]
	var b strings.Builder
	b.WriteString("*nat\n")
	for _, name := range n.order {
		policy := "-"
		if slices.Contains(builtins, name) {
			policy = "ACCEPT"
		}
		fmt.Fprintf(&b, ":%s %s [0:0]\n", name, policy)
	}
	for _, name := range n.order {
		for _, r := range n.rules[name] {
			fmt.Fprintf(&b, "-A %s %s\n", name, r.Spec())
		}
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// List is `iptables -t nat -S CHAIN`.
func (k *Kernel) List(f hostport.Family, chain string, t *iptables.Table) error {
	k.record("list %s %s", f, chain)
	if err := k.usable(f); err != nil {
		return err
	}
	k.mu.Lock()
	n := k.tables[f]
	if !n.has(chain) {
		k.mu.Unlock()
		t.Missing[chain] = true
		return nil
	}
	var b strings.Builder
	if slices.Contains(builtins, chain) {
		fmt.Fprintf(&b, "-P %s ACCEPT\n", chain)
	} else {
		fmt.Fprintf(&b, "-N %s\n", chain)
	}
	for _, r := range n.rules[chain] {
		fmt.Fprintf(&b, "-A %s %s\n", chain, r.Spec())
	}
	k.mu.Unlock()
	return t.Parse(b.String())
}

// Save is `iptables-save -t nat`.
func (k *Kernel) Save(f hostport.Family, t *iptables.Table) error {
	k.record("save %s", f)
	if err := k.usable(f); err != nil {
		return err
	}
	return t.Parse(k.Dump(f))
}

// Probe answers like a working iptables, or ErrUnavailable for an unusable family.
func (k *Kernel) Probe(f hostport.Family) error {
	k.record("probe %s", f)
	return k.usable(f)
}

// Restore is `iptables-restore --noflush`: BeforeRestore runs, then the payload is applied
// whole or refused whole.
func (k *Kernel) Restore(f hostport.Family, payload string) error {
	k.record("restore %s", f)
	k.mu.Lock()
	k.sent[f] = append(k.sent[f], payload)
	i := len(k.sent[f]) - 1
	k.errs[f] = append(k.errs[f], nil)
	k.mu.Unlock()
	err := k.usable(f)
	if err == nil {
		if k.BeforeRestore != nil {
			k.BeforeRestore(f, payload)
		}
		err = k.Apply(f, payload)
	}
	k.mu.Lock()
	k.errs[f][i] = err
	k.mu.Unlock()
	return err
}

// Apply applies a payload as Restore does, without recording it or running BeforeRestore:
// the way a test plays another writer.
func (k *Kernel) Apply(f hostport.Family, payload string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	n := k.tables[f].clone()
	lines := strings.Split(strings.TrimSuffix(payload, "\n"), "\n")
	committed := false
	for i, line := range lines {
		line = strings.TrimSpace(line)
		if committed && line != "" {
			return refused(i+1, "a line after COMMIT")
		}
		var why string
		switch {
		case line == "" || line[0] == '#':
		case line == "COMMIT":
			committed = true
		case line[0] == '*':
			if line != "*nat" {
				why = "only the nat table is faked"
			}
		case line[0] == ':':
			name := strings.Fields(line[1:])
			if len(name) == 0 {
				why = "chain declaration without a name"
			} else if !n.has(name[0]) {
				n.create(name[0])
			} else if !slices.Contains(builtins, name[0]) {
				n.rules[name[0]] = []iptables.Rule{}
			}
		default:
			why = n.command(line)
		}
		if why != "" {
			return refused(i+1, why)
		}
	}
	if !committed {
		return refused(len(lines)+1, "COMMIT expected")
	}
	k.tables[f] = n
	return nil
}

func refused(line int, why string) error {
	return &iptables.RestoreError{Line: line, Stderr: fmt.Sprintf("line %d failed: %s", line, why)}
}

var commands = map[string]string{
	"--append": "-A", "--insert": "-I", "--delete": "-D", "--check": "-C",
	"--flush": "-F", "--delete-chain": "-X", "--new-chain": "-N",
}

// command applies one command line to n, or says why the kernel would refuse it.
func (n *nat) command(line string) string {
	args, err := iptables.SplitArgs(line)
	if err != nil {
		return err.Error()
	}
	if len(args) < 2 {
		return "command without a chain"
	}
	cmd, chain, spec := args[0], args[1], args[2:]
	if long, ok := commands[cmd]; ok {
		cmd = long
	}
	switch cmd {
	case "-N":
		if n.has(chain) {
			return "Chain already exists"
		}
		n.create(chain)
		return ""
	case "-A", "-I", "-D", "-C", "-F", "-X":
	default:
		return fmt.Sprintf("unknown command %q", cmd)
	}
	if !n.has(chain) {
		return fmt.Sprintf("No chain/target/match by that name (%s)", chain)
	}
	rules := n.rules[chain]
	switch cmd {
	case "-F":
		n.rules[chain] = []iptables.Rule{}
	case "-X":
		switch {
		case slices.Contains(builtins, chain):
			return "cannot delete built-in chain " + chain
		case len(rules) > 0:
			return "Directory not empty (chain " + chain + " holds rules)"
		case n.referenced(chain):
			return "Too many links (a rule jumps to " + chain + ")"
		}
		delete(n.rules, chain)
		n.order = slices.DeleteFunc(n.order, func(c string) bool { return c == chain })
	case "-A", "-I":
		pos := len(rules) + 1
		if cmd == "-I" {
			pos = 1
			if len(spec) > 0 {
				if p, err := strconv.Atoi(spec[0]); err == nil {
					pos, spec = p, spec[1:]
				}
			}
			if pos < 1 || pos > len(rules)+1 {
				return fmt.Sprintf("Index of insertion too big (%d in a chain of %d)", pos, len(rules))
			}
		}
		r := iptables.Rule{Chain: chain, Args: slices.Clone(spec)}
		if t := r.Target(); t != "" && !n.has(t) && (!targets[t] || r.Value("-g", "--goto") != "") {
			return fmt.Sprintf("Couldn't load target `%s'", t)
		}
		n.rules[chain] = slices.Insert(rules, pos-1, r)
	case "-D", "-C":
		i := -1
		if len(spec) == 1 {
			if p, err := strconv.Atoi(spec[0]); err == nil && cmd == "-D" {
				if p < 1 || p > len(rules) {
					return "Index of deletion too big"
				}
				i = p - 1
			}
		}
		if i < 0 {
			want := state.Normalize(iptables.Rule{Chain: chain, Args: spec})
			i = slices.IndexFunc(rules, func(r iptables.Rule) bool { return state.Normalize(r) == want })
		}
		if i < 0 {
			return "Bad rule (does a matching rule exist in that chain?)"
		}
		if cmd == "-D" {
			n.rules[chain] = slices.Delete(rules, i, i+1)
		}
	}
	return ""
}

// referenced reports whether any rule jumps (-j or -g) to chain.
func (n *nat) referenced(chain string) bool {
	for _, rs := range n.rules {
		for _, r := range rs {
			if r.Target() == chain {
				return true
			}
		}
	}
	return false
}
