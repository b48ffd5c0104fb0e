package nftables

import (
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"strings"

	gnft "github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/nft"
	"github.com/portguard/portguard/pkg/xtlegacy"
)

// inet is NFPROTO_INET, the family of every object in portguard's table.
const inet = unix.NFPROTO_INET

// Table is an open connection to portguard's table in the network namespace it was opened
// in. Keep it open for the whole call: closing a netlink socket after a commit that
// deleted something waits for an RCU grace period (~12 ms, NFTABLES.md §3).
type Table struct {
	nl *nft.Conn
	g  *gnft.Conn
	// legacy reads iptables-legacy's nat tables of the same namespace (legacyClaims).
	legacy *xtlegacy.Reader
}

// Open opens the sockets in the calling thread's network namespace.
func Open() (*Table, error) {
	nl, err := nft.Open()
	if err != nil {
		return nil, err
	}
	g, err := gnft.New(gnft.AsLasting())
	if err != nil {
		nl.Close()
		return nil, fmt.Errorf("nf_tables netlink socket: %w", err)
	}
	legacy, err := xtlegacy.Open()
	if err != nil {
		nl.Close()
		g.CloseLasting()
		return nil, fmt.Errorf("legacy nat tables: %w", err)
	}
	return &Table{nl: nl, g: g, legacy: legacy}, nil
}

// Close closes the sockets.
func (t *Table) Close() error {
	t.legacy.Close()
	return errors.Join(t.g.CloseLasting(), t.nl.Close())
}

// isNotFound: a missing table, chain or set. google/nftables v0.3.0 formats the kernel's
// errno into its read errors with %v, so errors.Is cannot see it there; its text can.
func isNotFound(err error) bool {
	return err != nil && (errors.Is(err, unix.ENOENT) || strings.HasSuffix(err.Error(), unix.ENOENT.Error()))
}

// Errors of Commit, matched with errors.Is; the kernel's errno stays wrapped too.
var (
	// ErrClaimed: a created element's key exists (a claim the plan did not remove, or a
	// wildcard and a hostIP claim on one port). Nothing was changed.
	ErrClaimed = errors.New("host port already claimed")
	// ErrChanged: the ruleset changed since Begin; observe again and re-plan.
	ErrChanged = errors.New("nf_tables ruleset changed since it was read")
	// ErrGone: something the plan deletes is no longer there (or the table is missing).
	ErrGone = errors.New("an observed element is gone")
)

// Tx is one call's transaction: reads made through it are checked at Commit against the
// generation read by Begin, and every change (both families, all deletions and creations)
// is one netlink batch: all of it or nothing.
type Tx struct {
	t   *Table
	gen uint32

	delNAT  []Element
	addNAT  []Element
	delMasq []MasqElement
	addMasq []MasqElement
	delUp   []UpstreamRule
	delIpt  []nft.Op // iptables-format claims taken over (RemoveIptables)

	addSubnets []netip.Prefix

	// Repair only (observe.go): orphan gate elements and conditions chains.
	delGates  []GateElement
	delChains []string
}

// Begin starts a transaction at the current ruleset generation.
func (t *Table) Begin() (*Tx, error) {
	g, err := t.nl.GenID()
	if err != nil {
		return nil, err
	}
	return &Tx{t: t, gen: g}, nil
}

// lookup reads a claim's element and, when there is one, its gate.
func (t *Table) lookup(c hostport.Claim) (Element, bool, error) {
	set, key := claimKey(c)
	e, ok, err := t.nl.Elem(inet, TableName, set, key)
	if err != nil || !ok {
		return Element{}, ok, err
	}
	el, err := decodeElement(c.Family, !c.AnyHostIP(), e)
	if err != nil {
		return Element{}, false, err
	}
	g, ok, err := t.nl.Elem(inet, TableName, gateSet(c), key)
	if err != nil {
		return Element{}, false, err
	}
	if ok {
		el.Gate = g.Jump
	}
	return el, true, nil
}

// guard reads a port's guard value; ok is false when the port has no claim.
func (t *Table) guard(f hostport.Family, proto string, port int) (v uint32, ok bool, err error) {
	e, ok, err := t.nl.Elem(inet, TableName, setName(setGuard, f), protoPort(proto, port))
	if err != nil || !ok {
		return 0, ok, err
	}
	if len(e.Data) != 4 {
		return 0, false, fmt.Errorf("guard element of %d bytes", len(e.Data))
	}
	return guardValue(e.Data), true, nil
}

// Claims returns every element that conflicts with one of the claims (hostport's rule:
// same family, protocol and port, host IPs equal or either one the wildcard), the caller's
// own included, each once. Point lookups: for a hostIP claim its key and the port's
// wildcard; for a wildcard claim its key, and only when the port's guard counts hostIP
// claims, the hostIP map (read whole, filtered by port: the one case a key cannot name).
func (tx *Tx) Claims(claims ...hostport.Claim) ([]Element, error) {
	seen := map[string]bool{}
	var out []Element
	keep := func(e Element) {
		set, k := claimKey(e.Claim)
		id := set + string(k)
		if !seen[id] {
			seen[id] = true
			out = append(out, e)
		}
	}
	var dumped map[hostport.Family][]Element
	for _, c := range claims {
		wild := c
		wild.HostIP = netip.Addr{}
		probe := []hostport.Claim{wild}
		if !c.AnyHostIP() {
			probe = append(probe, c)
		}
		for _, p := range probe {
			e, ok, err := tx.t.lookup(p)
			if err != nil {
				return nil, err
			}
			if ok {
				keep(e)
			}
		}
		if !c.AnyHostIP() {
			continue
		}
		v, ok, err := tx.t.guard(c.Family, c.Proto, c.HostPort)
		if err != nil {
			return nil, err
		}
		if !ok || v == guardWildcard {
			continue
		}
		if dumped == nil {
			dumped = map[hostport.Family][]Element{}
		}
		if _, done := dumped[c.Family]; !done {
			es, err := tx.t.elements(c.Family, true)
			if err != nil {
				return nil, err
			}
			dumped[c.Family] = es
		}
		for _, e := range dumped[c.Family] {
			if e.Claim.Conflicts(c) {
				keep(e)
			}
		}
	}
	return out, nil
}

// Masq returns the masquerade entries of the given pod addresses (a point lookup in each
// of the family's two sets per address).
func (tx *Tx) Masq(pods ...netip.Addr) ([]MasqElement, error) {
	var out []MasqElement
	for _, p := range pods {
		p = p.Unmap()
		for _, all := range []bool{false, true} {
			m := MasqElement{Family: hostport.Of(p), PodIP: p, All: all}
			e, ok, err := tx.t.nl.Elem(inet, TableName, m.set(), m.elem().Key)
			if err != nil {
				return nil, err
			}
			if ok {
				m.Comment = e.Comment
				m.Owner, _ = ParseOwner(e.Comment)
				out = append(out, m)
			}
		}
	}
	return out, nil
}

func (t *Table) elements(f hostport.Family, hostIP bool) ([]Element, error) {
	set, gate := setName(setAny, f), setName(setGateAny, f)
	if hostIP {
		set, gate = setName(setHostIP, f), setName(setGateHostIP, f)
	}
	es, err := t.nl.Elems(inet, TableName, set)
	if err != nil {
		return nil, err
	}
	gs, err := t.nl.Elems(inet, TableName, gate)
	if err != nil {
		return nil, err
	}
	gates := make(map[string]string, len(gs))
	for _, g := range gs {
		gates[string(g.Key)] = g.Jump
	}
	out := make([]Element, 0, len(es))
	for _, e := range es {
		d, err := decodeElement(f, hostIP, e)
		if err != nil {
			return nil, err
		}
		d.Gate = gates[string(e.Key)]
		out = append(out, d)
	}
	return out, nil
}

// Dump is every claim and masquerade entry of the table, for audit and GC (the verbs use
// Tx.Claims and Tx.Masq). Claims are sorted by family, protocol, port and host IP.
type Dump struct {
	Claims []Element
	Masq   []MasqElement
	// Subnets are the hairpin entries (pod subnets with snat); verbs only add them.
	Subnets []netip.Prefix
}

// Dump reads the whole table's elements (a missing table reads as empty).
func (t *Table) Dump() (Dump, error) {
	var d Dump
	for _, f := range hostport.Families {
		for _, hostIP := range []bool{true, false} {
			es, err := t.elements(f, hostIP)
			if err != nil {
				return Dump{}, err
			}
			d.Claims = append(d.Claims, es...)
		}
		for _, all := range []bool{false, true} {
			m := MasqElement{Family: f, All: all}
			es, err := t.nl.Elems(inet, TableName, m.set())
			if err != nil {
				return Dump{}, err
			}
			for _, e := range es {
				a, ok := addrFrom(e.Key)
				if !ok {
					return Dump{}, fmt.Errorf("element of %d bytes in %s", len(e.Key), m.set())
				}
				m.PodIP, m.Comment = a, e.Comment
				m.Owner, _ = ParseOwner(e.Comment)
				d.Masq = append(d.Masq, m)
			}
		}
		ss, err := t.nl.Elems(inet, TableName, setName(setSubnets, f))
		if err != nil {
			return Dump{}, err
		}
		for _, e := range ss {
			if p, ok := decodeSubnet(f, e); ok {
				d.Subnets = append(d.Subnets, p)
			}
		}
	}
	sort.SliceStable(d.Claims, func(i, j int) bool {
		a, b := d.Claims[i].Claim, d.Claims[j].Claim
		if a.Family != b.Family {
			return a.Family < b.Family
		}
		if a.Proto != b.Proto {
			return a.Proto < b.Proto
		}
		if a.HostPort != b.HostPort {
			return a.HostPort < b.HostPort
		}
		return a.HostIP.Less(b.HostIP)
	})
	return d, nil
}
