package iptables

import (
	"fmt"
	"strconv"
	"strings"
)

// OpKind is what one line of an iptables-restore payload does.
type OpKind int

const (
	// Declare creates a chain (":NAME - [0:0]"); an existing chain is flushed, so shared
	// chains are only declared when they were read and found missing.
	Declare OpKind = iota
	Append
	Insert
	Delete
	Flush
	DeleteChain
	// Check asserts that a rule exists (-C); a failed assertion aborts the whole payload,
	// which lets a write rely on state it did not read.
	Check
)

// Op is one change (or assertion) in a transaction. Why is shown when the line fails.
type Op struct {
	Kind  OpKind
	Chain string
	Pos   int // for Insert: 1-based position
	Args  []string
	Why   string
}

// Tx is one atomic change of one family's nat table.
type Tx struct {
	Ops []Op
}

func (tx *Tx) add(op Op) { tx.Ops = append(tx.Ops, op) }

// DeclareChain creates (or flushes) a chain.
func (tx *Tx) DeclareChain(name, why string) { tx.add(Op{Kind: Declare, Chain: name, Why: why}) }

// AppendRule appends a rule at the end of its chain.
func (tx *Tx) AppendRule(r Rule, why string) {
	tx.add(Op{Kind: Append, Chain: r.Chain, Args: r.Args, Why: why})
}

// InsertRule inserts a rule at a 1-based position.
func (tx *Tx) InsertRule(r Rule, pos int, why string) {
	tx.add(Op{Kind: Insert, Chain: r.Chain, Pos: pos, Args: r.Args, Why: why})
}

// DeleteRule deletes the first rule that matches r.
func (tx *Tx) DeleteRule(r Rule, why string) {
	tx.add(Op{Kind: Delete, Chain: r.Chain, Args: r.Args, Why: why})
}

// RemoveChain flushes and deletes a chain (its jumps must be gone first).
func (tx *Tx) RemoveChain(name, why string) {
	tx.add(Op{Kind: Flush, Chain: name, Why: why})
	tx.add(Op{Kind: DeleteChain, Chain: name, Why: why})
}

// CheckRule asserts that r exists.
func (tx *Tx) CheckRule(r Rule, why string) {
	tx.add(Op{Kind: Check, Chain: r.Chain, Args: r.Args, Why: why})
}

// Empty reports whether the transaction changes and asserts nothing.
func (tx *Tx) Empty() bool { return tx == nil || len(tx.Ops) == 0 }

// Changes reports whether the transaction holds anything but assertions.
func (tx *Tx) Changes() bool {
	for _, op := range tx.ordered() {
		if op.Kind != Check {
			return true
		}
	}
	return false
}

// ordered puts declarations first (iptables-restore wants chains declared before rules
// use them) and keeps every other operation in plan order.
func (tx *Tx) ordered() []Op {
	var decl, rest []Op
	for _, op := range tx.Ops {
		if op.Kind == Declare {
			decl = append(decl, op)
		} else {
			rest = append(rest, op)
		}
	}
	return append(decl, rest...)
}

// Render writes the payload for `iptables-restore --noflush`. It refuses any argument or
// chain name that could break out of its line.
func (tx *Tx) Render() (string, error) {
	var b strings.Builder
	b.WriteString("*nat\n")
	for _, op := range tx.ordered() {
		if err := validChainName(op.Chain); err != nil {
			return "", err
		}
		for _, a := range op.Args {
			if err := CheckArg(a); err != nil {
				return "", fmt.Errorf("chain %s: %w", op.Chain, err)
			}
		}
		switch op.Kind {
		case Declare:
			fmt.Fprintf(&b, ":%s - [0:0]\n", op.Chain)
		case Append:
			fmt.Fprintf(&b, "-A %s %s\n", op.Chain, JoinArgs(op.Args))
		case Insert:
			fmt.Fprintf(&b, "-I %s %d %s\n", op.Chain, op.Pos, JoinArgs(op.Args))
		case Delete:
			fmt.Fprintf(&b, "-D %s %s\n", op.Chain, JoinArgs(op.Args))
		case Flush:
			fmt.Fprintf(&b, "-F %s\n", op.Chain)
		case DeleteChain:
			fmt.Fprintf(&b, "-X %s\n", op.Chain)
		case Check:
			fmt.Fprintf(&b, "-C %s %s\n", op.Chain, JoinArgs(op.Args))
		}
	}
	b.WriteString("COMMIT\n")
	for _, line := range strings.Split(b.String(), "\n") {
		// iptables-restore reads 10 KiB at a time and runs the rest of a longer line as a
		// new line; refuse long before that.
		if len(line) > MaxLine {
			return "", fmt.Errorf("a payload line of %d bytes exceeds %d: %.80s...", len(line), MaxLine, line)
		}
	}
	return b.String(), nil
}

// MaxLine is the longest payload line Render writes.
const MaxLine = 4096

// Explain names the operation on a payload line (1-based, as iptables-restore reports it).
func (tx *Tx) Explain(line int) string {
	ops := tx.ordered()
	i := line - 2 // line 1 is "*nat"
	if i < 0 || i >= len(ops) {
		return ""
	}
	op := ops[i]
	if op.Why != "" {
		return op.Why
	}
	return fmt.Sprintf("%s %s", op.Chain, JoinArgs(op.Args))
}

func validChainName(name string) error {
	if name == "" || len(name) > 28 {
		return fmt.Errorf("invalid chain name %q", name)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return fmt.Errorf("invalid chain name %q", name)
		}
	}
	return nil
}

// FailedLine extracts N from iptables-restore's "line N failed", "line N: ..." or "Error
// occurred at line: N" message (0 when absent).
func FailedLine(msg string) int {
	if _, after, ok := strings.Cut(msg, "Error occurred at line: "); ok {
		j := 0
		for j < len(after) && after[j] >= '0' && after[j] <= '9' {
			j++
		}
		if n, err := strconv.Atoi(after[:j]); err == nil {
			return n
		}
	}
	i := strings.Index(msg, "line ")
	for i >= 0 {
		rest := msg[i+5:]
		j := 0
		for j < len(rest) && rest[j] >= '0' && rest[j] <= '9' {
			j++
		}
		if j > 0 && (strings.HasPrefix(rest[j:], " failed") || strings.HasPrefix(rest[j:], ": ")) {
			n, _ := strconv.Atoi(rest[:j])
			return n
		}
		k := strings.Index(rest, "line ")
		if k < 0 {
			break
		}
		i += 5 + k
	}
	return 0
}
