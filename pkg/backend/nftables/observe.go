package nftables

import (
	"fmt"
	"sort"
	"strings"

	gnft "github.com/google/nftables"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/nft"
)

// Observed is the whole nftables side of a node as the operator verbs (audit, repair,
// doctor, export) see it: portguard's table (elements, layout, conditions chains, gate
// elements without a claim) and upstream portmap's cni_hostport rules. It is the same
// model the verbs use (Dump, Verify, Upstream), read once; the verbs themselves keep to
// point lookups.
type Observed struct {
	// Table says portguard's table exists; without it Dump is empty and Layout says so.
	Table bool
	Dump  Dump
	// Layout is Verify's list of differences from portguard's layout (nil: in place).
	Layout []string
	// Upstream are the rules of upstream's ip/ip6 cni_hostport tables, in rule order per
	// family and chain.
	Upstream []UpstreamRule
	// UpstreamTables are the families in which an upstream cni_hostport table exists.
	UpstreamTables []hostport.Family
	// CondChains are the conditions chains of portguard's table, sorted; OrphanCondChains
	// those no gate element jumps to.
	CondChains       []string
	OrphanCondChains []string
	// OrphanGates are gate elements without the NAT element of the same key: a claim's
	// conditions left behind by a removal outside portguard (nft delete element).
	OrphanGates []GateElement
}

// GateElement is one element of a gate map: the claim it guards, the conditions chain it
// jumps to and its owner comment.
type GateElement struct {
	Claim   hostport.Claim
	Jump    string
	Comment string

	set string // the gate map
	key []byte
}

// Observe begins a transaction and reads everything Observed holds through it, so a plan
// made from it (Remove*, RemoveGates, RemoveCondChains) commits only if nothing changed
// in between (ErrChanged otherwise).
func (t *Table) Observe() (*Tx, Observed, error) {
	tx, err := t.Begin()
	if err != nil {
		return nil, Observed{}, err
	}
	var o Observed
	o.Layout, err = t.Verify()
	if err != nil {
		return nil, Observed{}, err
	}
	o.Table = len(o.Layout) != 1 || !strings.HasPrefix(o.Layout[0], "table ")
	if o.Table {
		if o.Dump, err = t.Dump(); err != nil {
			return nil, Observed{}, err
		}
		if err := t.observeGates(&o); err != nil {
			return nil, Observed{}, err
		}
	}
	if o.Upstream, err = tx.Upstream(); err != nil {
		return nil, Observed{}, err
	}
	tables, err := t.g.ListTables()
	if err != nil {
		return nil, Observed{}, fmt.Errorf("list tables: %w", err)
	}
	for _, tb := range tables {
		if tb.Name != UpstreamTable {
			continue
		}
		switch tb.Family {
		case gnft.TableFamilyIPv4:
			o.UpstreamTables = append(o.UpstreamTables, hostport.V4)
		case gnft.TableFamilyIPv6:
			o.UpstreamTables = append(o.UpstreamTables, hostport.V6)
		}
	}
	sort.Slice(o.UpstreamTables, func(i, j int) bool { return o.UpstreamTables[i] < o.UpstreamTables[j] })
	return tx, o, nil
}

// observeGates reads the conditions chains and every gate element, and finds the orphans.
func (t *Table) observeGates(o *Observed) error {
	chains, err := t.g.ListChainsOfTableFamily(gnft.TableFamilyINet)
	if err != nil {
		return fmt.Errorf("list chains: %w", err)
	}
	for _, c := range chains {
		if c.Table != nil && c.Table.Name == TableName && strings.HasPrefix(c.Name, condChainPrefix) {
			o.CondChains = append(o.CondChains, c.Name)
		}
	}
	sort.Strings(o.CondChains)
	claimed := map[string]bool{}
	for _, e := range o.Dump.Claims {
		set, k := claimKey(e.Claim)
		claimed[set+string(k)] = true
	}
	used := map[string]bool{}
	for _, f := range hostport.Families {
		for _, hostIP := range []bool{true, false} {
			gate, nat := setName(setGateAny, f), setName(setAny, f)
			if hostIP {
				gate, nat = setName(setGateHostIP, f), setName(setHostIP, f)
			}
			gs, err := t.nl.Elems(inet, TableName, gate)
			if err != nil {
				return err
			}
			for _, g := range gs {
				used[g.Jump] = true
				if !claimed[nat+string(g.Key)] {
					o.OrphanGates = append(o.OrphanGates, GateElement{Claim: decodeKey(f, hostIP, g.Key), Jump: g.Jump, Comment: g.Comment, set: gate, key: g.Key})
				}
			}
		}
	}
	for _, c := range o.CondChains {
		if !used[c] {
			o.OrphanCondChains = append(o.OrphanCondChains, c)
		}
	}
	return nil
}

// RemoveGates deletes observed orphan gate elements (Observed.OrphanGates).
func (tx *Tx) RemoveGates(gs ...GateElement) { tx.delGates = append(tx.delGates, gs...) }

// RemoveCondChains deletes conditions chains no gate element jumps to
// (Observed.OrphanCondChains); the kernel refuses the batch (EBUSY) if one is in use.
func (tx *Tx) RemoveCondChains(names ...string) { tx.delChains = append(tx.delChains, names...) }

// repairOps are the deletions of RemoveGates, then of RemoveCondChains.
func (tx *Tx) repairOps() []nft.Op {
	var ops []nft.Op
	for _, g := range tx.delGates {
		ops = append(ops, nft.DeleteElems(inet, TableName, g.set, nft.Elem{Key: g.key})...)
	}
	for _, c := range tx.delChains {
		ops = append(ops, nft.DeleteChainIn(inet, TableName, c))
	}
	return ops
}

// Map is the map holding the element ("any4", "hostip6", ...), as nft names it.
func (e Element) Map() string { s, _ := claimKey(e.Claim); return s }

// Map is the set holding the entry ("snat4", "masqall6", ...).
func (m MasqElement) Map() string { return m.set() }

// Map is the gate map holding the element.
func (g GateElement) Map() string { return g.set }

// KeyText is a claim's key in nft syntax: "[hostIP . ]proto . port".
func KeyText(c hostport.Claim) string {
	k := fmt.Sprintf("%s . %d", c.Proto, c.HostPort)
	if !c.AnyHostIP() {
		k = c.HostIP.String() + " . " + k
	}
	return k
}

// Drop deletes portguard's table with everything in it, in one batch: for an export, once
// its claims were written in another format.
func (t *Table) Drop() error {
	t.g.DelTable(table)
	if err := t.g.Flush(); err != nil {
		return fmt.Errorf("delete table inet %s: %w", TableName, err)
	}
	return nil
}
