// Package iptables speaks iptables' text formats: it splits the lines that `iptables -S` and
// `iptables-save` print into rules, renders iptables-restore payloads with safe quoting,
// and runs the iptables binaries (pkg/iptables/iptablestest stands in for them in unit tests).
package iptables

import (
	"fmt"
	"strings"
)

// Rule is one rule of a chain: the arguments that follow "-A CHAIN".
type Rule struct {
	Chain string
	Args  []string
}

// Spec renders the rule's arguments quoted for an iptables-restore line.
func (r Rule) Spec() string { return JoinArgs(r.Args) }

func (r Rule) String() string { return "-A " + r.Chain + " " + r.Spec() }

// Value returns the argument after the first occurrence of any of the flags, or "".
func (r Rule) Value(flags ...string) string {
	for i := 0; i+1 < len(r.Args); i++ {
		for _, f := range flags {
			if r.Args[i] == f {
				return r.Args[i+1]
			}
		}
	}
	return ""
}

// Target is the chain or target the rule jumps to (-j or -g).
func (r Rule) Target() string { return r.Value("-j", "--jump", "-g", "--goto") }

// WithValue returns a copy of the rule with the argument after flag replaced.
func (r Rule) WithValue(flag, value string) Rule {
	args := append([]string(nil), r.Args...)
	for i := 0; i+1 < len(args); i++ {
		if args[i] == flag {
			args[i+1] = value
			break
		}
	}
	return Rule{Chain: r.Chain, Args: args}
}

// SplitArgs splits a rule line the way iptables-restore does: whitespace separates
// arguments, double quotes group them, and a backslash escapes a quote or backslash inside
// quotes (which is how iptables prints comments). It runs once per rule of every chain
// read, so unquoted arguments are sliced out of the line rather than copied.
func SplitArgs(line string) ([]string, error) {
	args := make([]string, 0, 16)
	i, n := 0, len(line)
	for i < n {
		for i < n && (line[i] == ' ' || line[i] == '\t') {
			i++
		}
		if i == n {
			break
		}
		start := i
		for i < n && line[i] != ' ' && line[i] != '\t' && line[i] != '"' {
			i++
		}
		if i == n || line[i] != '"' {
			args = append(args, line[start:i])
			continue
		}
		// The argument has quotes: build it.
		var b strings.Builder
		b.WriteString(line[start:i])
		inQuote := false
		for ; i < n; i++ {
			c := line[i]
			switch {
			case inQuote && c == '\\' && i+1 < n && (line[i+1] == '"' || line[i+1] == '\\' || line[i+1] == '\''):
				i++
				b.WriteByte(line[i])
			case c == '"':
				inQuote = !inQuote
			case !inQuote && (c == ' ' || c == '\t'):
				goto done
			default:
				b.WriteByte(c)
			}
		}
	done:
		if inQuote {
			return nil, fmt.Errorf("unterminated quote in %q", line)
		}
		args = append(args, b.String())
	}
	return args, nil
}

// safeArg reports whether an argument can be written without quotes.
func safeArg(a string) bool {
	if a == "" {
		return false
	}
	for i := 0; i < len(a); i++ {
		c := a[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
			strings.IndexByte("-_.:/,!=+@%[]", c) >= 0) {
			return false
		}
	}
	return true
}

// CheckArg rejects what no argument may contain: line breaks and other control characters
// would end the restore line and let the rest become a command of its own.
func CheckArg(a string) error {
	for i := 0; i < len(a); i++ {
		if a[i] < 0x20 || a[i] == 0x7f {
			return fmt.Errorf("argument %q contains a control character", a)
		}
	}
	return nil
}

// QuoteArg renders one argument for iptables-restore.
func QuoteArg(a string) string {
	if safeArg(a) {
		return a
	}
	return `"` + quoteEscaper.Replace(a) + `"`
}

var quoteEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`)

// JoinArgs renders arguments for iptables-restore.
func JoinArgs(args []string) string {
	out := make([]string, len(args))
	for i, a := range args {
		out[i] = QuoteArg(a)
	}
	return strings.Join(out, " ")
}
