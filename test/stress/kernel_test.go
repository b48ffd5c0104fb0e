package stress

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/portguard/portguard/pkg/backend/nftables"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/nft"
)

// The storm and crash tests run against each backend: kernel is how a test reads a
// backend's claims off the node, so the scenarios and their models stay one.
type kernel struct {
	// backend is the configuration's "backend" ("" for iptables, the default here).
	backend string
	// atomic: every change of a call is one transaction over both families, so a killed
	// call leaves both families as before or both as after it (iptables: each family alone).
	atomic bool
	// observe reads the node's state (under the portguard lock when the caller holds it).
	observe func(n *node) (snapshot, error)
}

// snapshot is one reading of the node's port claims.
type snapshot interface {
	// holdings are a family's claims per attachment, keyed by the attachment's chain name
	// (hostport.ChainName, whatever the backend calls it).
	holdings(f hostport.Family) holdings
	// verify compares a family with the model; every problem starts with its class
	// (HALF-INSTALLED, LOST, DUPLICATE, UNEXPECTED, MISMATCH, SHARED, GUARD, MASQ).
	verify(f hostport.Family, want holdings, byChain map[string]*attachment) []string
	// foreign is what of the family's rules is not portguard's (it must never change).
	foreign(f hostport.Family) string
	// dump is the raw listing, for failure messages.
	dump() string
}

var iptablesKernel = kernel{observe: func(n *node) (snapshot, error) {
	s := iptSnapshot{}
	for _, f := range hostport.Families {
		o, err := n.observe(f)
		if err != nil {
			return nil, err
		}
		s[f] = o
	}
	return s, nil
}}

// iptSnapshot is both families' nat tables (iptables-save and state.ObserveAll).
type iptSnapshot map[hostport.Family]*observation

func (s iptSnapshot) holdings(f hostport.Family) holdings { return kernelHoldings(s[f].s) }

func (s iptSnapshot) verify(f hostport.Family, want holdings, byChain map[string]*attachment) []string {
	return verify(s[f], want, byChain)
}

func (s iptSnapshot) foreign(f hostport.Family) string { return foreignText(s[f].raw) }

func (s iptSnapshot) dump() string {
	var b strings.Builder
	for _, f := range hostport.Families {
		fmt.Fprintf(&b, "--- %s nat table\n%s\n", f, s[f].raw)
	}
	return b.String()
}

var nftablesKernel = kernel{backend: "nftables", atomic: true, observe: observeNFT}

// foreignNFT is a table of another component (kube-proxy's nftables mode stands for all)
// loaded before portguard runs on the nftables backend; it must stay byte-identical.
const foreignNFT = `table inet kube-proxy-stress {
	map service-ips {
		type ipv4_addr . inet_proto . inet_service : verdict
		elements = { 10.96.0.10 . udp . 53 : goto svc-dns }
	}
	chain svc-dns {
		meta l4proto udp dnat ip to 10.244.0.5:53
	}
	chain nat-prerouting {
		type nat hook prerouting priority -100; policy accept;
		ip daddr . meta l4proto . th dport vmap @service-ips
	}
	chain nat-output {
		type nat hook output priority -100; policy accept;
		ip daddr . meta l4proto . th dport vmap @service-ips
	}
}
`

func (n *node) loadForeignNFT() {
	n.t.Helper()
	if _, err := runCmd(30*time.Second, []byte(foreignNFT), "ip", "netns", "exec", n.ns, "nft", "-f", "-"); err != nil {
		n.t.Fatal(err)
	}
}

// nftSnapshot is portguard's inet table read through the backend's own Dump (claims,
// masquerade entries) and its guard maps read raw, with the iptables foreign rules and
// the foreign nftables table beside it.
type nftSnapshot struct {
	d nftables.Dump
	// guards: family -> "proto/port" -> the guard's value (0: a wildcard claim holds the
	// port; n > 0: n host IP claims do).
	guards   map[hostport.Family]map[string]uint32
	raw      string
	iptables iptSnapshot
	other    string // nft list table inet kube-proxy-stress ("" when absent)
	byOwner  map[string]string
}

// guardSet is the layout's guard map of a family (see the nftables package's
// testdata/layout.golden).
func guardSet(f hostport.Family) string {
	if f == hostport.V6 {
		return "guard6"
	}
	return "guard4"
}

var protoNames = map[byte]string{unix.IPPROTO_TCP: "tcp", unix.IPPROTO_UDP: "udp", unix.IPPROTO_SCTP: "sctp"}

func observeNFT(n *node) (snapshot, error) {
	s := &nftSnapshot{guards: map[hostport.Family]map[string]uint32{}}
	h, err := ns.GetNS("/var/run/netns/" + n.ns)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	err = h.Do(func(ns.NetNS) error {
		t, err := nftables.Open()
		if err != nil {
			return err
		}
		defer t.Close()
		if s.d, err = t.Dump(); err != nil {
			return fmt.Errorf("dump of inet %s: %w", nftables.TableName, err)
		}
		c, err := nft.Open()
		if err != nil {
			return err
		}
		defer c.Close()
		for _, f := range hostport.Families {
			es, err := c.Elems(unix.NFPROTO_INET, nftables.TableName, guardSet(f))
			if err != nil {
				return fmt.Errorf("guards: %w", err)
			}
			m := map[string]uint32{}
			for _, e := range es {
				if len(e.Key) != 8 || len(e.Data) != 4 {
					return fmt.Errorf("guard element %x : %x of an unexpected shape", e.Key, e.Data)
				}
				m[protoNames[e.Key[0]]+"/"+strconv.Itoa(int(binary.BigEndian.Uint16(e.Key[4:6])))] = binary.BigEndian.Uint32(e.Data)
			}
			s.guards[f] = m
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	s.raw, _ = runCmd(30*time.Second, nil, "ip", "netns", "exec", n.ns, "nft", "list", "table", "inet", nftables.TableName)
	s.other, _ = runCmd(30*time.Second, nil, "ip", "netns", "exec", n.ns, "nft", "list", "table", "inet", "kube-proxy-stress")
	ipt, err := iptablesKernel.observe(n)
	if err != nil {
		return nil, err
	}
	s.iptables = ipt.(iptSnapshot)
	return s, nil
}

// chainOf names an element's owner by its attachment's chain name (the key of holdings);
// unknown comments stay as they are.
func chainOf(comment string, byChain map[string]*attachment) string {
	for c, a := range byChain {
		if nftables.OwnerComment(a.owner()) == comment {
			return c
		}
	}
	return "comment " + strconv.Quote(comment)
}

func (s *nftSnapshot) holdings(f hostport.Family) holdings {
	out := holdings{}
	for _, e := range s.d.Claims {
		if e.Claim.Family != f {
			continue
		}
		c := hostport.ChainName(e.Owner)
		if e.Owner.IsZero() {
			c = "comment " + strconv.Quote(e.Comment)
		}
		if out[c] == nil {
			out[c] = map[string]bool{}
		}
		out[c][e.Claim.Proto+"/"+strconv.Itoa(e.Claim.HostPort)] = true
	}
	return out
}

func (s *nftSnapshot) verify(f hostport.Family, want holdings, byChain map[string]*attachment) []string {
	var problems []string
	name := func(chain string) string {
		if a := byChain[chain]; a != nil {
			return a.Name
		}
		return chain
	}
	claimed := map[string][]string{} // proto/port -> owners (wildcard and host IP claims)
	wild := map[string]bool{}
	for _, e := range s.d.Claims {
		if e.Claim.Family != f {
			continue
		}
		k := e.Claim.Proto + "/" + strconv.Itoa(e.Claim.HostPort)
		c := chainOf(e.Comment, byChain)
		claimed[k] = append(claimed[k], name(c))
		a := byChain[c]
		if a == nil {
			problems = append(problems, fmt.Sprintf("UNEXPECTED: %s element of no attachment of the test: %s", f, e))
			continue
		}
		if e.Claim.AnyHostIP() {
			wild[k] = true
		} else {
			problems = append(problems, fmt.Sprintf("UNEXPECTED: %s host IP claim (the test makes none): %s", f, e))
		}
		if e.Gate != "" {
			problems = append(problems, fmt.Sprintf("MISMATCH: %s %s has a gate (no conditions in the test): %s", f, a.Name, e))
		}
		dest := ""
		for _, m := range a.Maps {
			if p, err := netip.ParsePrefix(a.ip(f)); err == nil && m.key() == k {
				dest = netip.AddrPortFrom(p.Addr(), uint16(m.CtrPort)).String()
			}
		}
		if e.Dest.String() != dest {
			problems = append(problems, fmt.Sprintf("MISMATCH: %s %s forwards %s to %s, want %q", f, a.Name, k, e.Dest, dest))
		}
	}
	for k, os := range claimed {
		if len(os) > 1 {
			problems = append(problems, fmt.Sprintf("DUPLICATE: %s %s claimed %d times: %s", f, k, len(os), strings.Join(os, ", ")))
		}
	}
	// The guards agree with the claims: one per claimed port, 0 for a wildcard claim, and
	// none for a port nobody claims.
	for k := range claimed {
		v, ok := s.guards[f][k]
		switch {
		case !ok:
			problems = append(problems, fmt.Sprintf("GUARD: %s %s is claimed by %v but has no guard", f, k, claimed[k]))
		case wild[k] && v != 0:
			problems = append(problems, fmt.Sprintf("GUARD: %s %s has a wildcard claim but its guard counts %d host IP claims", f, k, v))
		}
	}
	for k, v := range s.guards[f] {
		if len(claimed[k]) == 0 {
			problems = append(problems, fmt.Sprintf("GUARD: %s %s has a guard (%d) but no claim", f, k, v))
		}
	}

	have := s.holdings(f)
	for _, c := range sortedChains(want) {
		for _, k := range keysOf(want[c]) {
			if !have[c][k] {
				problems = append(problems, fmt.Sprintf("LOST: %s %s no longer claims %s (the model says it holds %v)", f, name(c), k, keysOf(want[c])))
			}
		}
	}
	for _, c := range sortedChains(have) {
		for _, k := range keysOf(have[c]) {
			if !want[c][k] {
				problems = append(problems, fmt.Sprintf("UNEXPECTED: %s %s claims %s (the model says it holds %v)", f, name(c), k, keysOf(want[c])))
			}
		}
	}

	// Masquerade entries (snat, the default): each holder has the entry of its address in
	// this family; every entry is of a test attachment's address, and of one that still
	// holds a claim in some family (nothing of a DELeted or taken-over owner stays).
	holds := map[string]bool{}
	for _, e := range s.d.Claims {
		holds[e.Comment] = true
	}
	masq := map[string]bool{}
	for _, m := range s.d.Masq {
		if m.Family != f {
			continue
		}
		c := chainOf(m.Comment, byChain)
		a := byChain[c]
		switch {
		case a == nil:
			problems = append(problems, fmt.Sprintf("MASQ: %s entry of no attachment of the test: %s %q", f, m.PodIP, m.Comment))
		case !holds[m.Comment]:
			problems = append(problems, fmt.Sprintf("MASQ: %s entry %s of %s, which holds no claim", f, m.PodIP, a.Name))
		case m.All || a.ip(f) == "" || m.PodIP.String() != strings.Split(a.ip(f), "/")[0]:
			problems = append(problems, fmt.Sprintf("MISMATCH: %s masquerade entry of %s: %s (all %v), want its address %s", f, a.Name, m.PodIP, m.All, a.ip(f)))
		default:
			masq[c] = true
		}
	}
	for _, c := range sortedChains(want) {
		if !masq[c] {
			problems = append(problems, fmt.Sprintf("MASQ: %s %s holds %v but has no masquerade entry", f, name(c), keysOf(want[c])))
		}
	}
	sort.Strings(problems)
	return problems
}

func (s *nftSnapshot) foreign(f hostport.Family) string {
	out := s.iptables.foreign(f)
	if f == hostport.V4 {
		out += "\n" + s.other
	}
	if strings.Contains(s.iptables[f].raw, hostport.ChainPrefix) {
		out += "\nportguard's iptables chains exist on the nftables backend"
	}
	return out
}

func (s *nftSnapshot) dump() string {
	return "--- nft list table inet " + nftables.TableName + "\n" + s.raw + "\n" + s.iptables.dump()
}
