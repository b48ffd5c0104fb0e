package nftables

import (
	"errors"
	"fmt"
	"syscall"

	gnft "github.com/google/nftables"

	"github.com/portguard/portguard/pkg/hostport"
)

// probeTable is the throwaway table Probe builds; the batch that builds it never commits.
const probeTable = "portguard-probe"

// Probe checks that the kernel supports everything portguard's layout needs (an inet
// table; concatenated exact-key maps to address . port values; verdict maps; the interval
// set of concatenated addresses; nat base chains at portguard's priorities; fib, ct
// status, lookups, dnat from a map, masquerade) without changing the ruleset.
//
// It sends one batch that builds the whole layout in a table of its own (probeTable) and
// ends with an exclusive create of that same table, which the kernel must refuse (EEXIST:
// the batch itself created it). A refused batch is aborted as a whole, so nothing of it
// remains, and the generation does not move; every message before the last is still
// checked by the kernel (modules are loaded, expressions validated), and its error, if
// any, is reported besides the expected EEXIST. So: nil when the only error is the
// final EEXIST, the kernel's other errors otherwise.
func Probe() error {
	c, err := gnft.New()
	if err != nil {
		return fmt.Errorf("nf_tables netlink socket: %w", err)
	}
	pt := &gnft.Table{Family: gnft.TableFamilyINet, Name: probeTable}
	c.AddTable(pt)
	for _, f := range hostport.Families {
		for _, s := range sets(f) {
			s.Table = pt
			if err := c.AddSet(s, nil); err != nil {
				return fmt.Errorf("probe map %s: %w", s.Name, err)
			}
		}
	}
	rules := layoutRules()
	for _, ch := range chains() {
		ch.Table = pt
		c.AddChain(ch)
		for _, e := range rules[ch.Name] {
			c.AddRule(&gnft.Rule{Table: pt, Chain: ch, Exprs: e})
		}
	}
	c.CreateTable(pt)
	err = c.Flush()
	if err == nil {
		// Impossible by the kernel's rules; undo rather than leave a table behind.
		c.DelTable(pt)
		_ = c.Flush()
		return errors.New("nf_tables accepted an exclusive create of a table made in the same batch")
	}
	var other []error
	sawExist := false
	for _, e := range leaves(err) {
		if errors.Is(e, syscall.EEXIST) && !sawExist {
			sawExist = true
			continue
		}
		other = append(other, e)
	}
	if sawExist && len(other) == 0 {
		return nil
	}
	if len(other) == 0 {
		return fmt.Errorf("probe batch refused: %w", err)
	}
	return fmt.Errorf("nf_tables lacks a feature of portguard's layout: %w", errors.Join(other...))
}

// leaves flattens joined and wrapped errors into the errors that join nothing.
func leaves(err error) []error {
	switch x := err.(type) {
	case interface{ Unwrap() []error }:
		var out []error
		for _, e := range x.Unwrap() {
			out = append(out, leaves(e)...)
		}
		return out
	case interface{ Unwrap() error }:
		if in := x.Unwrap(); in != nil {
			if _, joined := in.(interface{ Unwrap() []error }); joined {
				return leaves(in)
			}
		}
	}
	return []error{err}
}
