package nft

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// This file is the generic part of the transport that a table-owning backend needs and
// google/nftables v0.3.0 lacks (measured, 2026-11, kernel 6.18):
//   - create of set elements with NLM_F_EXCL: google/nftables' SetAddElements sends
//     NLM_F_CREATE only, and the kernel then accepts a second element with the same key and
//     the same value silently, keeping the first element's comment (its owner). With EXCL the
//     kernel refuses it with EEXIST, so "same key, another owner" cannot slip in.
//   - a point lookup of one element by key (NFT_MSG_GETSETELEM without NLM_F_DUMP):
//     google/nftables only dumps a whole set (GetSetElements), which costs O(elements) per call.
//   - the batch generation id (NFNL_BATCH_GENID): a batch planned from reads made at
//     generation G fails with ERESTART when anyone committed since, so "delete what was
//     observed" never deletes something that changed after it was read.
// Families are the raw NFPROTO_* numbers and tables/sets are named by the caller: this
// package knows no layout.

// Elem is one element of a set or map: its key (and, in interval sets, the key's end), its
// value in maps (Data, or in verdict maps Jump: the chain it jumps to), and its comment
// (NFTNL_UDATA_SET_ELEM_COMMENT, at most 128 bytes).
type Elem struct {
	Key, KeyEnd, Data []byte
	Jump              string
	Comment           string
}

// nftaSetElemKeyEnd is NFTA_SET_ELEM_KEY_END (kernel 5.6), which x/sys does not define.
const nftaSetElemKeyEnd = 10

// MaxComment is the kernel's limit on an element's comment, in bytes.
const MaxComment = 128

func nest(typ uint16, payload []byte) []byte {
	return rawAttr(typ|unix.NLA_F_NESTED, payload)
}

func rawAttr(typ uint16, payload []byte) []byte {
	l := 4 + len(payload)
	b := make([]byte, align(l))
	binary.NativeEndian.PutUint16(b[0:], uint16(l))
	binary.NativeEndian.PutUint16(b[2:], typ)
	copy(b[4:], payload)
	return b
}

func valueAttr(v []byte) []byte { return rawAttr(unix.NFTA_DATA_VALUE, v) }

// udata encodes the element comment the way nft(8) does, so `nft list` shows it.
func udata(comment string) []byte {
	const commentType = 0 // NFTNL_UDATA_SET_ELEM_COMMENT
	b := []byte{commentType, byte(len(comment) + 1)}
	b = append(b, comment...)
	return append(b, 0)
}

func (e Elem) encode(withData bool) []byte {
	var b []byte
	b = append(b, nest(unix.NFTA_SET_ELEM_KEY, valueAttr(e.Key))...)
	if len(e.KeyEnd) > 0 {
		b = append(b, nest(nftaSetElemKeyEnd, valueAttr(e.KeyEnd))...)
	}
	if withData && len(e.Data) > 0 {
		b = append(b, nest(unix.NFTA_SET_ELEM_DATA, valueAttr(e.Data))...)
	}
	if withData && e.Jump != "" {
		jump := int32(unix.NFT_JUMP) // negative: verdict codes share the space of NF_* verdicts
		code := binary.BigEndian.AppendUint32(nil, uint32(jump))
		v := append(rawAttr(unix.NFTA_VERDICT_CODE, code), rawAttr(unix.NFTA_VERDICT_CHAIN, append([]byte(e.Jump), 0))...)
		b = append(b, nest(unix.NFTA_SET_ELEM_DATA, nest(unix.NFTA_DATA_VERDICT, v))...)
	}
	if withData && e.Comment != "" {
		b = append(b, rawAttr(unix.NFTA_SET_ELEM_USERDATA, udata(e.Comment))...)
	}
	return rawAttr(unix.NFTA_LIST_ELEM|unix.NLA_F_NESTED, b)
}

// maxElemList bounds the bytes of one message's element list: netlink attribute lengths
// are 16 bits, so a list over 64 KiB wraps (the kernel then refuses the message). Longer
// lists go in several messages of the same batch, as nft(8) does.
const maxElemList = 60000

func elemMsgs(typ int, flags uint16, fam uint8, table, set string, withData bool, es []Elem) []Op {
	var ops []Op
	var l []byte
	flush := func() {
		m := newMsg(nftType(typ), flags, fam)
		m.str(unix.NFTA_SET_ELEM_LIST_TABLE, table).str(unix.NFTA_SET_ELEM_LIST_SET, set)
		m.attr(unix.NFTA_SET_ELEM_LIST_ELEMENTS|unix.NLA_F_NESTED, l)
		ops = append(ops, Op{m})
		l = nil
	}
	for _, e := range es {
		b := e.encode(withData)
		if len(l) > 0 && len(l)+len(b) > maxElemList {
			flush()
		}
		l = append(l, b...)
	}
	flush()
	return ops
}

// AddElems adds elements to a set or map of table in family fam (NFPROTO_*), in as many
// messages as their size needs (see maxElemList). With excl
// the kernel refuses (EEXIST) any element whose key exists, whatever its value; without,
// it refuses only a key that exists with another value.
// It fails only for a comment longer than MaxComment, which the kernel would refuse with a
// bare ERANGE.
func AddElems(fam uint8, table, set string, excl bool, es ...Elem) ([]Op, error) {
	for _, e := range es {
		if len(e.Comment) > MaxComment {
			return nil, fmt.Errorf("element comment of %d bytes in %s (at most %d)", len(e.Comment), set, MaxComment)
		}
	}
	flags := uint16(unix.NLM_F_REQUEST | unix.NLM_F_ACK | unix.NLM_F_CREATE)
	if excl {
		flags |= unix.NLM_F_EXCL
	}
	return elemMsgs(unix.NFT_MSG_NEWSETELEM, flags, fam, table, set, true, es), nil
}

// DeleteElems deletes elements by key; the batch fails (ENOENT) when one is missing.
func DeleteElems(fam uint8, table, set string, es ...Elem) []Op {
	return elemMsgs(unix.NFT_MSG_DELSETELEM, unix.NLM_F_REQUEST|unix.NLM_F_ACK, fam, table, set, false, es)
}

// DeleteRuleIn deletes the rule with this handle from table/chain of family fam.
func DeleteRuleIn(fam uint8, table, chain string, handle uint64) Op {
	m := newMsg(nftType(unix.NFT_MSG_DELRULE), unix.NLM_F_REQUEST|unix.NLM_F_ACK, fam)
	m.str(unix.NFTA_RULE_TABLE, table).str(unix.NFTA_RULE_CHAIN, chain).u64(unix.NFTA_RULE_HANDLE, handle)
	return Op{m}
}

// Elem looks one element up by key (a point lookup, O(1) in hash sets). In interval sets
// the kernel answers with the element whose ranges contain key. ok is false when no
// element matches, or the set or table does not exist.
func (c *Conn) Elem(fam uint8, table, set string, key []byte) (e Elem, ok bool, err error) {
	m := elemMsgs(unix.NFT_MSG_GETSETELEM, unix.NLM_F_REQUEST, fam, table, set, false, []Elem{{Key: key}})[0].m
	objs, err := c.get(m)
	if errors.Is(err, unix.ENOENT) {
		return Elem{}, false, nil
	}
	if err != nil {
		return Elem{}, false, fmt.Errorf("get element of %s: %w", set, err)
	}
	var es []Elem
	for _, o := range objs {
		d, err := decodeElems(o)
		if err != nil {
			return Elem{}, false, err
		}
		es = append(es, d...)
	}
	if len(es) != 1 {
		return Elem{}, false, fmt.Errorf("get element of %s: %d answers", set, len(es))
	}
	return es[0], true, nil
}

// Elems dumps every element of a set (for audits; verbs use Elem). A missing set or table
// reads as empty.
//
// A dump is several requests that each skip the elements already sent, and a hash set
// that the kernel is resizing (it does so in the background after a large batch) reorders
// under them: measured, a dump of 10,000 elements right after they were added returned
// 10,164, some twice. Keys are unique in a set, so a repeated key proves the dump was
// disturbed; it is read again until one dump repeats no key and agrees with the previous
// one, or fails with ErrDumpInterrupted.
func (c *Conn) Elems(fam uint8, table, set string) ([]Elem, error) {
	var prev map[string]bool
	disturbed := false
	for attempt := 0; attempt < 10; attempt++ {
		es, err := c.elemsOnce(fam, table, set)
		if err != nil {
			return nil, err
		}
		keys := make(map[string]bool, len(es))
		dup := false
		for _, e := range es {
			k := string(e.Key) + "\x00" + string(e.KeyEnd)
			dup = dup || keys[k]
			keys[k] = true
		}
		switch {
		case dup:
			disturbed, prev = true, nil
		case !disturbed:
			return es, nil
		case prev != nil && sameKeys(prev, keys):
			return es, nil // after a disturbed dump, two clean dumps that agree
		default:
			prev = keys
		}
	}
	return nil, ErrDumpInterrupted
}

func sameKeys(a, b map[string]bool) bool {
	if len(a) != len(b) {
		return false
	}
	for k := range a {
		if !b[k] {
			return false
		}
	}
	return true
}

func (c *Conn) elemsOnce(fam uint8, table, set string) ([]Elem, error) {
	m := newMsg(nftType(unix.NFT_MSG_GETSETELEM), unix.NLM_F_REQUEST|unix.NLM_F_DUMP, fam)
	m.str(unix.NFTA_SET_ELEM_LIST_TABLE, table).str(unix.NFTA_SET_ELEM_LIST_SET, set)
	objs, err := c.get(m)
	if errors.Is(err, unix.ENOENT) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("dump elements of %s: %w", set, err)
	}
	var out []Elem
	for _, o := range objs {
		d, err := decodeElems(o)
		if err != nil {
			return nil, err
		}
		out = append(out, d...)
	}
	return out, nil
}

func decodeElems(b []byte) ([]Elem, error) {
	a, err := attrs(b)
	if err != nil {
		return nil, err
	}
	items, err := listElems(a.get(unix.NFTA_SET_ELEM_LIST_ELEMENTS))
	if err != nil {
		return nil, err
	}
	out := make([]Elem, 0, len(items))
	for _, it := range items {
		ea, err := attrs(it)
		if err != nil {
			return nil, err
		}
		value := func(typ uint16) []byte {
			v := ea.get(typ)
			if v == nil {
				return nil
			}
			va, err := attrs(v)
			if err != nil {
				return nil
			}
			return append([]byte(nil), va.get(unix.NFTA_DATA_VALUE)...)
		}
		e := Elem{Key: value(unix.NFTA_SET_ELEM_KEY), KeyEnd: value(nftaSetElemKeyEnd), Data: value(unix.NFTA_SET_ELEM_DATA)}
		if d := ea.get(unix.NFTA_SET_ELEM_DATA); d != nil {
			if da, err := attrs(d); err == nil {
				if v := da.get(unix.NFTA_DATA_VERDICT); v != nil {
					if va, err := attrs(v); err == nil {
						e.Jump = cstr(va.get(unix.NFTA_VERDICT_CHAIN))
					}
				}
			}
		}
		if e.Key == nil {
			// Interval sets dumped by older kernels carry start/end as separate, flagged
			// elements; none of the sets this is used for does.
			continue
		}
		e.Comment = elemComment(ea.get(unix.NFTA_SET_ELEM_USERDATA))
		out = append(out, e)
	}
	return out, nil
}

// listElems returns the payloads of a nested list's NFTA_LIST_ELEM entries, in order.
func listElems(b []byte) ([][]byte, error) {
	var out [][]byte
	for len(b) >= 4 {
		l := int(binary.NativeEndian.Uint16(b[0:]))
		if l < 4 || l > len(b) {
			return nil, errors.New("nf_tables netlink: malformed list")
		}
		if binary.NativeEndian.Uint16(b[2:])&nlaTypeMask == unix.NFTA_LIST_ELEM {
			out = append(out, b[4:l])
		}
		if align(l) >= len(b) {
			break
		}
		b = b[align(l):]
	}
	return out, nil
}

// elemComment finds the comment TLV in an element's user data.
func elemComment(u []byte) string {
	for len(u) >= 2 {
		typ, l := u[0], int(u[1])
		if 2+l > len(u) {
			return ""
		}
		if typ == 0 {
			return cstr(u[2 : 2+l])
		}
		u = u[2+l:]
	}
	return ""
}

// GenID reads the ruleset generation; pass it to CommitAt to fail the batch (ERESTART)
// if anyone committed since.
func (c *Conn) GenID() (uint32, error) {
	m := newMsg(nftType(unix.NFT_MSG_GETGEN), unix.NLM_F_REQUEST, unix.AF_UNSPEC)
	objs, err := c.get(m)
	if err != nil {
		return 0, fmt.Errorf("read ruleset generation: %w", err)
	}
	if len(objs) != 1 {
		return 0, fmt.Errorf("read ruleset generation: %d answers", len(objs))
	}
	a, err := attrs(objs[0])
	if err != nil {
		return 0, err
	}
	v := a.get(unix.NFTA_GEN_ID)
	if len(v) != 4 {
		return 0, errors.New("read ruleset generation: no id")
	}
	return binary.BigEndian.Uint32(v), nil
}
