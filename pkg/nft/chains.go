package nft

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// BaseChain is a chain registered at a netfilter hook.
type BaseChain struct {
	Family   uint8 // NFPROTO_* of its table
	Table    string
	Name     string
	Type     string // "filter", "nat", "route"
	Hook     uint32 // NF_INET_* hook number
	Priority int32
}

// BaseChains lists the base chains of every table of family fam (NFPROTO_IPV4, _IPV6,
// _INET, ...; NFPROTO_UNSPEC: of every family, in one dump), in the kernel's order.
//
// The kernel has no filter for them: a chain dump (NFT_MSG_GETCHAIN) sends every chain of
// the family, base or not, and kube-proxy's nftables table alone has one chain per service
// and per endpoint. So this decodes nothing of a regular chain but the absence of its hook
// attribute: measured with 12,000 chains (kube-proxy's nftables table of 2,000 services
// beside iptables-nft's nat table of 20,000 rules), ~3 ms, where google/nftables'
// ListChains, which decodes every chain into objects, took ~100 ms.
func (c *Conn) BaseChains(fam uint8) ([]BaseChain, error) {
	var out []BaseChain
	var bad error
	for try := 0; ; try++ {
		out, bad = nil, nil
		m := newMsg(nftType(unix.NFT_MSG_GETCHAIN), unix.NLM_F_REQUEST|unix.NLM_F_DUMP, fam)
		err := c.dumpFam(m, func(objFam uint8, obj []byte) {
			a := attrList(obj)
			hook := a.get(unix.NFTA_CHAIN_HOOK)
			if hook == nil || bad != nil {
				return
			}
			h := attrList(hook)
			num, prio := h.get(unix.NFTA_HOOK_HOOKNUM), h.get(unix.NFTA_HOOK_PRIORITY)
			if len(num) != 4 || len(prio) != 4 {
				bad = errors.New("nf_tables netlink: base chain without hook number or priority")
				return
			}
			out = append(out, BaseChain{
				Family:   objFam,
				Table:    cstr(a.get(unix.NFTA_CHAIN_TABLE)),
				Name:     cstr(a.get(unix.NFTA_CHAIN_NAME)),
				Type:     cstr(a.get(unix.NFTA_CHAIN_TYPE)),
				Hook:     binary.BigEndian.Uint32(num),
				Priority: int32(binary.BigEndian.Uint32(prio)),
			})
		})
		if errors.Is(err, ErrDumpInterrupted) && try < 2 {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("list chains: %w", err)
		}
		return out, bad
	}
}

// TableID names a table: its family (NFPROTO_*) and name.
type TableID struct {
	Family uint8
	Name   string
}

// Tables lists every table of every family in one dump: a node has a handful, so this is
// how a caller learns in one round trip which of the tables it would read exist.
func (c *Conn) Tables() ([]TableID, error) {
	for try := 0; ; try++ {
		var out []TableID
		m := newMsg(nftType(unix.NFT_MSG_GETTABLE), unix.NLM_F_REQUEST|unix.NLM_F_DUMP, unix.NFPROTO_UNSPEC)
		err := c.dumpFam(m, func(fam uint8, obj []byte) {
			out = append(out, TableID{Family: fam, Name: cstr(attrList(obj).get(unix.NFTA_TABLE_NAME))})
		})
		if errors.Is(err, ErrDumpInterrupted) && try < 2 {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("list tables: %w", err)
		}
		return out, nil
	}
}

// Layout is what a table holds besides elements and the rules' expressions: the names of
// its sets and, per chain that has rules, each rule's user data (nft keeps a rule's comment
// there), in order.
type Layout struct {
	Sets  []string
	Rules map[string][][]byte
}

// Layout reads the sets and rules of table in family fam in two dumps; ok is false when
// the table does not exist.
func (c *Conn) Layout(fam uint8, table string) (l Layout, ok bool, err error) {
	for try := 0; ; try++ {
		l = Layout{Rules: map[string][][]byte{}}
		m := newMsg(nftType(unix.NFT_MSG_GETSET), unix.NLM_F_REQUEST|unix.NLM_F_DUMP, fam)
		m.str(unix.NFTA_SET_TABLE, table)
		err = c.dump(m, func(obj []byte) {
			l.Sets = append(l.Sets, cstr(attrList(obj).get(unix.NFTA_SET_NAME)))
		})
		if err == nil {
			m = newMsg(nftType(unix.NFT_MSG_GETRULE), unix.NLM_F_REQUEST|unix.NLM_F_DUMP, fam)
			m.str(unix.NFTA_RULE_TABLE, table)
			err = c.dump(m, func(obj []byte) {
				a := attrList(obj)
				ch := cstr(a.get(unix.NFTA_RULE_CHAIN))
				l.Rules[ch] = append(l.Rules[ch], append([]byte(nil), a.get(unix.NFTA_RULE_USERDATA)...))
			})
		}
		switch {
		case errors.Is(err, ErrDumpInterrupted) && try < 2:
			continue
		case errors.Is(err, unix.ENOENT):
			return Layout{}, false, nil
		case err != nil:
			return Layout{}, false, fmt.Errorf("read table %s: %w", table, err)
		}
		return l, true, nil
	}
}
