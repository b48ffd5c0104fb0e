package plan

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/portguard/portguard/pkg/config"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/state"
)

// Takeover records one other owner's claims removed so a new attachment can have its port.
type Takeover struct {
	Family       string           `json:"family"`
	From         hostport.Owner   `json:"from"`
	Chain        string           `json:"chain"`
	Claims       []hostport.Claim `json:"claims"`
	Destinations []string         `json:"destinations"`
	ChainRemoved bool             `json:"chainRemoved"`
	For          hostport.Owner   `json:"for"`
	// Evidence is why the victim was judged stale (or, under conflictPolicy force, what
	// was known of it); nil when nobody judged it.
	Evidence *liveness.Evidence `json:"evidence,omitempty"`
}

// Conflict is another owner's mapping that overlaps a wanted claim.
type Conflict struct {
	Owner hostport.Owner
	Chain string
	Claim hostport.Claim
	Dest  string
}

func (c Conflict) String() string {
	owner := c.Owner.String()
	if c.Owner.IsZero() {
		owner = "chain " + c.Chain
	}
	return fmt.Sprintf("%s held by %s (-> %s)", c.Claim, owner, c.Dest)
}

// Result is what a verb's planner produced for one family.
type Result struct {
	Tx        *iptables.Tx
	Need      []string // chains to read before planning again
	Takeovers []Takeover
	Conflicts []Conflict
	Problems  []string // CHECK's findings
	// SharedChanges says Tx creates or restores shared layout (CNI-HOSTPORT-DNAT, entry
	// jumps, SETMARK/MASQ) instead of only asserting it.
	SharedChanges bool
	// Positioned says Tx inserts a rule at a rule number computed from the read, and
	// where exactly it lands matters (a victim's rewritten jump that another claim on one
	// of its ports follows): a concurrent writer (a parallel ADD inserting its jumps at
	// the top, a DEL) would shift it, so only an exclusive holder may apply Tx.
	Positioned bool
}

// victim is another attachment that loses some or all of its mappings.
type victim struct {
	a         *state.Attachment
	lost      []state.Mapping
	kept      []state.Mapping // mappings the victim keeps (partial takeover)
	keep      map[string]bool // "proto/port" still served by a remaining mapping
	removeAll bool
	partial   bool // only the contested ports' rules were read (state.Attachment.Partial)
}

// Add plans installing d, taking over conflicting claims of other owners unless the
// policy says otherwise. The state must hold CNI-HOSTPORT-DNAT; the chains of candidate
// victims are requested through Result.Need when they were not read.
func Add(s *state.State, d Desired, policy string) Result {
	if !s.DNATKnown() {
		return Result{Need: []string{state.DNATChain}}
	}
	var res Result
	victims, need := findVictims(s, d)
	if len(need) > 0 {
		return Result{Need: need}
	}
	for _, v := range victims {
		for _, m := range v.lost {
			for _, c := range d.Claims {
				if m.Claim.Conflicts(c) {
					res.Conflicts = append(res.Conflicts, Conflict{Owner: v.a.Owner, Chain: v.a.Chain, Claim: m.Claim, Dest: m.Dest.String()})
					break
				}
			}
		}
	}
	switch policy {
	case config.PolicyReject:
		if len(res.Conflicts) > 0 {
			return res
		}
	case config.PolicyAllow:
		victims = nil
	}

	tx := &iptables.Tx{}
	res.SharedChanges = ensureShared(tx, s, d.SNAT, d.ExternalMark, d.MarkBit)
	dnat := newSim(s.Table.Rules(state.DNATChain))
	for _, v := range victims {
		t, positioned := takeOver(tx, dnat, v, d, false)
		res.Takeovers = append(res.Takeovers, t)
		res.Positioned = res.Positioned || positioned
	}
	if own := s.Attachments[d.Chain]; own != nil {
		for _, j := range own.Jumps {
			tx.DeleteRule(j.Rule, "remove the attachment's previous jump")
			dnat.delete(j.Rule)
		}
	}
	tx.DeclareChain(d.Chain, "(re)create "+d.Chain)
	for _, r := range d.Rules {
		tx.AppendRule(r, "rule of "+d.Chain)
	}
	// New jumps go first: a fresh claim must win over anything older on its ports.
	for i, j := range d.Jumps {
		tx.InsertRule(j, i+1, "jump to "+d.Chain)
		dnat.insert(j, i+1)
	}
	res.Tx = tx
	return res
}

func portKey(proto string, port int) string { return proto + "/" + strconv.Itoa(port) }

// findVictims lists other attachments whose jumps touch a wanted (proto, port), reading
// their mappings to decide what really conflicts.
func findVictims(s *state.State, d Desired) ([]victim, []string) {
	var out []victim
	var need []string
	for _, a := range s.AttachmentsSorted() {
		if a.Chain == d.Chain || len(a.Jumps) == 0 || !touches(a, d) {
			continue
		}
		if !a.Read {
			need = append(need, a.Chain)
			continue
		}
		v := victim{a: a, keep: map[string]bool{}, partial: a.Partial}
		var remaining int
		read := map[string]bool{}
		for _, m := range a.Mappings {
			read[portKey(m.Claim.Proto, m.Claim.HostPort)] = true
			lost := false
			for _, c := range d.Claims {
				if m.Claim.Conflicts(c) {
					lost = true
					break
				}
			}
			if lost {
				v.lost = append(v.lost, m)
			} else {
				remaining++
				v.kept = append(v.kept, m)
				v.keep[portKey(m.Claim.Proto, m.Claim.HostPort)] = true
			}
		}
		if a.Partial {
			// The ports whose rules were not read stay the victim's: its jumps name them.
			for _, j := range a.Jumps {
				for _, p := range j.Ports {
					if k := portKey(j.Proto, p); !read[k] && !v.keep[k] {
						v.keep[k] = true
						remaining++
					}
				}
			}
		}
		if len(v.lost) == 0 {
			continue
		}
		v.removeAll = remaining == 0
		out = append(out, v)
	}
	return out, need
}

func touches(a *state.Attachment, d Desired) bool {
	for _, j := range a.Jumps {
		for _, c := range d.Claims {
			if j.Proto == c.Proto && j.HasPort(c.HostPort) {
				return true
			}
		}
	}
	return false
}

// takeOver removes v's lost mappings: the whole chain and its jumps when nothing remains,
// otherwise the mapping rules, and jump rules rewritten to the ports still served.
//
// A rewritten jump goes where it keeps its precedence: in the old jump's place (by rule
// number) when inPlace, or when a later rule of CNI-HOSTPORT-DNAT may match the same
// packets (then positioned is true: the number is only right while nobody else writes);
// otherwise at the end of the chain, which no concurrent insert at the top shifts.
func takeOver(tx *iptables.Tx, dnat *chainSim, v victim, d Desired, inPlace bool) (_ Takeover, positioned bool) {
	t := Takeover{Family: d.Family.String(), From: v.a.Owner, Chain: v.a.Chain, For: d.Owner, ChainRemoved: v.removeAll}
	for _, m := range v.lost {
		t.Claims = append(t.Claims, m.Claim)
		t.Destinations = append(t.Destinations, m.Dest.String())
	}
	why := fmt.Sprintf("take over %s from %s", v.a.Chain, v.a.Owner)
	if v.removeAll {
		for _, j := range v.a.Jumps {
			tx.DeleteRule(j.Rule, why)
			dnat.delete(j.Rule)
		}
		tx.RemoveChain(v.a.Chain, why)
		return t, false
	}
	// The victim keeps a chain only because it keeps other mappings. ADDs of other ports
	// may be taking those at the same moment (ADDs of different ports run in parallel),
	// and partial takeovers that together take everything would leave an empty chain
	// behind. One kept rule asserted is enough to stop that: the takers' ports are
	// disjoint (they hold different port locks), so when they take all of the victim, the
	// rule each asserts belongs to what the others take, and the last payload to land
	// finds its rule gone, fails whole and is planned again, then as a removal. (Asserting
	// every kept rule cost one search of the chain per rule: minutes for a port range.)
	// Two takers that rewrite one jump conflict on its -D anyway.
	//
	// A victim read in part is left to the caller, which removes the taken rules by handle
	// after the payload and the chain when no jump enters it any more (nft.RemoveTaken):
	// a -C naming its chain would make iptables-nft fetch all of it.
	if r, ok := keptRule(v); ok && !v.partial {
		tx.CheckRule(r, fmt.Sprintf("%s still holds what it keeps", v.a.Chain))
	}
	lostPort := map[string]bool{}
	for _, m := range v.lost {
		lostPort[portKey(m.Claim.Proto, m.Claim.HostPort)] = true
		for _, r := range m.Rules {
			tx.DeleteRule(r, why)
		}
	}
	for _, j := range v.a.Jumps {
		var ports []string
		changed := false
		for _, p := range j.Ports {
			k := portKey(j.Proto, p)
			if lostPort[k] && !v.keep[k] {
				changed = true
				continue
			}
			ports = append(ports, strconv.Itoa(p))
		}
		if !changed {
			continue
		}
		if len(ports) > 0 {
			flag := "--dports"
			if j.Rule.Value("--dports") == "" {
				flag = "--destination-ports"
			}
			nj := j.Rule.WithValue(flag, strings.Join(ports, ","))
			i := dnat.index(j.Rule)
			if inPlace || overlapsLater(dnat.rules[i+1:], state.ParseJump(nj)) {
				tx.InsertRule(nj, i+1, why)
				dnat.insert(nj, i+1)
				positioned = true
			} else {
				tx.AppendRule(nj, why)
				dnat.insert(nj, len(dnat.rules)+1)
			}
		}
		tx.DeleteRule(j.Rule, why)
		dnat.delete(j.Rule)
	}
	return t, positioned
}

// keptRule is the rule a partial takeover asserts the victim still has: the last rule
// (the DNAT) of its first kept mapping.
func keptRule(v victim) (iptables.Rule, bool) {
	for _, m := range v.kept {
		if len(m.Rules) > 0 {
			return m.Rules[len(m.Rules)-1], true
		}
	}
	return iptables.Rule{}, false
}

// overlapsLater tells whether any of the rules (those after a victim's jump) may match
// packets j matches, so j's place before them matters: a rule of another shape, or a jump
// elsewhere with j's protocol and one of its ports (or no port match). Jumps into j's own
// chain do not count: either one sends the packet to the same rules.
func overlapsLater(rules []iptables.Rule, j state.Jump) bool {
	for _, r := range rules {
		o := state.ParseJump(r)
		if o.Target == j.Target {
			continue
		}
		if !o.IsClaim() || o.Proto == "" || len(o.Ports) == 0 {
			return true
		}
		if o.Proto != j.Proto {
			continue
		}
		for _, p := range j.Ports {
			if o.HasPort(p) {
				return true
			}
		}
	}
	return false
}
