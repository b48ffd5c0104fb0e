package nftables

import (
	"fmt"
	"net/netip"
	"slices"

	gnft "github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/nft"
)

// Upstream portmap's nftables backend (containernetworking/plugins v1.10.0): tables
// `ip cni_hostport` and `ip6 cni_hostport`, one rule per mapping in chain hostports
// (`[ip daddr H] tcp dport P dnat to A:p`) and per container in chain masquerading, each
// with the raw container ID as comment (no network name).
const (
	UpstreamTable       = "cni_hostport"
	UpstreamHostports   = "hostports"
	UpstreamMasquerades = "masquerading"
)

// UpstreamRule is one rule of upstream's table.
type UpstreamRule struct {
	Family      hostport.Family
	Chain       string // UpstreamHostports or UpstreamMasquerades
	Handle      uint64
	ContainerID string // the rule's comment
	// Claim and Dest of a hostports rule; for a masquerading rule Dest's address is the
	// pod's (the rule's daddr) and Claim is zero.
	Claim hostport.Claim
	Dest  netip.AddrPort
}

func upstreamTable(f hostport.Family) *gnft.Table {
	if f == hostport.V6 {
		return &gnft.Table{Family: gnft.TableFamilyIPv6, Name: UpstreamTable}
	}
	return &gnft.Table{Family: gnft.TableFamilyIPv4, Name: UpstreamTable}
}

// Upstream reads the rules of upstream's tables in both families (missing tables or
// chains read as empty). Rules whose shape is not upstream's are skipped: they are not
// claims this backend can reason about, and it never deletes what it cannot name.
func (tx *Tx) Upstream() ([]UpstreamRule, error) {
	// One dump of the node's few tables first: on a node without upstream's tables (any
	// node that never ran it) that is the whole cost, one round trip instead of four reads.
	tables, err := tx.t.nl.Tables()
	if err != nil {
		return nil, err
	}
	var out []UpstreamRule
	for _, f := range hostport.Families {
		if !slices.Contains(tables, nft.TableID{Family: upstreamFamily(f), Name: UpstreamTable}) {
			continue
		}
		for _, chain := range []string{UpstreamHostports, UpstreamMasquerades} {
			rs, err := tx.t.g.GetRules(upstreamTable(f), &gnft.Chain{Name: chain})
			if isNotFound(err) {
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("read %s %s: %w", UpstreamTable, chain, err)
			}
			for _, r := range rs {
				if u, ok := decodeUpstream(f, chain, r); ok {
					out = append(out, u)
				}
			}
		}
	}
	return out, nil
}

func decodeUpstream(f hostport.Family, chain string, r *gnft.Rule) (UpstreamRule, bool) {
	id, ok := userdata.GetString(r.UserData, userdata.TypeComment)
	// Upstream's comment is the container ID, which the CNI grammar limits; anything else is
	// not upstream's rule (and must not reach repair's output or a log as an owner).
	if !ok || !hostport.ValidContainerID(id) {
		return UpstreamRule{}, false
	}
	u := UpstreamRule{Family: f, Chain: chain, Handle: r.Handle, ContainerID: id, Claim: hostport.Claim{Family: f}}
	doff, w := addrField(f, true)
	var load string
	regs := map[uint32][]byte{}
	var daddr netip.Addr
	dnat, masq := false, false
	var proto byte
	for _, e := range r.Exprs {
		switch x := e.(type) {
		case *expr.Payload:
			switch {
			case x.Base == expr.PayloadBaseNetworkHeader && x.Offset == doff && x.Len == w:
				load = "daddr"
			case x.Base == expr.PayloadBaseTransportHeader && x.Offset == 2 && x.Len == 2:
				load = "dport"
			default:
				load = ""
			}
		case *expr.Meta:
			load = ""
			if x.Key == expr.MetaKeyL4PROTO {
				load = "proto"
			}
		case *expr.Cmp:
			if x.Op != expr.CmpOpEq {
				load = ""
				continue
			}
			switch {
			case load == "daddr":
				daddr, _ = addrFrom(x.Data)
			case load == "proto" && len(x.Data) == 1:
				proto = x.Data[0]
			case load == "dport" && len(x.Data) == 2:
				u.Claim.HostPort = int(x.Data[0])<<8 | int(x.Data[1])
			}
			load = ""
		case *expr.Immediate:
			regs[x.Register] = x.Data
		case *expr.NAT:
			if x.Type != expr.NATTypeDestNAT {
				return UpstreamRule{}, false
			}
			a, ok := addrFrom(regs[x.RegAddrMin])
			p := regs[x.RegProtoMin]
			if !ok || len(p) < 2 {
				return UpstreamRule{}, false
			}
			u.Dest = netip.AddrPortFrom(a, uint16(p[0])<<8|uint16(p[1]))
			dnat = true
		case *expr.Masq:
			masq = true
		}
	}
	if chain == UpstreamMasquerades {
		if !masq || !daddr.IsValid() {
			return UpstreamRule{}, false
		}
		u.Claim = hostport.Claim{}
		u.Dest = netip.AddrPortFrom(daddr, 0)
		return u, true
	}
	if !dnat || proto == 0 || u.Claim.HostPort == 0 {
		return UpstreamRule{}, false
	}
	u.Claim.Proto = protoName(proto)
	u.Claim.HostIP = daddr
	return u, true
}

func upstreamFamily(f hostport.Family) uint8 {
	if f == hostport.V6 {
		return unix.NFPROTO_IPV6
	}
	return unix.NFPROTO_IPV4
}
