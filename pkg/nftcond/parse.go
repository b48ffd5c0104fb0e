// Package nftcond reads conditionsV4/conditionsV6 for the nftables backend: a documented
// subset of nft's match syntax, parsed into values and rendered as google/nftables
// expressions, never passed to nft as text.
//
// Input is upstream portmap's: a list of strings that upstream joins with single spaces
// into the nft rule (knftables.Concat), so ["ip", "saddr", "10.0.0.0/8"] and
// ["ip saddr 10.0.0.0/8"] are the same condition. Accepted matches, any number, all of
// which must hold (their order does not matter):
//
//	ip saddr|daddr [==|!=] VALUE          conditionsV4 only
//	ip6 saddr|daddr [==|!=] VALUE         conditionsV6 only
//	    VALUE: an address, a prefix (host bits are ignored, as nft does), a range a-b,
//	    or an anonymous set { v, v, ... } of those
//	[meta] iifname|oifname [==|!=] NAME   NAME: 1-15 of [A-Za-z0-9_.-], bare or in "quotes";
//	                                      a trailing * (quoted) matches every name so prefixed
//	[meta] mark [==|!=] N                 N: decimal or 0x hex, 32 bits
//	[meta] mark &|and MASK [==|!=] N      bits of N outside MASK are refused (never matches)
//
// eq and ne are accepted for == and !=, as nft does. Everything else is refused with an
// error naming the field and item (e.g. conditionsV4[1]): other nft expressions, named sets
// (@x), variables ($x), statements (accept, drop, jump, counter, ...), ';', '#', quotes
// outside a name, braces outside an address set, control characters and non-ASCII bytes,
// a match of the other family, and a match that every packet or no packet satisfies
// (0.0.0.0/0, "*").
package nftcond

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/portguard/portguard/pkg/hostport"
)

// Limits keep a configuration's rules small; nft has none this low, but a host-port
// condition with more than these is a mistake, not a need.
const (
	MaxItems      = 64   // strings in conditionsV4/V6
	MaxLen        = 8192 // bytes of all strings, and of the canonical form (String)
	MaxMatches    = 16   // matches in one list
	MaxSetEntries = 256  // values in one address set
)

// maxToken bounds a word: the longest value accepted, an IPv6 range in IPv4-embedded
// notation, has 91 bytes. It also keeps the words quoted in errors short.
const maxToken = 100

// accepted is the summary every refusal ends with.
const accepted = "accepted: ip|ip6 saddr|daddr [==|!=] ADDRESS|PREFIX|RANGE|{ ... }; iifname|oifname [==|!=] NAME or \"PREFIX*\"; meta mark [==|!=] N; meta mark & MASK [==|!=] N"

// Error is a refusal of one item of a conditions list.
type Error struct {
	Field string // e.g. "conditionsV4[1]", or "conditionsV4" for the list as a whole
	Msg   string
}

func (e *Error) Error() string { return e.Field + ": " + e.Msg }

// statements are nft words that act rather than match; a conditions list never holds one.
var statements = map[string]bool{
	"accept": true, "drop": true, "reject": true, "queue": true, "continue": true, "return": true,
	"jump": true, "goto": true, "counter": true, "log": true, "limit": true, "quota": true,
	"dnat": true, "snat": true, "masquerade": true, "redirect": true, "notrack": true, "set": true,
	"add": true, "update": true, "delete": true, "insert": true, "replace": true, "flush": true,
	"create": true, "destroy": true, "list": true, "table": true, "chain": true, "rule": true,
	"tproxy": true, "synproxy": true, "fwd": true, "dup": true, "meter": true, "include": true,
	"define": true, "redefine": true, "undefine": true, "reset": true, "rename": true, "export": true,
	"import": true, "monitor": true, "describe": true,
}

// token is one lexical unit and the index of the item it came from.
type token struct {
	text   string
	item   int
	quoted bool
}

type parser struct {
	field string
	fam   hostport.Family
	toks  []token
	pos   int
	last  int // item of the last token, for errors at the end of the input
}

func (p *parser) errf(item int, format string, a ...any) *Error {
	return &Error{Field: fmt.Sprintf("%s[%d]", p.field, item), Msg: fmt.Sprintf(format, a...)}
}

// Parse reads one family's conditions. field names the list in errors ("conditionsV4");
// f is the family of the rules the conditions guard. nil, an empty list and a list of
// empty strings give no conditions (Empty). The error is an *Error, with no conditions.
func Parse(field string, f hostport.Family, conds []string) (Conditions, error) {
	c := Conditions{family: f}
	if f != hostport.V4 && f != hostport.V6 {
		return c, &Error{Field: field, Msg: fmt.Sprintf("unknown family %d", int(f))}
	}
	if len(conds) > MaxItems {
		return c, &Error{Field: field, Msg: fmt.Sprintf("%d items; at most %d", len(conds), MaxItems)}
	}
	total := 0
	for _, s := range conds {
		total += len(s)
	}
	if total > MaxLen {
		return c, &Error{Field: field, Msg: fmt.Sprintf("%d bytes; at most %d", total, MaxLen)}
	}
	p := &parser{field: field, fam: f}
	for i, s := range conds {
		if err := p.lex(i, s); err != nil {
			return Conditions{family: f}, err
		}
	}
	for p.pos < len(p.toks) {
		if len(c.matches) == MaxMatches {
			return Conditions{family: f}, p.errf(p.toks[p.pos].item, "more than %d matches", MaxMatches)
		}
		m, err := p.match()
		if err != nil {
			return Conditions{family: f}, err
		}
		c.matches = append(c.matches, m)
	}
	c.normalise()
	// The canonical form can be longer than the input ({a,b} becomes { a, b }); bounding
	// it too keeps every accepted list's canonical form acceptable as input.
	if n := len(c.String()); n > MaxLen {
		return Conditions{family: f}, &Error{Field: field, Msg: fmt.Sprintf("%d bytes in canonical form; at most %d", n, MaxLen)}
	}
	return c, nil
}

func famName(f hostport.Family) string {
	if f == hostport.V6 {
		return "IPv6"
	}
	return "IPv4"
}

func wordByte(b byte) bool {
	return b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b >= '0' && b <= '9' ||
		b == '_' || b == '.' || b == ':' || b == '/' || b == '*' || b == '-'
}

// lex splits item i into tokens; an item boundary is a token boundary, as the space
// upstream joins items with is.
func (p *parser) lex(i int, s string) error {
	p.last = i
	for j := 0; j < len(s); j++ {
		if b := s[j]; b < 0x20 || b > 0x7e {
			return p.errf(i, "byte 0x%02x at offset %d: control characters (a newline ends an nft command) and non-ASCII bytes are refused", b, j)
		}
	}
	for j := 0; j < len(s); {
		b := s[j]
		switch {
		case b == ' ':
			j++
		case b == '{' || b == '}' || b == ',' || b == '&':
			p.toks = append(p.toks, token{text: s[j : j+1], item: i})
			j++
		case (b == '!' || b == '=') && j+1 < len(s) && s[j+1] == '=':
			p.toks = append(p.toks, token{text: s[j : j+2], item: i})
			j += 2
		case b == '"':
			end := strings.IndexByte(s[j+1:], '"')
			if end < 0 {
				return p.errf(i, "unterminated quote at offset %d", j)
			}
			q := s[j+1 : j+1+end]
			if len(q) > maxToken {
				return p.errf(i, "a quoted string of %d bytes; no name is longer than 15", len(q))
			}
			if strings.ContainsAny(q, "\\") {
				return p.errf(i, "%q: escapes in quoted names are refused", q)
			}
			p.toks = append(p.toks, token{text: q, item: i, quoted: true})
			j += end + 2
		case wordByte(b):
			k := j
			for k < len(s) && wordByte(s[k]) {
				k++
			}
			if k-j > maxToken {
				return p.errf(i, "a word of %d bytes at offset %d; no address, range, name or number is longer than %d", k-j, j, maxToken)
			}
			p.toks = append(p.toks, token{text: s[j:k], item: i})
			j = k
		case b == ';':
			return p.errf(i, "';' ends an nft statement; conditions are matches only (%s)", accepted)
		case b == '#':
			return p.errf(i, "'#' starts an nft comment; refused")
		case b == '@':
			return p.errf(i, "named sets (@name) are refused; give the values in { }")
		case b == '$':
			return p.errf(i, "nft variables ($name) are refused")
		default:
			return p.errf(i, "character %q is not accepted (%s)", b, accepted)
		}
	}
	return nil
}

func (p *parser) peek() (token, bool) {
	if p.pos < len(p.toks) {
		return p.toks[p.pos], true
	}
	return token{item: p.last}, false
}

func (p *parser) next() (token, bool) {
	t, ok := p.peek()
	if ok {
		p.pos++
	}
	return t, ok
}

// op reads an optional comparison operator: true for !=.
func (p *parser) op() bool {
	t, ok := p.peek()
	if !ok || t.quoted {
		return false
	}
	switch t.text {
	case "==", "eq":
		p.pos++
	case "!=", "ne":
		p.pos++
		return true
	}
	return false
}

// refuseWord explains why a bare word cannot start or continue a match.
func (p *parser) refuseWord(t token, what string) *Error {
	switch {
	case t.quoted:
		return p.errf(t.item, "%q: a quoted string is only accepted as an interface name (%s)", t.text, accepted)
	case statements[t.text]:
		return p.errf(t.item, "%q is an nft statement; conditions are matches only (%s)", t.text, accepted)
	case t.text == "{" || t.text == "}" || t.text == ",":
		return p.errf(t.item, "%q outside an address set (%s)", t.text, accepted)
	case t.text == "iif" || t.text == "oif":
		return p.errf(t.item, "%q matches an interface index, which changes when the interface is recreated; use %sname", t.text, t.text)
	}
	return p.errf(t.item, "%q is not %s (%s)", t.text, what, accepted)
}

func (p *parser) match() (match, error) {
	t, _ := p.next()
	if t.quoted {
		return match{}, p.refuseWord(t, "a match")
	}
	switch t.text {
	case "ip", "ip6":
		f := hostport.V4
		if t.text == "ip6" {
			f = hostport.V6
		}
		if f != p.fam {
			other := "conditionsV6"
			if f == hostport.V4 {
				other = "conditionsV4"
			}
			return match{}, p.errf(t.item, "an %s match among %s conditions; it belongs in %s", t.text, famName(p.fam), other)
		}
		dir, ok := p.next()
		if !ok {
			return match{}, p.errf(dir.item, "%s needs saddr or daddr", t.text)
		}
		m := match{kind: kSaddr}
		switch {
		case dir.quoted:
			return match{}, p.errf(dir.item, "%s %q: only saddr and daddr are accepted", t.text, dir.text)
		case dir.text == "saddr":
		case dir.text == "daddr":
			m.kind = kDaddr
		default:
			return match{}, p.errf(dir.item, "%s %s: only saddr and daddr are accepted", t.text, dir.text)
		}
		m.neg = p.op()
		var err error
		m.ranges, err = p.addrValue(t.text + " " + dir.text)
		return m, err
	case "meta":
		k, ok := p.next()
		if !ok {
			return match{}, p.errf(k.item, "meta needs iifname, oifname or mark")
		}
		switch {
		case !k.quoted && (k.text == "iifname" || k.text == "oifname"):
			return p.ifname(k.text)
		case !k.quoted && k.text == "mark":
			return p.mark()
		}
		return match{}, p.errf(k.item, "meta %q: only iifname, oifname and mark are accepted", k.text)
	case "iifname", "oifname":
		return p.ifname(t.text)
	case "mark":
		return p.mark()
	}
	return match{}, p.refuseWord(t, "a match")
}

func (p *parser) ifname(key string) (match, error) {
	m := match{kind: kIifname}
	if key == "oifname" {
		m.kind = kOifname
	}
	m.neg = p.op()
	t, ok := p.next()
	if !ok {
		return m, p.errf(t.item, "%s needs an interface name", key)
	}
	if !t.quoted && (t.text == "{" || statements[t.text] || t.text == "}" || t.text == ",") {
		// google/nftables v0.3.0 marks every anonymous set's key big-endian, so nft
		// would list a set of names (host-order strings) as { "", "" }: measured; and
		// nft itself cannot list a set of adjacent wildcards ({ "b*", "c*" } gives ""/7).
		if t.text == "{" {
			return m, p.errf(t.item, "%s: sets of names are not accepted; give one name per match", key)
		}
		return m, p.refuseWord(t, "an interface name")
	}
	name := t.text
	wild := strings.HasSuffix(name, "*")
	base := strings.TrimSuffix(name, "*")
	if wild && !t.quoted {
		return m, p.errf(t.item, "%s %s: write a wildcard name in quotes (\"%s\"), as nft requires", key, name, name)
	}
	if base == "" {
		return m, p.errf(t.item, "%s %q: a name matching every interface is refused; leave the match out", key, name)
	}
	if len(base) > 15 || base == "." || base == ".." || strings.Trim(base, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-") != "" {
		return m, p.errf(t.item, "%s %q: a name is 1-15 of A-Z a-z 0-9 _ . - with an optional trailing *", key, name)
	}
	m.name = name
	return m, nil
}

// number reads a 32-bit decimal or 0x-hexadecimal number, as nft spells marks.
func number(s string) (uint32, bool) {
	base := 10
	if h, ok := strings.CutPrefix(strings.ToLower(s), "0x"); ok {
		s, base = h, 16
	}
	if s == "" || strings.ContainsAny(s, "+-_") {
		return 0, false
	}
	v, err := strconv.ParseUint(s, base, 32)
	return uint32(v), err == nil
}

func (p *parser) mark() (match, error) {
	m := match{kind: kMark, mask: ^uint32(0)}
	num := func(what string) (uint32, error) {
		t, ok := p.next()
		v, good := number(t.text)
		if !ok || t.quoted || !good {
			if ok && !t.quoted && statements[t.text] {
				return 0, p.refuseWord(t, what)
			}
			return 0, p.errf(t.item, "meta mark needs %s: a 32-bit decimal or 0x hex number", what)
		}
		return v, nil
	}
	if t, ok := p.peek(); ok && !t.quoted && (t.text == "&" || t.text == "and") {
		p.pos++
		mask, err := num("a mask")
		if err != nil {
			return m, err
		}
		if mask == 0 {
			return m, p.errf(t.item, "meta mark & 0: every packet gives 0; leave the match out")
		}
		m.mask = mask
	}
	m.neg = p.op()
	v, err := num("a value")
	if err != nil {
		return m, err
	}
	if v&^m.mask != 0 {
		return m, p.errf(p.toks[p.pos-1].item, "meta mark & 0x%08x cannot equal 0x%08x: the value has bits outside the mask", m.mask, v)
	}
	m.value = v
	return m, nil
}

// addrValue reads an address, prefix, range or { set } of them for the family.
func (p *parser) addrValue(what string) ([]addrRange, error) {
	t, ok := p.next()
	if !ok {
		return nil, p.errf(t.item, "%s needs an address, prefix, range or { set }", what)
	}
	var out []addrRange
	if t.quoted || t.text != "{" {
		r, err := p.addrRange(t, what)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	} else {
		for {
			v, ok := p.next()
			if !ok {
				return nil, p.errf(v.item, "%s: the set has no closing }", what)
			}
			if !v.quoted && v.text == "}" {
				break
			}
			if len(out) == MaxSetEntries {
				return nil, p.errf(v.item, "%s: more than %d values in a set", what, MaxSetEntries)
			}
			r, err := p.addrRange(v, what)
			if err != nil {
				return nil, err
			}
			out = append(out, r)
			sep, ok := p.next()
			if !ok {
				return nil, p.errf(sep.item, "%s: the set has no closing }", what)
			}
			if !sep.quoted && sep.text == "}" {
				break
			}
			if !sep.quoted && statements[sep.text] {
				return nil, p.refuseWord(sep, "a set separator")
			}
			if sep.quoted || sep.text != "," {
				return nil, p.errf(sep.item, "%s: %q where a set needs , or }", what, sep.text)
			}
		}
		if len(out) == 0 {
			return nil, p.errf(t.item, "%s: an empty set matches nothing", what)
		}
	}
	merged := mergeRanges(out)
	if len(merged) == 1 && merged[0].all() {
		return nil, p.errf(t.item, "%s: the value covers every %s address; leave the match out", what, famName(p.fam))
	}
	return merged, nil
}

// addrRange reads one address, prefix or range a-b of the parser's family.
func (p *parser) addrRange(t token, what string) (addrRange, error) {
	bad := func(why string) error {
		return p.errf(t.item, "%s %q: %s", what, t.text, why)
	}
	if t.quoted || t.text == "{" || t.text == "}" || t.text == "," || t.text == "&" || t.text == "==" || t.text == "!=" {
		if !t.quoted && statements[t.text] {
			return addrRange{}, p.refuseWord(t, "an address")
		}
		return addrRange{}, bad(fmt.Sprintf("not an %s address, prefix or range", famName(p.fam)))
	}
	if statements[t.text] {
		return addrRange{}, p.refuseWord(t, "an address")
	}
	addr := func(s string) (netip.Addr, error) {
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" || (p.fam == hostport.V4) != a.Is4() {
			return a, bad(fmt.Sprintf("not an %s address, prefix or range (host names are not accepted: nft would resolve them when the rule is written)", famName(p.fam)))
		}
		return a, nil
	}
	if strings.Contains(t.text, "/") {
		a, _, _ := strings.Cut(t.text, "/")
		if _, err := addr(a); err != nil {
			return addrRange{}, err
		}
		pfx, err := netip.ParsePrefix(t.text)
		if err != nil {
			return addrRange{}, bad(fmt.Sprintf("not an %s prefix (length 0-%d)", famName(p.fam), bitLen(p.fam)))
		}
		pfx = pfx.Masked()
		return addrRange{first: pfx.Addr(), last: lastOf(pfx)}, nil
	}
	if a, b, ok := strings.Cut(t.text, "-"); ok {
		first, err := addr(a)
		if err != nil {
			return addrRange{}, err
		}
		last, err := addr(b)
		if err != nil {
			return addrRange{}, err
		}
		if last.Less(first) {
			return addrRange{}, bad("the range ends before it starts")
		}
		return addrRange{first: first, last: last}, nil
	}
	a, err := addr(t.text)
	return addrRange{first: a, last: a}, err
}
