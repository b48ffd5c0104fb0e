package plan

import (
	"slices"

	"github.com/portguard/portguard/pkg/iptables"
)

// chainSim follows a chain's rule list through a transaction, so that positional
// inserts are computed against the order the kernel will have at that line.
type chainSim struct{ rules []iptables.Rule }

func newSim(rules []iptables.Rule) *chainSim {
	return &chainSim{rules: append([]iptables.Rule(nil), rules...)}
}

func (c *chainSim) index(r iptables.Rule) int {
	return slices.IndexFunc(c.rules, func(x iptables.Rule) bool { return slices.Equal(x.Args, r.Args) })
}

func (c *chainSim) delete(r iptables.Rule) {
	if i := c.index(r); i >= 0 {
		c.rules = slices.Delete(c.rules, i, i+1)
	}
}

// insert places r at a 1-based position.
func (c *chainSim) insert(r iptables.Rule, pos int) {
	pos = max(1, min(pos, len(c.rules)+1))
	c.rules = slices.Insert(c.rules, pos-1, r)
}
