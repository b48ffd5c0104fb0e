package nftables

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/nft"
)

// Mapping is one host port of an attachment: the claim and the pod address it forwards to.
type Mapping struct {
	Claim hostport.Claim
	Dest  netip.AddrPort
}

// Attachment is what AddAttachment creates for one owner: its mappings (both families),
// with snat the masquerade of its pod addresses, and per family the chain of its
// conditions (from EnsureConditions; none: every packet to a claimed port is forwarded).
type Attachment struct {
	Owner      hostport.Owner
	Mappings   []Mapping
	SNAT       []SNAT
	Conditions map[hostport.Family]string
}

// RemoveClaims deletes observed elements (from Claims or Dump) in this transaction. The
// commit fails with ErrGone if one is not there any more.
func (tx *Tx) RemoveClaims(es ...Element) { tx.delNAT = append(tx.delNAT, es...) }

// RemoveMasq deletes observed masquerade entries (from Masq or Dump).
func (tx *Tx) RemoveMasq(ms ...MasqElement) { tx.delMasq = append(tx.delMasq, ms...) }

// RemoveUpstream deletes rules of upstream's cni_hostport tables (from Upstream).
func (tx *Tx) RemoveUpstream(rs ...UpstreamRule) { tx.delUp = append(tx.delUp, rs...) }

// AddAttachment creates a's elements in this transaction, each with EXCL: the commit fails
// with ErrClaimed when a key is held by anything the same transaction does not remove. It
// refuses (changing nothing) a mapping whose claim and destination disagree in family, an
// unknown protocol or a port out of range.
func (tx *Tx) AddAttachment(a Attachment) error {
	c := OwnerComment(a.Owner)
	for _, m := range a.Mappings {
		if _, ok := protoNum[m.Claim.Proto]; !ok {
			return fmt.Errorf("mapping %s: unknown protocol %q", m.Claim, m.Claim.Proto)
		}
		if m.Claim.HostPort < 1 || m.Claim.HostPort > 65535 || m.Dest.Port() == 0 {
			return fmt.Errorf("mapping %s: port out of range", m.Claim)
		}
		if !m.Dest.Addr().IsValid() || hostport.Of(m.Dest.Addr()) != m.Claim.Family ||
			(!m.Claim.AnyHostIP() && hostport.Of(m.Claim.HostIP) != m.Claim.Family) {
			return fmt.Errorf("mapping %s -> %s: addresses of another family", m.Claim, m.Dest)
		}
	}
	for f, ch := range a.Conditions {
		if ch != "" && !strings.HasPrefix(ch, condChainPrefix) {
			return fmt.Errorf("conditions of %s: %q is not a conditions chain", f, ch)
		}
	}
	for _, s := range a.SNAT {
		if !s.Pod.IsValid() {
			return fmt.Errorf("snat: pod address %v invalid", s.Pod)
		}
	}
	for _, m := range a.Mappings {
		cl := m.Claim
		if cl.AnyHostIP() {
			cl.HostIP = netip.Addr{}
		} else {
			cl.HostIP = cl.HostIP.Unmap()
		}
		d := netip.AddrPortFrom(m.Dest.Addr().Unmap(), m.Dest.Port())
		tx.addNAT = append(tx.addNAT, Element{Claim: cl, Dest: d, Owner: a.Owner, Comment: c, Gate: a.Conditions[cl.Family]})
	}
	for _, s := range a.SNAT {
		p := netip.PrefixFrom(s.Pod.Addr().Unmap(), s.Pod.Bits())
		if s.Pod.Addr().Is4In6() {
			p = netip.PrefixFrom(p.Addr(), max(s.Pod.Bits()-96, 0))
		}
		tx.addMasq = append(tx.addMasq, MasqElement{Family: hostport.Of(p.Addr()), PodIP: p.Addr(), All: s.All, Owner: a.Owner, Comment: c})
		if !s.All {
			tx.addSubnets = append(tx.addSubnets, p.Masked())
		}
	}
	return nil
}

type guardKey struct {
	f     hostport.Family
	proto string
	port  int
}

// guardOps keeps each touched port's guard in step with the transaction: a wildcard claim
// holds the value guardWildcard, hostIP claims hold their count. A creation the guard
// forbids (a wildcard beside hostIP claims that stay, or the reverse) is emitted as an
// EXCL create of the existing key, so the kernel refuses the batch: the check is the
// kernel's, not a read that another writer could outrun.
//
// The deletions and creations are grouped per map (one message each, so one ack each: a
// batch of thousands of ports would otherwise overflow the socket with acks).
func (tx *Tx) guardOps() ([]nft.Op, error) {
	type delta struct{ wildDel, specDel, wildAdd, specAdd int }
	ds := map[guardKey]*delta{}
	var order []guardKey
	get := func(c hostport.Claim) *delta {
		k := guardKey{c.Family, c.Proto, c.HostPort}
		if ds[k] == nil {
			ds[k] = &delta{}
			order = append(order, k)
		}
		return ds[k]
	}
	for _, e := range tx.delNAT {
		if e.Claim.AnyHostIP() {
			get(e.Claim).wildDel++
		} else {
			get(e.Claim).specDel++
		}
	}
	for _, e := range tx.addNAT {
		if e.Claim.AnyHostIP() {
			get(e.Claim).wildAdd++
		} else {
			get(e.Claim).specAdd++
		}
	}
	// A point lookup per port, or one dump of the guards when a batch (GC, repair) touches
	// so many ports that the lookups would cost more (~15 µs each against ~1 µs per element
	// dumped).
	var dumped map[string]uint32
	if len(order) > 256 {
		dumped = map[string]uint32{}
		for _, f := range hostport.Families {
			es, err := tx.t.nl.Elems(inet, TableName, setName(setGuard, f))
			if err != nil {
				return nil, err
			}
			for _, e := range es {
				if len(e.Data) == 4 {
					dumped[setName(setGuard, f)+string(e.Key)] = guardValue(e.Data)
				}
			}
		}
	}
	dels, adds := map[string][]nft.Elem{}, map[string][]nft.Elem{}
	for _, k := range order {
		d := ds[k]
		var obs uint32
		var exists bool
		if dumped != nil {
			obs, exists = dumped[setName(setGuard, k.f)+string(protoPort(k.proto, k.port))]
		} else {
			var err error
			if obs, exists, err = tx.t.guard(k.f, k.proto, k.port); err != nil {
				return nil, err
			}
		}
		set := setName(setGuard, k.f)
		key := protoPort(k.proto, k.port)
		// state: -1 none, 0 wildcard, n>0 hostIP claims.
		state := -1
		if exists {
			state = int(obs)
		}
		after := state
		switch {
		case state == guardWildcard && d.wildDel > 0:
			after = -1
		case state > 0:
			after = state - d.specDel
			if after <= 0 {
				after = -1
			}
		}
		final := after
		conflict := false
		if d.wildAdd > 0 {
			conflict = after != -1 || d.specAdd > 0
			final = guardWildcard
		}
		if d.specAdd > 0 && !conflict {
			if after == guardWildcard {
				conflict = true
			} else {
				final = max(after, 0) + d.specAdd
			}
		}
		if conflict {
			// The guard stays as observed and the creation is EXCL over it; when there is
			// none, the transaction holds both kinds of claim itself and creates the key twice.
			vals := []uint32{1}
			if d.wildAdd > 0 {
				vals = []uint32{guardWildcard}
			}
			if !exists {
				vals = []uint32{guardWildcard, 1}
			}
			for _, v := range vals {
				adds[set] = append(adds[set], nft.Elem{Key: key, Data: guardData(v)})
			}
			continue
		}
		if final == state {
			continue
		}
		if exists {
			dels[set] = append(dels[set], nft.Elem{Key: key})
		}
		if final != -1 {
			adds[set] = append(adds[set], nft.Elem{Key: key, Data: guardData(uint32(final))})
		}
	}
	var ops []nft.Op
	for _, f := range hostport.Families {
		if es := dels[setName(setGuard, f)]; len(es) > 0 {
			ops = append(ops, nft.DeleteElems(inet, TableName, setName(setGuard, f), es...)...)
		}
	}
	for _, f := range hostport.Families {
		if es := adds[setName(setGuard, f)]; len(es) > 0 {
			op, err := nft.AddElems(inet, TableName, setName(setGuard, f), true, es...)
			if err != nil {
				return nil, err
			}
			ops = append(ops, op...)
		}
	}
	return ops, nil
}

// Empty reports whether the transaction changes nothing.
func (tx *Tx) Empty() bool {
	return len(tx.delNAT)+len(tx.addNAT)+len(tx.delMasq)+len(tx.addMasq)+len(tx.delUp)+len(tx.delIpt)+len(tx.addSubnets)+
		len(tx.delGates)+len(tx.delChains) == 0
}

// Commit applies the transaction as one netlink batch, checked against Begin's generation:
// the changes to iptables-format chains, deletions of upstream rules, of observed elements and masquerade entries, the guards, then
// the creations (EXCL). All or nothing; errors match ErrClaimed, ErrChanged or ErrGone.
func (tx *Tx) Commit() error {
	if tx.Empty() {
		return nil
	}
	ops := append([]nft.Op(nil), tx.delIpt...)
	for _, u := range tx.delUp {
		ops = append(ops, nft.DeleteRuleIn(upstreamFamily(u.Family), UpstreamTable, u.Chain, u.Handle))
	}
	bySet := func(es []Element) (map[string][]nft.Elem, []string) {
		m := map[string][]nft.Elem{}
		var order []string
		for _, e := range es {
			set, _ := claimKey(e.Claim)
			if m[set] == nil {
				order = append(order, set)
			}
			m[set] = append(m[set], e.elem())
		}
		return m, order
	}
	masqBySet := func(ms []MasqElement) (map[string][]nft.Elem, []string) {
		m := map[string][]nft.Elem{}
		var order []string
		for _, e := range ms {
			set := e.set()
			if m[set] == nil {
				order = append(order, set)
			}
			m[set] = append(m[set], e.elem())
		}
		return m, order
	}
	del, order := bySet(tx.delNAT)
	for _, s := range order {
		ops = append(ops, nft.DeleteElems(inet, TableName, s, del[s]...)...)
	}
	gates := func(es []Element, add bool) ([]nft.Op, error) {
		m := map[string][]nft.Elem{}
		var order []string
		for _, e := range es {
			if e.Gate == "" {
				continue
			}
			set := gateSet(e.Claim)
			if m[set] == nil {
				order = append(order, set)
			}
			_, k := claimKey(e.Claim)
			m[set] = append(m[set], nft.Elem{Key: k, Jump: e.Gate, Comment: e.Comment})
		}
		var ops []nft.Op
		for _, s := range order {
			if !add {
				ops = append(ops, nft.DeleteElems(inet, TableName, s, m[s]...)...)
				continue
			}
			op, err := nft.AddElems(inet, TableName, s, true, m[s]...)
			if err != nil {
				return nil, err
			}
			ops = append(ops, op...)
		}
		return ops, nil
	}
	gdel, err := gates(tx.delNAT, false)
	if err != nil {
		return err
	}
	ops = append(ops, gdel...)
	ops = append(ops, tx.repairOps()...)
	mdel, morder := masqBySet(tx.delMasq)
	for _, s := range morder {
		ops = append(ops, nft.DeleteElems(inet, TableName, s, mdel[s]...)...)
	}
	g, err := tx.guardOps()
	if err != nil {
		return err
	}
	ops = append(ops, g...)
	add, order := bySet(tx.addNAT)
	for _, s := range order {
		op, err := nft.AddElems(inet, TableName, s, true, add[s]...)
		if err != nil {
			return err
		}
		ops = append(ops, op...)
	}
	gadd, err := gates(tx.addNAT, true)
	if err != nil {
		return err
	}
	ops = append(ops, gadd...)
	madd, morder := masqBySet(tx.addMasq)
	for _, s := range morder {
		op, err := nft.AddElems(inet, TableName, s, true, madd[s]...)
		if err != nil {
			return err
		}
		ops = append(ops, op...)
	}
	// Subnets: a plain add, which the kernel takes as a no-op for an entry that exists (it
	// is shared by every pod of the subnet and no verb deletes it).
	seen := map[netip.Prefix]bool{}
	for _, p := range tx.addSubnets {
		if seen[p] {
			continue
		}
		seen[p] = true
		op, err := nft.AddElems(inet, TableName, setName(setSubnets, hostport.Of(p.Addr())), false, subnetElem(p, "hairpin"))
		if err != nil {
			return err
		}
		ops = append(ops, op...)
	}
	err = tx.t.nl.CommitAt(tx.gen, ops...)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.ERESTART):
		return errors.Join(ErrChanged, err)
	case errors.Is(err, unix.EEXIST):
		return errors.Join(ErrClaimed, err)
	case errors.Is(err, unix.ENOENT):
		return errors.Join(ErrGone, err)
	}
	return err
}
