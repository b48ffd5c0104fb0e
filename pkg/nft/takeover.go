package nft

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
)

// A takeover of one port from a big attachment (a podman port range: 20,000 mappings,
// 60,000 rules) must not read the victim's chain whole: the kernel's dump of it alone
// takes seconds, and so does any iptables-restore line that names the chain (iptables-nft
// then fetches all of it). So the rules of the contested ports are found by handle, and
// taken from by handle after the new claim is in (TakenRules, TakeFrom).

// MinProbedRules is the size from which a victim's chain is probed rather than read: a
// dump of a smaller chain costs less than the probes' round trips add up to. (A variable
// so that tests can probe small chains.)
var MinProbedRules = 256

// probesPerPort bounds the single-rule reads: a binary search of 60,000 rules takes 16,
// plus the gaps earlier takeovers left and the run of the port's rules.
const probesPerPort = 40

// Taken is what TakenRules found of a victim: its rules for the contested ports as
// `iptables -S` shows them, and each one's handle (by Spec).
type Taken struct {
	Rules   []iptables.Rule
	Handles map[string]uint64 // Rule.Spec() -> handle
}

// TakenRules finds the rules of chain (family f, table nat) whose destination port is one
// of ports of protocol proto, reading single rules by handle instead of the chain.
//
// It relies on how portguard and portmap write an attachment: its chain, then its rules
// (each mapping's rules together, mappings in order), so the rules carry rising handles
// below those of the attachment's jumps; and on the mappings being in port order, as a
// port range is. It binary-searches the handles for each port, and takes the run of
// consecutive handles with that port. ok is false, and the caller reads the chain, when
// the chain is small (MinProbedRules), or anything does not fit: a port not found, a rule
// the decoder does not know, more reads than probesPerPort per port.
func (c *Conn) TakenRules(f hostport.Family, chain, proto string, ports []int) (t Taken, ok bool, err error) {
	ch, exists, err := c.Chain(f, chain)
	if err != nil || !exists || int(ch.Use) < MinProbedRules { // Use counts its rules and more
		return t, false, err
	}
	jumps, _, err := c.Rules(f, hostport.DNATChain)
	if err != nil {
		return t, false, err
	}
	refs, top := 0, uint64(0)
	for _, r := range jumps {
		if r.Jump() != chain {
			continue
		}
		refs++
		if top == 0 || r.Handle < top {
			top = r.Handle
		}
		// TakeFrom rewrites these jumps itself: only shapes it can write back.
		ri, ok := decodeRule(f, r)
		if !ok {
			return t, false, nil
		}
		plain := false
		for _, m := range ri.matches[:ri.nmatch] {
			if m.kind == matchMultiport {
				plain = true
				multiportEach(m.info, func(_, _ int, isRange bool) bool { plain = plain && !isRange; return plain })
			}
		}
		if !plain {
			return t, false, nil
		}
	}
	rules := int(ch.Use) - refs
	budget := probesPerPort * len(ports)
	if refs == 0 || rules < MinProbedRules || top <= ch.Handle+1 {
		return t, false, nil
	}
	p := prober{c: c, f: f, chain: chain, budget: budget}
	t.Handles = map[string]uint64{}
	for _, port := range ports {
		hs, ok, err := p.find(ch.Handle+1, top-1, proto, port)
		if err != nil || !ok {
			return Taken{}, false, err
		}
		for _, h := range hs {
			args, ok := ruleArgs(f, p.rules[h])
			if !ok {
				return Taken{}, false, nil
			}
			r := iptables.Rule{Chain: chain, Args: args}
			t.Rules = append(t.Rules, r)
			t.Handles[r.Spec()] = h
		}
	}
	return t, true, nil
}

// prober reads single rules of one chain, remembering them.
type prober struct {
	c      *Conn
	f      hostport.Family
	chain  string
	budget int
	rules  map[uint64]Rule
}

// errNoBudget ends a search that read too many rules.
var errNoBudget = errors.New("probe budget spent")

// at reads the rule with handle h: its protocol and port (port -1: not a rule of one
// destination port), present false when the chain has no rule h.
func (p *prober) at(h uint64) (proto string, port int, present bool, err error) {
	if p.rules == nil {
		p.rules = map[uint64]Rule{}
	}
	r, ok := p.rules[h]
	if !ok {
		if p.budget == 0 {
			return "", 0, false, errNoBudget
		}
		p.budget--
		if r, ok, err = p.c.Rule(p.f, p.chain, h); err != nil || !ok {
			return "", 0, false, err
		}
		p.rules[h] = r
	}
	ri, ok := decodeRule(p.f, r)
	if !ok {
		return "", -1, true, nil
	}
	port = -1
	for _, m := range ri.matches[:ri.nmatch] {
		if m.kind == matchPort {
			port = int(m.port)
		}
	}
	return protoNames[ri.proto], port, true, nil
}

// find binary-searches handles lo..hi for the rules of proto/port and returns the run of
// consecutive handles holding them.
func (p *prober) find(lo, hi uint64, proto string, port int) (run []uint64, ok bool, err error) {
	defer func() {
		if errors.Is(err, errNoBudget) {
			run, ok, err = nil, false, nil
		}
	}()
	for lo <= hi {
		mid := lo + (hi-lo)/2
		// The first rule at or above mid (handles of deleted rules are gaps).
		h := mid
		var pr string
		var pt int
		for ; h <= hi; h++ {
			var present bool
			if pr, pt, present, err = p.at(h); err != nil {
				return nil, false, err
			}
			if present {
				break
			}
		}
		if h > hi {
			hi = mid - 1
			if mid == 0 {
				return nil, false, nil
			}
			continue
		}
		if pt < 0 || pr != proto {
			return nil, false, nil // not one port range of one protocol
		}
		switch {
		case pt < port:
			lo = h + 1
		case pt > port:
			if mid == 0 {
				return nil, false, nil
			}
			hi = mid - 1
		default:
			first, last := h, h
			for first > lo {
				if pr, pt, present, err := p.at(first - 1); err != nil {
					return nil, false, err
				} else if !present || pr != proto || pt != port {
					break
				}
				first--
			}
			for last < hi {
				if pr, pt, present, err := p.at(last + 1); err != nil {
					return nil, false, err
				} else if !present || pr != proto || pt != port {
					break
				}
				last++
			}
			for x := first; x <= last; x++ {
				run = append(run, x)
			}
			return run, true, nil
		}
	}
	return nil, false, nil
}

// TakeFrom applies a takeover to a victim read in part, after the new claim is in: in
// one transaction it drops the ports in drop (protocol -> ports) from the chain's jumps in
// CNI-HOSTPORT-DNAT (a copy with the remaining ports goes right after the jump, which is
// then deleted, so the jump keeps its place; a jump left without ports is deleted) and
// deletes the rules with these handles that are still there. Then, when no rule jumps to
// the chain any more, it deletes the chain.
//
// Two ADDs taking parts of one victim at once (they hold different port locks) meet here:
// one that rewrites a jump the other already rewrote finds it gone (ENOENT), the batch
// fails whole, and TakeFrom reads the jumps again and retries; the chain goes once the
// last of its jumps has. Rules already gone are someone else's doing (a DEL of the
// victim) and not an error. The plan decided what drop and handles hold; TakeFrom only
// finds the current jumps they apply to.
func (c *Conn) TakeFrom(f hostport.Family, chain string, drop map[string][]int, handles []uint64) error {
	for try := 0; ; try++ {
		err := c.takeFrom(f, chain, drop, handles)
		if err == nil || try == 4 || !(errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EBUSY)) {
			if err != nil {
				return fmt.Errorf("take ports over from %s: %w", chain, err)
			}
			return nil
		}
	}
}

func (c *Conn) takeFrom(f hostport.Family, chain string, drop map[string][]int, handles []uint64) error {
	ops, err := c.TakeOps(f, chain, drop, handles)
	if err != nil {
		return err
	}
	return c.Commit(ops...)
}

// TakeOps plans what TakeFrom commits, for a caller that puts the operations into a
// batch of its own (the nftables backend takes an iptables-nft claim over in the batch
// that creates the new claim): the rewrites and deletions of the chain's jumps in
// CNI-HOSTPORT-DNAT, then the deletion of the chain when no jump is left, or else of the
// rules with these handles that are still there. It reads the current jumps (a dump of
// CNI-HOSTPORT-DNAT) and, when the chain stays, each handle; no operations when the chain
// does not exist. A batch of these ops committed at the generation of those reads
// (CommitAt) applies exactly what was planned or nothing.
func (c *Conn) TakeOps(f hostport.Family, chain string, drop map[string][]int, handles []uint64) ([]Op, error) {
	if _, exists, err := c.Chain(f, chain); err != nil || !exists {
		return nil, err
	}
	jumps, _, err := c.Rules(f, hostport.DNATChain)
	if err != nil {
		return nil, err
	}
	var ops []Op
	left := 0
	for _, r := range jumps {
		if r.Jump() != chain {
			continue
		}
		ri, ok := decodeRule(f, r)
		if !ok {
			return nil, fmt.Errorf("jump %d into %s: a shape the decoder does not know", r.Handle, chain)
		}
		var info []byte
		for _, m := range ri.matches[:ri.nmatch] {
			if m.kind == matchMultiport {
				info = m.info
			}
		}
		gone := drop[protoNames[ri.proto]]
		if info == nil {
			return nil, fmt.Errorf("jump %d into %s has no multiport match", r.Handle, chain)
		}
		var keep []int
		changed := false
		ranges := false
		multiportEach(info, func(lo, hi int, isRange bool) bool {
			ranges = ranges || isRange
			for p := lo; p <= hi; p++ {
				if slices.Contains(gone, p) {
					changed = true
				} else {
					keep = append(keep, p)
				}
			}
			return true
		})
		switch {
		case !changed:
			left++
		case len(keep) == 0:
			ops = append(ops, DeleteRule(f, hostport.DNATChain, r.Handle))
		case ranges || len(keep) > multiportMax:
			return nil, fmt.Errorf("jump %d into %s holds port ranges", r.Handle, chain)
		default:
			left++
			ops = append(ops, insertAfter(f, r, ri.proto, withPorts(info, keep)), DeleteRule(f, hostport.DNATChain, r.Handle))
		}
	}
	if left == 0 {
		return append(ops, DeleteChain(f, chain)), nil
	}
	for _, h := range handles {
		if _, ok, err := c.Rule(f, chain, h); err != nil {
			return nil, err
		} else if ok {
			ops = append(ops, DeleteRule(f, chain, h))
		}
	}
	return ops, nil
}

// withPorts is a multiport (revision 1) info like info with ports as its list.
func withPorts(info []byte, ports []int) []byte {
	const n = multiportMax
	out := make([]byte, len(info))
	out[0] = info[0] // flags: destination ports
	out[1] = byte(len(ports))
	for i, p := range ports {
		binary.NativeEndian.PutUint16(out[2+2*i:], uint16(p))
	}
	out[2+3*n] = info[2+3*n] // invert
	return out
}

// insertAfter is a copy of rule r, its multiport match's info replaced by info, placed
// right after r (which must still exist). proto goes into the compat attributes the
// kernel's xt match check reads (multiport needs a protocol).
func insertAfter(f hostport.Family, r Rule, proto byte, info []byte) Op {
	exprs := &msg{}
	for _, x := range r.Exprs {
		data := []byte(x.Attrs)
		if x.Name == "match" && cstr(x.Attrs.get(unix.NFTA_MATCH_NAME)) == "multiport" {
			d := &msg{}
			d.attr(unix.NFTA_MATCH_NAME, x.Attrs.get(unix.NFTA_MATCH_NAME))
			d.attr(unix.NFTA_MATCH_REV, x.Attrs.get(unix.NFTA_MATCH_REV))
			d.attr(unix.NFTA_MATCH_INFO, info)
			data = d.data
		}
		elem := &msg{}
		elem.str(unix.NFTA_EXPR_NAME, x.Name)
		elem.attr(unix.NFTA_EXPR_DATA|unix.NLA_F_NESTED, data)
		exprs.attr(unix.NFTA_LIST_ELEM|unix.NLA_F_NESTED, elem.data)
	}
	compat := &msg{}
	compat.attr(unix.NFTA_RULE_COMPAT_PROTO, binary.BigEndian.AppendUint32(nil, uint32(proto)))
	compat.attr(unix.NFTA_RULE_COMPAT_FLAGS, binary.BigEndian.AppendUint32(nil, 0))
	m := newMsg(nftType(unix.NFT_MSG_NEWRULE), unix.NLM_F_REQUEST|unix.NLM_F_ACK|unix.NLM_F_CREATE|unix.NLM_F_APPEND, family(f))
	m.str(unix.NFTA_RULE_TABLE, "nat").str(unix.NFTA_RULE_CHAIN, hostport.DNATChain)
	m.u64(unix.NFTA_RULE_POSITION, r.Handle)
	m.attr(unix.NFTA_RULE_EXPRESSIONS|unix.NLA_F_NESTED, exprs.data)
	m.attr(unix.NFTA_RULE_COMPAT|unix.NLA_F_NESTED, compat.data)
	return Op{m}
}
