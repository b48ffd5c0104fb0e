package nftables

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"sort"
	"strings"
	"time"

	"github.com/portguard/portguard/pkg/backend"
	"github.com/portguard/portguard/pkg/config"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/lock"
)

// The verbs live in this package rather than in an adapter package, as the iptables
// backend's live in pkg/backend/iptables: a verb is a few calls of the transaction API
// above, and its kernel tests share this package's namespace helpers. The imports still
// point one way (pkg/backend and pkg/config know nothing of nftables).

// maxAttempts bounds the observe-plan-commit loop of a verb: another writer committed in
// between (ErrChanged), created a key first (ErrClaimed) or removed one the plan deletes
// (ErrGone); each time the verb observes again (after a random pause, see pause) and, for
// ADD, decides again. Past it, ADD and DEL finish under the exclusive lock (Add, Del).
const maxAttempts = 5

// Backend runs the verbs in portguard's inet table (backend.Backend). Every change of a
// call is one netlink batch, atomic over both families: there is no half-applied state for
// a concurrent ADD of the same port to see, and two batches claiming one key are refused
// by the kernel (EXCL), not by the lock. Add asks for the exclusive lock
// (backend.ErrNeedExclusive) only when its batches kept being refused under the shared one.
type Backend struct {
	t *Table
	// delConf is the configuration of a Del that left its removal to DelRest.
	delConf *config.Config
}

// New returns the nftables backend; it opens its sockets on first use, in the calling
// thread's network namespace.
func New() *Backend { return &Backend{} }

func (b *Backend) table() (*Table, error) {
	if b.t != nil {
		return b.t, nil
	}
	t, err := Open()
	if err != nil {
		return nil, err
	}
	b.t = t
	return t, nil
}

// Close closes the sockets (after the call's last commit, before the engine's lock goes).
func (b *Backend) Close() {
	if b.t != nil {
		_ = b.t.Close()
		b.t = nil
	}
}

// HandOver does nothing: no child process outlives a call.
func (b *Backend) HandOver(*lock.Lock) {}

// Status checks that nf_tables answers in this network namespace (a netlink socket and
// a read of the tables), without a lock and without reading portguard's elements.
func (b *Backend) Status() error {
	t, err := Open()
	if err != nil {
		return fmt.Errorf("nf_tables: %w", err)
	}
	defer t.Close()
	if _, err := t.g.ListTables(); err != nil {
		return fmt.Errorf("nf_tables: list tables: %w", err)
	}
	return nil
}

// desired is what an attachment should have in the table.
type desired struct {
	att    Attachment
	claims []hostport.Claim
	pods   []netip.Addr
}

// want builds the attachment of c for owner: a mapping per claim in every family the pod
// has an address in, snat entries for those addresses, the families' conditions chains.
func want(c *config.Config, owner hostport.Owner, conds map[hostport.Family]string) desired {
	d := desired{att: Attachment{Owner: owner, Conditions: conds}}
	for _, f := range hostport.Families {
		p, ok := c.PodIPs[f]
		if !ok {
			continue
		}
		mapped := false
		for _, m := range c.Mappings {
			if !m.AppliesTo(f) {
				continue
			}
			mapped = true
			cl := m.Claim(f)
			if !cl.AnyHostIP() {
				cl.HostIP = cl.HostIP.Unmap()
			}
			d.claims = append(d.claims, cl)
			d.att.Mappings = append(d.att.Mappings, Mapping{Claim: cl, Dest: netip.AddrPortFrom(p.Addr().Unmap(), uint16(m.ContainerPort))})
		}
		if !mapped {
			continue
		}
		d.pods = append(d.pods, p.Addr().Unmap())
		if c.SNAT {
			d.att.SNAT = append(d.att.SNAT, SNAT{Pod: p, All: c.MasqAll})
		}
	}
	return d
}

// same reports whether element e is exactly mapping m of owner with gate g.
func same(e Element, m Mapping, owner hostport.Owner, gate string) bool {
	return e.OwnedBy(owner) && e.Claim == m.Claim && e.Dest == m.Dest && e.Gate == gate
}

// upstreamOwner names the owner of an upstream rule: upstream writes the container ID
// only, so the network is unknown.
func upstreamOwner(u UpstreamRule) hostport.Owner { return hostport.Owner{ContainerID: u.ContainerID} }

func upstreamChain(u UpstreamRule) string {
	return fmt.Sprintf("%s %s/%s", u.Family, UpstreamTable, u.Chain)
}

// elemChain names where an element lives, for Takeover.Chain and Conflict.Chain: the
// table and the owner's comment (which is also how hashed owners are told apart).
func elemChain(e Element) string { return "inet " + TableName + " " + e.Comment }

// addPlan is one observation's plan of ADD.
type addPlan struct {
	tx        *Tx
	takeovers []backend.Takeover
	conflicts []backend.Conflict
	masqGone  map[string]bool // set and pod address of the masquerade entries removed
}

// removeMasq removes m once (a second deletion in one batch would fail it).
func (p *addPlan) removeMasq(m MasqElement) {
	k := m.set() + "/" + m.PodIP.String()
	if p.masqGone[k] {
		return
	}
	if p.masqGone == nil {
		p.masqGone = map[string]bool{}
	}
	p.masqGone[k] = true
	p.tx.RemoveMasq(m)
}

// plan observes the claims, masquerade entries and upstream rules the attachment touches
// and fills a transaction: this owner's elements that differ are replaced, identical ones
// kept; every conflicting claim of another owner (and its upstream masquerade rule) is
// removed and reported as a takeover and a conflict, for Decide to judge.
func (b *Backend) plan(t *Table, d desired, owner hostport.Owner) (addPlan, error) {
	tx, err := t.Begin()
	if err != nil {
		return addPlan{}, err
	}
	p := addPlan{tx: tx}
	es, err := tx.Claims(d.claims...)
	if err != nil {
		return addPlan{}, err
	}
	keep := map[int]bool{}
	byVictim := map[string]int{}
	take := func(f hostport.Family, from hostport.Owner, chain string, cl hostport.Claim, dest string) {
		k := f.String() + "\x00" + chain
		i, ok := byVictim[k]
		if !ok {
			i = len(p.takeovers)
			byVictim[k] = i
			p.takeovers = append(p.takeovers, backend.Takeover{Family: f.String(), From: from, Chain: chain, For: owner, ChainRemoved: true})
		}
		p.takeovers[i].Claims = append(p.takeovers[i].Claims, cl)
		p.takeovers[i].Destinations = append(p.takeovers[i].Destinations, dest)
		p.conflicts = append(p.conflicts, backend.Conflict{Owner: from, Chain: chain, Claim: cl, Dest: dest})
	}
	for _, e := range es {
		if e.OwnedBy(owner) {
			found := false
			for i, m := range d.att.Mappings {
				if !keep[i] && same(e, m, owner, d.att.Conditions[m.Claim.Family]) {
					keep[i], found = true, true
					break
				}
			}
			if !found {
				tx.RemoveClaims(e)
			}
			continue
		}
		tx.RemoveClaims(e)
		take(e.Claim.Family, e.Owner, elemChain(e), e.Claim, e.Dest.String())
	}
	ups, err := tx.Upstream()
	if err != nil {
		return addPlan{}, err
	}
	victims := map[string]bool{}
	for _, u := range ups {
		if u.Chain != UpstreamHostports {
			continue
		}
		for _, c := range d.claims {
			if !u.Claim.Conflicts(c) {
				continue
			}
			tx.RemoveUpstream(u)
			victims[u.Family.String()+"/"+u.ContainerID] = true
			if u.ContainerID != owner.ContainerID {
				take(u.Family, upstreamOwner(u), upstreamChain(u), u.Claim, u.Dest.String())
			}
			break
		}
	}
	for _, u := range ups {
		if u.Chain == UpstreamMasquerades && victims[u.Family.String()+"/"+u.ContainerID] {
			tx.RemoveUpstream(u)
		}
	}
	// iptables-format claims on the same ports (iptables' nat runs first): taken over in
	// this batch, judged like the others.
	for _, f := range hostport.Families {
		cs := claimsOf(d.claims, f)
		if len(cs) == 0 {
			continue
		}
		if legacy, err := t.legacyClaims(f, cs); err != nil {
			return addPlan{}, err
		} else if len(legacy) > 0 {
			return addPlan{}, refuseLegacy(legacy)
		}
		v, err := t.observeIptables(f, owner, cs)
		if err != nil {
			return addPlan{}, err
		}
		ip, err := t.planIptables(v, owner, cs)
		if err != nil {
			return addPlan{}, err
		}
		tx.RemoveIptables(ip.ops...)
		p.takeovers = append(p.takeovers, ip.takeovers...)
		p.conflicts = append(p.conflicts, ip.conflicts...)
	}
	// A victim left with no claim loses its masquerade entries too, and its takeover says
	// so (ChainRemoved: the engine then drops its record). Takeovers are rare, so the
	// whole table is read only then.
	if err := p.finishVictims(t, es); err != nil {
		return addPlan{}, err
	}
	// Masquerade entries are keyed by pod address: the pod's addresses are this
	// attachment's now, so an entry of another owner is a dead one's, and goes.
	ms, err := tx.Masq(d.pods...)
	if err != nil {
		return addPlan{}, err
	}
	if err := p.dropOwnLeftovers(t, d, owner, es, ms); err != nil {
		return addPlan{}, err
	}
	wantMasq := map[netip.Addr]SNAT{}
	for _, s := range d.att.SNAT {
		wantMasq[s.Pod.Addr().Unmap()] = s
	}
	keepMasq := map[netip.Addr]bool{}
	for _, m := range ms {
		if s, ok := wantMasq[m.PodIP]; ok && m.OwnedBy(owner) && m.All == s.All && !keepMasq[m.PodIP] {
			keepMasq[m.PodIP] = true
			continue
		}
		p.removeMasq(m)
	}
	a := Attachment{Owner: owner, Conditions: d.att.Conditions}
	for i, m := range d.att.Mappings {
		if !keep[i] {
			a.Mappings = append(a.Mappings, m)
		}
	}
	for _, s := range d.att.SNAT {
		if !keepMasq[s.Pod.Addr().Unmap()] {
			a.SNAT = append(a.SNAT, s)
		}
	}
	if err := tx.AddAttachment(a); err != nil {
		return addPlan{}, err
	}
	return p, nil
}

// dropOwnLeftovers handles a re-ADD whose mappings or pod addresses changed: when the owner
// already holds an element at one of the new keys or a masquerade entry of the pod's
// addresses (what a first ADD never finds), the whole table is read once and the owner's
// claims under other keys and masquerade entries of other addresses are removed in the same
// batch, so the ports it no longer maps are freed. A first ADD, and a re-ADD that finds
// nothing of its own at the new keys and addresses (every mapping and address changed,
// without snat), reads no more than the keys.
func (p *addPlan) dropOwnLeftovers(t *Table, d desired, owner hostport.Owner, es []Element, ms []MasqElement) error {
	again := false
	for _, e := range es {
		again = again || e.OwnedBy(owner)
	}
	for _, m := range ms {
		again = again || m.OwnedBy(owner)
	}
	if !again {
		return nil
	}
	dump, err := t.Dump()
	if err != nil {
		return err
	}
	observed := map[string]bool{} // the keys plan already decided on
	for _, e := range es {
		set, k := claimKey(e.Claim)
		observed[set+string(k)] = true
	}
	for _, e := range dump.Claims {
		set, k := claimKey(e.Claim)
		if e.OwnedBy(owner) && !observed[set+string(k)] {
			p.tx.RemoveClaims(e)
		}
	}
	pods := map[netip.Addr]bool{}
	for _, a := range d.pods {
		pods[a] = true
	}
	for _, m := range dump.Masq {
		if m.OwnedBy(owner) && !pods[m.PodIP] {
			p.removeMasq(m)
		}
	}
	return nil
}

// finishVictims removes the masquerade entries of a family of every element owner taken
// over whose claims of that family all go in this transaction, and marks the takeovers of
// owners that keep some claim (of any family) as not complete (ChainRemoved false).
func (p *addPlan) finishVictims(t *Table, removed []Element) error {
	if len(p.takeovers) == 0 {
		return nil
	}
	dump, err := t.Dump()
	if err != nil {
		return err
	}
	gone := map[string]bool{}
	for _, e := range removed {
		_, k := claimKey(e.Claim)
		gone[e.Claim.Family.String()+string(k)+e.Comment] = true
	}
	keeps := map[string]bool{}   // comment -> some claim stays
	keepsIn := map[string]bool{} // family and comment -> some claim of that family stays
	for _, e := range dump.Claims {
		_, k := claimKey(e.Claim)
		if !gone[e.Claim.Family.String()+string(k)+e.Comment] {
			keeps[e.Comment] = true
			keepsIn[e.Claim.Family.String()+"/"+e.Comment] = true
		}
	}
	for i := range p.takeovers {
		tk := &p.takeovers[i]
		comment, ok := strings.CutPrefix(tk.Chain, "inet "+TableName+" ")
		if !ok {
			continue // an upstream rule
		}
		// The record goes only with the owner's last claim (of any family); the masquerade
		// entry of a family goes with the owner's last claim of that family, or a dual-stack
		// victim that keeps the other family would leave it behind for good.
		tk.ChainRemoved = !keeps[comment]
		if keepsIn[tk.Family+"/"+comment] {
			continue
		}
		for _, m := range dump.Masq {
			if m.Comment == comment && m.Family.String() == tk.Family {
				p.removeMasq(m)
			}
		}
	}
	return nil
}

// retryable: another writer got in between observation and commit.
func retryable(err error) bool {
	return errors.Is(err, ErrChanged) || errors.Is(err, ErrClaimed) || errors.Is(err, ErrGone)
}

// Add installs the attachment in one batch (see Backend): the layout and the conditions
// chains are ensured first, then the claims are observed, every conflict goes through
// h.Decide before anything of the attachment is written, h.Record runs before the first
// commit, and the batch removes this owner's outdated elements, the taken-over claims
// (upstream cni_hostport rules and iptables-nft CNI-DN claims included, see
// iptclaims.go) and this owner's iptables-format leftover, and creates the missing ones.
// An iptables-legacy claim on a claimed port ends the call (backend.ErrInUse) before
// anything of the attachment is written: netlink cannot remove it. A re-ADD of the same
// attachment commits nothing; a re-ADD with other mappings or pod addresses also removes
// the owner's claims and masquerade entries it no longer wants (dropOwnLeftovers: a re-ADD
// reads the whole table, a first ADD only its keys). When another writer commits in
// between, it observes, plans and decides again, up to maxAttempts times; under the shared
// lock (parallel), then it asks for the exclusive lock (backend.ErrNeedExclusive) and is
// called again there, where no other portguard call commits: the generation a batch is
// checked against changes with every commit in the network namespace, so many parallel
// calls (a node's pods all starting at once) can keep refusing each other's batches for
// longer than the attempts last (measured: 13 of 100 calls of test/stress's storm failed so
// before).
func (b *Backend) Add(c *config.Config, owner hostport.Owner, parallel bool, h backend.Hooks) ([]backend.Takeover, error) {
	t, err := b.table()
	if err != nil {
		return nil, err
	}
	if _, err := t.Ensure(); err != nil {
		return nil, err
	}
	conds := map[hostport.Family]string{}
	for f, nc := range c.NFTConditions {
		if _, ok := c.PodIPs[f]; !ok {
			continue
		}
		ch, err := t.EnsureConditions(nc)
		if err != nil {
			return nil, err
		}
		if ch != "" {
			conds[f] = ch
		}
	}
	d := want(c, owner, conds)
	if len(d.claims) == 0 {
		return nil, nil
	}
	recorded := false
	var last error
	for attempt := range maxAttempts {
		if attempt > 0 {
			pause(attempt)
		}
		p, err := b.plan(t, d, owner)
		if err != nil {
			return nil, err
		}
		if len(p.takeovers) > 0 || len(p.conflicts) > 0 {
			if err := h.CallDecide(p.takeovers, p.conflicts); err != nil {
				return nil, err
			}
		}
		if p.tx.Empty() {
			return nil, nil
		}
		if !recorded {
			if err := h.CallRecord(); err != nil {
				return nil, err
			}
			recorded = true
		}
		err = p.tx.Commit()
		if err == nil {
			for _, tk := range p.takeovers {
				h.CallApplied(tk)
			}
			return p.takeovers, nil
		}
		if !retryable(err) {
			return nil, err
		}
		last = err
	}
	if parallel {
		return nil, backend.ErrNeedExclusive
	}
	return nil, fmt.Errorf("ADD of %s: the table kept changing after %d attempts: %w", owner, maxAttempts, last)
}

// removeOwner removes the owner's elements, masquerade entries and, of upstream's tables,
// the rules naming the owner's container ID whose destination is one of the pod's
// addresses (when the call knows them: upstream's comments lack the network, so this
// keeps a DEL in one network from removing the container's rules of another).
func (b *Backend) removeOwner(tx *Tx, dump Dump, owner hostport.Owner, pods map[hostport.Family]netip.Prefix) (bool, error) {
	any := false
	for _, e := range dump.Claims {
		if e.OwnedBy(owner) {
			tx.RemoveClaims(e)
			any = true
		}
	}
	for _, m := range dump.Masq {
		if m.OwnedBy(owner) {
			tx.RemoveMasq(m)
			any = true
		}
	}
	if pods == nil {
		return any, nil
	}
	up, err := b.removeUpstream(tx, owner, pods)
	return any || up, err
}

// removeUpstream adds to tx the removal of upstream's rules naming the owner's container
// whose destination is one of the pod's addresses, and reports whether there were any.
func (b *Backend) removeUpstream(tx *Tx, owner hostport.Owner, pods map[hostport.Family]netip.Prefix) (bool, error) {
	ups, err := tx.Upstream()
	if err != nil {
		return false, err
	}
	any := false
	for _, u := range ups {
		if u.ContainerID != owner.ContainerID {
			continue
		}
		p, ok := pods[u.Family]
		if !ok || u.Dest.Addr().Unmap() != p.Addr().Unmap() {
			continue
		}
		tx.RemoveUpstream(u)
		any = true
	}
	return any, nil
}

// Del removes the attachment's elements, masquerade entries, upstream-format leftovers of
// this container and its own iptables-format chain (iptLeftoverOps: an attachment ADDed
// by an iptables backend before the node switched) in one batch; nothing of it there is
// success (idempotent).
//
// It finds them by key: the claims of the DEL's portMappings in each family (the pod's, or
// both when the DEL carries no prevResult), the masquerade entries of the pod's addresses and
// of the destinations of the claims found, the iptables chain by its name, so its cost does
// not grow with the table. Only a DEL that carries no portMappings, or finds no claim of the
// owner at its keys (a repeated DEL, a DEL after a takeover, or mappings other than ADD's),
// reads the whole table (Dump) to find what is left. A DEL whose mappings share only some
// keys with ADD's leaves the claims under the others: they are the owner's until GC, or
// until an ADD of their port finds the owner gone and takes them over. When other calls
// kept committing for all its attempts (see Add), it leaves the removal to DelRest, under
// the exclusive lock: rest is then every family.
func (b *Backend) Del(c *config.Config, owner hostport.Owner) ([]hostport.Family, error) {
	t, err := b.table()
	if err != nil {
		return nil, backend.Mark(err, backend.ErrUnusable)
	}
	err = b.del(t, c, owner)
	if err != nil && retryable(err) {
		b.delConf = c
		return hostport.Families, nil
	}
	return nil, err
}

// del is one DEL's removal (see Del): by key, or from the whole table.
func (b *Backend) del(t *Table, c *config.Config, owner hostport.Owner) error {
	if claims := delClaims(c); len(claims) > 0 {
		found := false
		err := t.retry("DEL of "+owner.String(), func(tx *Tx) (err error) {
			if found, err = b.removeByKey(tx, claims, owner, c.PodIPs); err != nil || !found {
				return err
			}
			return t.removeIptLeftovers(tx, owner)
		})
		if err != nil || found {
			return err
		}
	}
	return t.rewrite("DEL of "+owner.String(), func(tx *Tx, dump Dump) error {
		if _, err := b.removeOwner(tx, dump, owner, c.PodIPs); err != nil {
			return err
		}
		return t.removeIptLeftovers(tx, owner)
	})
}

// removeIptLeftovers adds to tx the removal of the owner's own iptables-format chain in
// each family (iptLeftoverOps; a point read when there is none).
func (t *Table) removeIptLeftovers(tx *Tx, owner hostport.Owner) error {
	for _, f := range hostport.Families {
		ops, err := t.iptLeftoverOps(f, owner)
		if err != nil {
			return err
		}
		tx.RemoveIptables(ops...)
	}
	return nil
}

// delClaims are the keys a DEL looks the attachment up by: each mapping's claim in every
// family it applies to, restricted to the pod's families when the DEL knows them.
func delClaims(c *config.Config) []hostport.Claim {
	var out []hostport.Claim
	for _, f := range hostport.Families {
		if _, ok := c.PodIPs[f]; !ok && len(c.PodIPs) > 0 {
			continue
		}
		for _, cl := range c.Claims(f) {
			if !cl.AnyHostIP() {
				cl.HostIP = cl.HostIP.Unmap()
			}
			out = append(out, cl)
		}
	}
	return out
}

// removeByKey adds to tx the removal of the owner's elements at the claims' keys, of its
// masquerade entries for the pod's addresses and the destinations found, and of upstream's
// rules of this container (as removeOwner). It reports whether it found an element of the
// owner at one of the keys; when not, the caller discards tx: the owner's elements, if any,
// are under other keys, and its masquerade entries go with them.
func (b *Backend) removeByKey(tx *Tx, claims []hostport.Claim, owner hostport.Owner, pods map[hostport.Family]netip.Prefix) (bool, error) {
	found := false
	var addrs []netip.Addr
	seen := map[netip.Addr]bool{}
	addr := func(a netip.Addr) {
		if a = a.Unmap(); a.IsValid() && !seen[a] {
			seen[a] = true
			addrs = append(addrs, a)
		}
	}
	for _, p := range pods {
		addr(p.Addr())
	}
	done := map[string]bool{}
	for _, cl := range claims {
		set, k := claimKey(cl)
		if done[set+string(k)] {
			continue
		}
		done[set+string(k)] = true
		e, ok, err := tx.t.lookup(cl)
		if err != nil {
			return false, err
		}
		if ok && e.OwnedBy(owner) {
			tx.RemoveClaims(e)
			addr(e.Dest.Addr())
			found = true
		}
	}
	if !found {
		return false, nil
	}
	ms, err := tx.Masq(addrs...)
	if err != nil {
		return false, err
	}
	for _, m := range ms {
		if m.OwnedBy(owner) {
			tx.RemoveMasq(m)
		}
	}
	if pods != nil {
		if _, err := b.removeUpstream(tx, owner, pods); err != nil {
			return false, err
		}
	}
	return true, nil
}

// DelRest finishes a Del whose batches kept being refused under the shared lock: the same
// removal, under the exclusive lock. It has nothing to do after any other Del.
func (b *Backend) DelRest(owner hostport.Owner, _ []hostport.Family) error {
	c := b.delConf
	if c == nil {
		return nil
	}
	b.delConf = nil
	t, err := b.table()
	if err != nil {
		return backend.Mark(err, backend.ErrUnusable)
	}
	return b.del(t, c, owner)
}

// Check reports what differs from the attachment c describes: the layout (Verify), each
// claim's element (present, this owner's, the right destination and conditions), the
// masquerade entries with snat, and what would shadow a claim because it DNATs first:
// upstream cni_hostport rules for the same port, iptables CNI claims of the same port
// (iptables-nft and iptables-legacy, live or not), and nat chains of other tables hooked
// before iptables' nat (priority below -100; those at -100, iptables' nat and kube-proxy,
// run first by design, see PriorityDNAT).
func (b *Backend) Check(c *config.Config, owner hostport.Owner) ([]string, error) {
	t, err := b.table()
	if err != nil {
		return nil, err
	}
	problems, err := t.Verify()
	if err != nil {
		return nil, err
	}
	conds := map[hostport.Family]string{}
	for f, nc := range c.NFTConditions {
		conds[f] = CondChain(nc)
	}
	d := want(c, owner, conds)
	tx, err := t.Begin()
	if err != nil {
		return nil, err
	}
	for _, m := range d.att.Mappings {
		es, err := tx.Claims(m.Claim)
		if err != nil {
			return nil, err
		}
		ok := false
		for _, e := range es {
			if same(e, m, owner, conds[m.Claim.Family]) {
				ok = true
			} else if !e.OwnedBy(owner) {
				problems = append(problems, fmt.Sprintf("%s is also claimed: %s", m.Claim, e))
			}
		}
		if !ok {
			problems = append(problems, fmt.Sprintf("%s -> %s: no element of %s in inet %s", m.Claim, m.Dest, owner, TableName))
		}
	}
	if len(d.att.SNAT) > 0 {
		ms, err := tx.Masq(d.pods...)
		if err != nil {
			return nil, err
		}
		for _, s := range d.att.SNAT {
			ok := false
			for _, m := range ms {
				ok = ok || (m.PodIP == s.Pod.Addr().Unmap() && m.All == s.All && m.OwnedBy(owner))
			}
			if !ok {
				problems = append(problems, fmt.Sprintf("snat of %s: no masquerade entry of %s", s.Pod.Addr(), owner))
			}
		}
	}
	ups, err := tx.Upstream()
	if err != nil {
		return nil, err
	}
	for _, u := range ups {
		if u.Chain != UpstreamHostports {
			continue
		}
		for _, cl := range d.claims {
			if u.Claim.Conflicts(cl) {
				problems = append(problems, fmt.Sprintf("%s is shadowed by upstream portmap's rule in %s (container %s -> %s)", cl, upstreamChain(u), u.ContainerID, u.Dest))
				break
			}
		}
	}
	for _, f := range hostport.Families {
		cs := claimsOf(d.claims, f)
		if len(cs) == 0 {
			continue
		}
		if legacy, err := t.legacyClaims(f, cs); err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", f, err))
		} else {
			for _, l := range legacy {
				problems = append(problems, l+": it runs before portguard's claims")
			}
		}
		v, err := t.observeIptables(f, owner, cs)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", f, err))
			continue
		}
		problems = append(problems, iptShadows(v, owner, cs)...)
	}
	earlier, err := t.EarlierNAT()
	if err != nil {
		return nil, err
	}
	for _, ch := range earlier {
		if ch.Priority < -100 {
			problems = append(problems, fmt.Sprintf("nat chain %s runs before portguard's and may shadow its claims", ch))
		}
	}
	return problems, nil
}

// GC removes, in one batch, every element and masquerade entry of network whose container
// ID is not in valid, and those of suspects whose comment is a hash (owners too long to
// be named in a comment). It returns the owners removed.
func (b *Backend) GC(network string, valid map[string]bool, suspects []hostport.Owner) ([]hostport.Owner, error) {
	t, err := b.table()
	if err != nil {
		return nil, err
	}
	var gone map[hostport.Owner]bool
	err = t.rewrite("GC of "+network, func(tx *Tx, dump Dump) error {
		gone = map[hostport.Owner]bool{}
		stale := func(comment string, o hostport.Owner) (hostport.Owner, bool) {
			if !o.IsZero() {
				return o, o.Network == network && !valid[o.ContainerID]
			}
			for _, s := range suspects {
				if s.Network == network && !valid[s.ContainerID] && OwnerComment(s) == comment {
					return s, true
				}
			}
			return hostport.Owner{}, false
		}
		for _, e := range dump.Claims {
			if o, ok := stale(e.Comment, e.Owner); ok {
				tx.RemoveClaims(e)
				gone[o] = true
			}
		}
		for _, m := range dump.Masq {
			if o, ok := stale(m.Comment, m.Owner); ok {
				tx.RemoveMasq(m)
				gone[o] = true
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	out := make([]hostport.Owner, 0, len(gone))
	for o := range gone {
		out = append(out, o)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].String() < out[j].String() })
	return out, nil
}

// rewrite runs one read-plan-commit round over the whole table: plan adds its changes to a
// transaction begun before the Dump it is given (see retry).
func (t *Table) rewrite(what string, plan func(tx *Tx, dump Dump) error) error {
	return t.retry(what, func(tx *Tx) error {
		dump, err := t.Dump()
		if err != nil {
			return err
		}
		return plan(tx, dump)
	})
}

// retry runs read-plan-commit rounds: plan reads through the transaction it is given and
// adds its changes. A commit refused because the ruleset changed meanwhile (retryable: the
// generation is the whole ruleset's, so any writer, kube-proxy included, moves it) starts a
// new round after a short random pause, at most maxAttempts; what names the call in the
// error when the table kept changing.
func (t *Table) retry(what string, plan func(tx *Tx) error) error {
	var last error
	for attempt := range maxAttempts {
		if attempt > 0 {
			pause(attempt)
		}
		tx, err := t.Begin()
		if err != nil {
			return err
		}
		if err := plan(tx); err != nil {
			return err
		}
		err = tx.Commit()
		if err == nil || !retryable(err) {
			return err
		}
		last = err
	}
	return fmt.Errorf("%s: the table kept changing after %d attempts: %w", what, maxAttempts, last)
}

// pause sleeps a random time of up to attempt milliseconds, so that writers that keep
// refusing each other's generation (a drain's parallel DELs) fall out of step.
func pause(attempt int) {
	time.Sleep(time.Duration(rand.Int64N(int64(attempt) * int64(time.Millisecond))))
}

var _ backend.Backend = (*Backend)(nil)
