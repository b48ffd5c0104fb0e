package nftables

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"

	gnft "github.com/google/nftables"
	"github.com/google/nftables/expr"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/nftcond"
)

// condChainPrefix starts the name of a conditions chain.
const condChainPrefix = "cond-"

// CondChain names the chain of one family's conditions: "cond-4-" or "cond-6-" and 16 hex
// digits of sha256 of their canonical form, so every attachment with equal conditions
// shares it (and "" for none).
func CondChain(c nftcond.Conditions) string {
	if c.Empty() {
		return ""
	}
	sum := sha256.Sum256([]byte(c.String()))
	f := "4-"
	if c.Family() == hostport.V6 {
		f = "6-"
	}
	return condChainPrefix + f + hex.EncodeToString(sum[:8])
}

// EnsureConditions creates the chain of c unless it exists, in a batch of its own:
//
//	chain cond-X-… { <c> return; accept }
//
// Call it before Begin (its commit changes the generation a transaction checks). It returns
// the chain's name for Attachment.Conditions ("" for empty conditions, nothing created).
// The chain is never deleted by a verb: gate elements of other attachments may jump to it,
// and an unreferenced one costs nothing (GC may drop it).
func (t *Table) EnsureConditions(c nftcond.Conditions) (string, error) {
	name := CondChain(c)
	if name == "" {
		return "", nil
	}
	if _, err := t.g.ListChain(table, name); err == nil {
		return name, nil
	} else if !isNotFound(err) {
		return "", fmt.Errorf("read chain %s: %w", name, err)
	}
	ch := t.g.AddChain(&gnft.Chain{Table: table, Name: name})
	t.g.FlushChain(ch)
	match, err := c.Exprs(table, t.g)
	if err != nil {
		return "", fmt.Errorf("conditions %s: %w", c, err)
	}
	t.g.AddRule(&gnft.Rule{Table: table, Chain: ch, Exprs: append(match, &expr.Verdict{Kind: expr.VerdictReturn})})
	t.g.AddRule(&gnft.Rule{Table: table, Chain: ch, Exprs: []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}}})
	if err := t.g.Flush(); err != nil {
		return "", fmt.Errorf("create chain %s for %s: %w", name, c, err)
	}
	return name, nil
}
