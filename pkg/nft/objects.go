package nft

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/portguard/portguard/pkg/hostport"
)

// attrList is a run of netlink attributes as received. Lookups scan it: nf_tables
// objects carry a handful of attributes each, and a dump of a thousand rules decodes
// tens of thousands, so not building maps or slices for them is most of a dump's cost.
type attrList []byte

// get returns the payload of the first attribute of this type (the nested and
// byte-order flags ignored); nil when it is absent or the run is malformed before it.
func (l attrList) get(typ uint16) []byte {
	b := []byte(l)
	for len(b) >= 4 {
		n := int(binary.NativeEndian.Uint16(b[0:]))
		if n < 4 || n > len(b) {
			return nil
		}
		if binary.NativeEndian.Uint16(b[2:])&nlaTypeMask == typ {
			return b[4:n]
		}
		if align(n) >= len(b) {
			return nil
		}
		b = b[align(n):]
	}
	return nil
}

// attrs wraps a run of attributes, checking that it is well formed.
func attrs(b []byte) (attrList, error) {
	for r := b; len(r) >= 4; {
		n := int(binary.NativeEndian.Uint16(r[0:]))
		if n < 4 || n > len(r) {
			return nil, errors.New("nf_tables netlink: malformed attribute")
		}
		if align(n) >= len(r) {
			break
		}
		r = r[align(n):]
	}
	return attrList(b), nil
}

func cstr(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

// Chain is what the kernel says about one chain.
type Chain struct {
	Name   string
	Handle uint64
	// Use counts the chain's own rules plus every rule (anywhere) that jumps to it.
	Use uint32
}

// Chain reads one chain of table nat; ok is false when it (or the table) does not exist.
func (c *Conn) Chain(f hostport.Family, name string) (ch Chain, ok bool, err error) {
	m := newMsg(nftType(unix.NFT_MSG_GETCHAIN), unix.NLM_F_REQUEST, family(f))
	m.str(unix.NFTA_CHAIN_TABLE, "nat").str(unix.NFTA_CHAIN_NAME, name)
	objs, err := c.get(m)
	if errors.Is(err, unix.ENOENT) {
		return Chain{}, false, nil
	}
	if err != nil {
		return Chain{}, false, fmt.Errorf("read chain %s: %w", name, err)
	}
	if len(objs) != 1 {
		return Chain{}, false, fmt.Errorf("read chain %s: %d answers", name, len(objs))
	}
	a, err := attrs(objs[0])
	if err != nil {
		return Chain{}, false, err
	}
	ch = Chain{Name: cstr(a.get(unix.NFTA_CHAIN_NAME))}
	if v := a.get(unix.NFTA_CHAIN_HANDLE); len(v) == 8 {
		ch.Handle = binary.BigEndian.Uint64(v)
	}
	if v := a.get(unix.NFTA_CHAIN_USE); len(v) == 4 {
		ch.Use = binary.BigEndian.Uint32(v)
	}
	if ch.Name != name || ch.Handle == 0 {
		return Chain{}, false, fmt.Errorf("read chain %s: unexpected answer", name)
	}
	return ch, true, nil
}

// Expr is one expression of a rule: its name and its attributes.
type Expr struct {
	Name  string
	Attrs attrList
}

// Rule is one rule as the kernel holds it.
type Rule struct {
	Chain  string
	Handle uint64
	Exprs  []Expr
	// Userdata is where nft (and newer iptables) keep a rule's comment; iptables shows
	// it as -m comment, which the shapes recognised here do not account for.
	Userdata []byte
}

func parseRule(b []byte) (Rule, error) {
	var r Rule
	err := parseRuleInto(b, &r)
	return r, err
}

// parseRuleInto parses into r, reusing r.Exprs' storage: a dump decoded rule by rule
// allocates nothing. r points into b.
func parseRuleInto(b []byte, r *Rule) error {
	a, err := attrs(b)
	if err != nil {
		return err
	}
	chain := a.get(unix.NFTA_RULE_CHAIN)
	if i := bytes.IndexByte(chain, 0); i >= 0 {
		chain = chain[:i]
	}
	name := r.Chain
	if string(chain) != name {
		name = string(chain) // a dump's rules share their chain's name: one allocation
	}
	*r = Rule{Chain: name, Userdata: a.get(unix.NFTA_RULE_USERDATA), Exprs: r.Exprs[:0]}
	if v := a.get(unix.NFTA_RULE_HANDLE); len(v) == 8 {
		r.Handle = binary.BigEndian.Uint64(v)
	}
	for l := a.get(unix.NFTA_RULE_EXPRESSIONS); len(l) >= 4; {
		n := int(binary.NativeEndian.Uint16(l[0:]))
		if n < 4 || n > len(l) {
			return errors.New("nf_tables netlink: malformed list")
		}
		if binary.NativeEndian.Uint16(l[2:])&nlaTypeMask == unix.NFTA_LIST_ELEM {
			ea, err := attrs(l[4:n])
			if err != nil {
				return err
			}
			x := Expr{Name: exprName(ea.get(unix.NFTA_EXPR_NAME))}
			if x.Attrs, err = attrs(ea.get(unix.NFTA_EXPR_DATA)); err != nil {
				return err
			}
			r.Exprs = append(r.Exprs, x)
		}
		if align(n) >= len(l) {
			break
		}
		l = l[align(n):]
	}
	if r.Handle == 0 {
		return errors.New("nf_tables netlink: rule without handle")
	}
	return nil
}

// exprName is cstr without allocating for the expressions iptables-nft uses.
func exprName(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	switch string(b) {
	case "counter":
		return "counter"
	case "meta":
		return "meta"
	case "cmp":
		return "cmp"
	case "payload":
		return "payload"
	case "bitwise":
		return "bitwise"
	case "match":
		return "match"
	case "target":
		return "target"
	case "immediate":
		return "immediate"
	}
	return string(b)
}

// Rules reads every rule of one chain of table nat, in order; ok is false when the chain
// does not exist.
func (c *Conn) Rules(f hostport.Family, chain string) (rules []Rule, ok bool, err error) {
	var objs [][]byte
	for try := 0; ; try++ {
		m := newMsg(nftType(unix.NFT_MSG_GETRULE), unix.NLM_F_REQUEST|unix.NLM_F_DUMP, family(f))
		m.str(unix.NFTA_RULE_TABLE, "nat").str(unix.NFTA_RULE_CHAIN, chain)
		objs, err = c.get(m)
		if !errors.Is(err, ErrDumpInterrupted) || try == 2 {
			break
		}
	}
	if errors.Is(err, unix.ENOENT) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("read rules of %s: %w", chain, err)
	}
	for _, o := range objs {
		r, err := parseRule(o)
		if err != nil {
			return nil, false, fmt.Errorf("read rules of %s: %w", chain, err)
		}
		if r.Chain != chain {
			continue // an older kernel that ignores the chain filter
		}
		rules = append(rules, r)
	}
	if len(rules) == 0 {
		// A dump filtered by a chain that does not exist is simply empty.
		_, ok, err := c.Chain(f, chain)
		return nil, ok, err
	}
	return rules, true, nil
}

// Rule reads one rule by handle; ok is false when no rule of chain has it.
func (c *Conn) Rule(f hostport.Family, chain string, handle uint64) (Rule, bool, error) {
	m := newMsg(nftType(unix.NFT_MSG_GETRULE), unix.NLM_F_REQUEST, family(f))
	m.str(unix.NFTA_RULE_TABLE, "nat").str(unix.NFTA_RULE_CHAIN, chain).u64(unix.NFTA_RULE_HANDLE, handle)
	objs, err := c.get(m)
	if errors.Is(err, unix.ENOENT) {
		return Rule{}, false, nil
	}
	if err != nil {
		return Rule{}, false, fmt.Errorf("read rule %d of %s: %w", handle, chain, err)
	}
	if len(objs) != 1 {
		return Rule{}, false, fmt.Errorf("read rule %d of %s: %d answers", handle, chain, len(objs))
	}
	r, err := parseRule(objs[0])
	if err != nil || r.Chain != chain || r.Handle != handle {
		return Rule{}, false, fmt.Errorf("read rule %d of %s: unexpected answer (%v)", handle, chain, err)
	}
	return r, true, nil
}

// Jump is the chain the rule's verdict jumps to ("" for any other verdict or none).
func (r Rule) Jump() string {
	if len(r.Exprs) == 0 {
		return ""
	}
	x := r.Exprs[len(r.Exprs)-1]
	if x.Name != "immediate" {
		return ""
	}
	data, err := attrs(x.Attrs.get(unix.NFTA_IMMEDIATE_DATA))
	if err != nil {
		return ""
	}
	v, err := attrs(data.get(unix.NFTA_DATA_VERDICT))
	if err != nil || len(v.get(unix.NFTA_VERDICT_CODE)) != 4 {
		return ""
	}
	if int32(binary.BigEndian.Uint32(v.get(unix.NFTA_VERDICT_CODE))) != unix.NFT_JUMP {
		return ""
	}
	return cstr(v.get(unix.NFTA_VERDICT_CHAIN))
}

// Xt returns the info blob of the rule's first xtables match or target (kind "match" or
// "target") with this name and revision, as iptables-nft stores the ones it does not
// translate. The revision fixes the blob's layout.
func (r Rule) Xt(kind, name string, rev uint32) ([]byte, bool) {
	nameAttr, revAttr, infoAttr := uint16(unix.NFTA_MATCH_NAME), uint16(unix.NFTA_MATCH_REV), uint16(unix.NFTA_MATCH_INFO)
	if kind == "target" {
		nameAttr, revAttr, infoAttr = unix.NFTA_TARGET_NAME, unix.NFTA_TARGET_REV, unix.NFTA_TARGET_INFO
	}
	for _, x := range r.Exprs {
		if x.Name == kind && cstr(x.Attrs.get(nameAttr)) == name {
			if !u32Is(x.Attrs.get(revAttr), rev) {
				return nil, false
			}
			return x.Attrs.get(infoAttr), true
		}
	}
	return nil, false
}

// nlaTypeMask strips NLA_F_NESTED and NLA_F_NET_BYTEORDER from an attribute type.
const nlaTypeMask = 0x3fff
