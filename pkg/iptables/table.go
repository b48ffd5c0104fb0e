package iptables

import (
	"fmt"
	"strings"
)

// Chain is one chain as read from the kernel.
type Chain struct {
	Name  string
	Rules []Rule
}

// Table is the part of a nat table that was read. A chain that was read and found missing
// is recorded in Missing, so "absent" and "not looked at" stay different things.
type Table struct {
	Chains  map[string]*Chain
	Order   []string // chain names in the order they were first seen
	Missing map[string]bool
	// Full says the whole table was read (iptables-save): every chain not in Chains is absent.
	Full bool
}

// NewTable returns an empty table.
func NewTable() *Table {
	return &Table{Chains: map[string]*Chain{}, Missing: map[string]bool{}}
}

// Known reports whether the chain was read (present or missing).
func (t *Table) Known(name string) bool {
	_, ok := t.Chains[name]
	return ok || t.Full || t.Missing[name]
}

// Absent reports whether the chain was read and found missing.
func (t *Table) Absent(name string) bool { return t.Known(name) && !t.Has(name) }

// Has reports whether the chain was read and exists.
func (t *Table) Has(name string) bool { _, ok := t.Chains[name]; return ok }

// Rules returns the rules of a chain (nil when absent or unknown).
func (t *Table) Rules(name string) []Rule {
	if c, ok := t.Chains[name]; ok {
		return c.Rules
	}
	return nil
}

func (t *Table) chain(name string) *Chain {
	c, ok := t.Chains[name]
	if !ok {
		c = &Chain{Name: name}
		t.Chains[name] = c
		t.Order = append(t.Order, name)
		delete(t.Missing, name)
	}
	return c
}

// Add records a chain that was read and its rules, for readers that get rules some other
// way than as iptables' text (pkg/nft); the rules' Args are what Parse would have made.
func (t *Table) Add(chain string, rules ...Rule) {
	c := t.chain(chain)
	c.Rules = append(c.Rules, rules...)
}

// Parse adds the output of `iptables -t nat -S [CHAIN]` or `iptables-save -t nat` to the
// table. Both formats name chains (-P/-N or :CHAIN) and list rules as "-A CHAIN args...".
// It is the only parser of iptables output in portguard.
func (t *Table) Parse(out string) error {
	for rest := out; rest != ""; {
		var line string
		line, rest, _ = strings.Cut(rest, "\n")
		line = strings.TrimSpace(line)
		switch {
		case line == "" || line[0] == '#' || line[0] == '*' || line == "COMMIT":
		case line[0] == ':':
			if f := strings.Fields(line[1:]); len(f) > 0 {
				t.chain(f[0])
			}
		case strings.HasPrefix(line, "-P ") || strings.HasPrefix(line, "-N "):
			if f := strings.Fields(line); len(f) > 1 {
				t.chain(f[1])
			}
		case strings.HasPrefix(line, "-A "):
			args, err := SplitArgs(line)
			if err != nil {
				return err
			}
			if len(args) < 2 {
				return fmt.Errorf("rule without chain: %q", line)
			}
			c := t.chain(args[1])
			c.Rules = append(c.Rules, Rule{Chain: args[1], Args: args[2:]})
		default:
			return fmt.Errorf("unexpected iptables output line: %q", line)
		}
	}
	return nil
}
