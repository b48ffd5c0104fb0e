package state

import (
	"net/netip"
	"sort"
	"strconv"
	"strings"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
)

// Jump is one rule of CNI-HOSTPORT-DNAT, in kernel order. A jump to a CNI-DN chain with an
// upstream comment is a claim by its owner on Ports over Proto.
type Jump struct {
	Rule   iptables.Rule
	Index  int // 0-based position in CNI-HOSTPORT-DNAT
	Owner  hostport.Owner
	Proto  string
	Ports  []int
	Target string
}

// IsClaim reports whether the jump enters a per-attachment chain.
func (j Jump) IsClaim() bool { return strings.HasPrefix(j.Target, hostport.ChainPrefix) }

// HasPort reports whether the jump matches the port.
func (j Jump) HasPort(p int) bool {
	for _, q := range j.Ports {
		if q == p {
			return true
		}
	}
	return false
}

// Mapping is one host port forwarded by an attachment's chain: its DNAT rule and the
// mark rules that go with it.
type Mapping struct {
	Claim hostport.Claim
	Dest  netip.AddrPort
	Rules []iptables.Rule
}

// Attachment is one per-attachment chain (CNI-DN-...) and the jumps that enter it.
type Attachment struct {
	Chain    string
	Owner    hostport.Owner // from the jump comment; zero when no jump names it
	Jumps    []Jump
	Read     bool // the chain's rules were read
	Exists   bool // the chain exists (known only when Read)
	Mappings []Mapping
	Other    []iptables.Rule // rules of the chain that are not a mapping's
	// Partial says only the chain's rules for some ports were read (ReadPart): Mappings
	// lists those, and the attachment holds whatever else its jumps name.
	Partial bool
}

// State is what one family's nat table looked like, as far as it was read.
type State struct {
	Family      hostport.Family
	Table       *iptables.Table
	Jumps       []Jump // every rule of CNI-HOSTPORT-DNAT (that was read), in order
	Attachments map[string]*Attachment
	partial     map[string]bool // chains read in part (ReadPart)
	// SharedShown says the shared chains were not read but the kernel was shown to hold
	// the shared layout's rules (entry jumps, and SETMARK, MASQ and POSTROUTING's jump
	// when masquerading) exactly, over netlink (nft.Conn.SharedLayout): a plan may take
	// those rules as present instead of asserting them.
	SharedShown bool
	// dnatPos, from NewExcerpt: the kernel position of each rule of CNI-HOSTPORT-DNAT the
	// table holds (it holds only some).
	dnatPos []int
}

// New interprets a table. Call it again (or Refresh) after reading more chains.
func New(f hostport.Family, t *iptables.Table) *State {
	s := &State{Family: f, Table: t}
	s.Refresh()
	return s
}

// NewExcerpt interprets a table whose CNI-HOSTPORT-DNAT holds only some of the chain's
// rules: a reader left out those that cannot matter to the verb (CHECK's read over
// netlink keeps the jumps to the attachment's chain and the rules on its ports; see
// nft.Conn.Excerpt). pos[i] is the 0-based kernel position of the table's rule i of that
// chain, so Jump.Index keeps numbering the kernel's rules. Plan with such a state only
// for a verb whose decisions need no other rule of the chain.
func NewExcerpt(f hostport.Family, t *iptables.Table, pos []int) *State {
	s := &State{Family: f, Table: t, dnatPos: pos}
	s.Refresh()
	return s
}

// Observe reads the named chains (one process each) and interprets them.
func Observe(r iptables.Runner, f hostport.Family, chains ...string) (*State, error) {
	s := New(f, iptables.NewTable())
	return s, s.Read(r, chains...)
}

// ObserveAll reads the whole nat table with one process (audit, repair, GC).
func ObserveAll(r iptables.Runner, f hostport.Family) (*State, error) {
	t := iptables.NewTable()
	if err := r.Save(f, t); err != nil {
		return nil, err
	}
	t.Full = true
	return New(f, t), nil
}

// Read adds chains that were not read yet.
func (s *State) Read(r iptables.Runner, chains ...string) error {
	for _, c := range chains {
		if s.Table.Known(c) {
			continue
		}
		if err := r.List(s.Family, c, s.Table); err != nil {
			return err
		}
	}
	s.Refresh()
	return nil
}

// ReadPart records rules of an attachment chain that was read only in part: its rules
// for some ports (found by handle, see nft.TakenRules), not the whole chain.
func (s *State) ReadPart(chain string, rules []iptables.Rule) {
	if s.partial == nil {
		s.partial = map[string]bool{}
	}
	s.partial[chain] = true
	s.Table.Add(chain, rules...)
	s.Refresh()
}

// Refresh rebuilds the model from the table.
func (s *State) Refresh() {
	s.Jumps = nil
	s.Attachments = map[string]*Attachment{}
	for i, r := range s.Table.Rules(DNATChain) {
		j := parseJump(r)
		j.Index = i
		if i < len(s.dnatPos) {
			j.Index = s.dnatPos[i]
		}
		s.Jumps = append(s.Jumps, j)
		if j.IsClaim() {
			a := s.attachment(j.Target)
			a.Jumps = append(a.Jumps, j)
			if a.Owner.IsZero() {
				a.Owner = j.Owner
			}
		}
	}
	for _, name := range s.Table.Order {
		if strings.HasPrefix(name, hostport.ChainPrefix) {
			a := s.attachment(name)
			a.Read, a.Exists, a.Partial = true, true, s.partial[name]
			a.Mappings, a.Other = parseMappings(s.Family, s.Table.Rules(name))
		}
	}
	for name, a := range s.Attachments {
		if s.Table.Absent(name) {
			a.Read = true
		}
	}
}

func (s *State) attachment(chain string) *Attachment {
	a, ok := s.Attachments[chain]
	if !ok {
		a = &Attachment{Chain: chain}
		s.Attachments[chain] = a
	}
	return a
}

// DNATKnown and DNATExists describe CNI-HOSTPORT-DNAT itself.
func (s *State) DNATKnown() bool  { return s.Table.Known(DNATChain) }
func (s *State) DNATExists() bool { return s.Table.Has(DNATChain) }

// HasRule reports whether a chain that was read holds a rule equal in meaning to r.
// Rules are compared after normalising the way iptables prints them.
func (s *State) HasRule(r iptables.Rule) bool {
	want, target := Normalize(r), r.Target()
	for _, have := range s.Table.Rules(r.Chain) {
		// Equal rules have equal targets; comparing those first spares normalising the
		// thousands of jumps of a read CNI-HOSTPORT-DNAT.
		if have.Target() == target && Normalize(have) == want {
			return true
		}
	}
	return false
}

// AttachmentsSorted lists attachments by chain name (stable output for reports).
func (s *State) AttachmentsSorted() []*Attachment {
	out := make([]*Attachment, 0, len(s.Attachments))
	for _, a := range s.Attachments {
		out = append(out, a)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Chain < out[j].Chain })
	return out
}

// ParseJump reads a rule of CNI-HOSTPORT-DNAT as a Jump (Index left 0).
func ParseJump(r iptables.Rule) Jump { return parseJump(r) }

func parseJump(r iptables.Rule) Jump {
	j := Jump{Rule: r, Target: r.Target(), Proto: r.Value("-p", "--protocol")}
	if o, ok := hostport.ParseComment(r.Value("--comment")); ok {
		j.Owner = o
	}
	if ports := r.Value("--dports", "--destination-ports", "--dport", "--destination-port"); ports != "" {
		j.Ports = parsePorts(ports)
	}
	return j
}

// parsePorts reads a multiport list ("8080,9000:9002" ranges expanded).
func parsePorts(s string) []int {
	var out []int
	for _, part := range strings.Split(s, ",") {
		lo, hi, isRange := strings.Cut(part, ":")
		a, err := strconv.Atoi(lo)
		if err != nil {
			continue
		}
		b := a
		if isRange {
			if b, err = strconv.Atoi(hi); err != nil || b < a || b-a > 65535 {
				continue
			}
		}
		for p := a; p <= b; p++ {
			out = append(out, p)
		}
	}
	return out
}

func parseAddr(s string) netip.Addr {
	if s == "" {
		return netip.Addr{}
	}
	if p, err := netip.ParsePrefix(s); err == nil {
		return p.Addr()
	}
	a, _ := netip.ParseAddr(s)
	return a
}

type mappingKey struct {
	proto string
	ip    netip.Addr
	port  int
}

// parseMappings groups a per-attachment chain's rules by (proto, hostIP, port). A mapping
// exists where a DNAT rule does; mark rules join the DNAT rule with the same key.
func parseMappings(f hostport.Family, rules []iptables.Rule) ([]Mapping, []iptables.Rule) {
	var order []mappingKey
	byKey := map[mappingKey]*Mapping{}
	var other []iptables.Rule
	pending := map[mappingKey][]iptables.Rule{}
	for _, r := range rules {
		port, err := strconv.Atoi(r.Value("--dport", "--destination-port"))
		proto := r.Value("-p", "--protocol")
		if err != nil || proto == "" {
			other = append(other, r)
			continue
		}
		k := mappingKey{proto: proto, ip: parseAddr(r.Value("-d", "--destination")), port: port}
		if r.Target() == "DNAT" {
			dest, err := netip.ParseAddrPort(r.Value("--to-destination"))
			if err != nil {
				other = append(other, r)
				continue
			}
			if m, dup := byKey[k]; dup {
				// A second DNAT for the same key never wins; keep it with the first.
				m.Rules = append(m.Rules, r)
				continue
			}
			m := &Mapping{Claim: hostport.Claim{Family: f, Proto: proto, HostIP: k.ip, HostPort: port}, Dest: dest}
			m.Rules = append(pending[k], r)
			delete(pending, k)
			byKey[k] = m
			order = append(order, k)
			continue
		}
		if m, ok := byKey[k]; ok {
			m.Rules = append(m.Rules, r)
		} else {
			pending[k] = append(pending[k], r)
		}
	}
	for _, rs := range pending {
		other = append(other, rs...)
	}
	out := make([]Mapping, 0, len(order))
	for _, k := range order {
		out = append(out, *byKey[k])
	}
	return out, other
}
