package plan

import (
	"fmt"
	"math/bits"
	"sort"
	"strconv"
	"strings"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/state"
)

// Claim statuses in an audit: which claim on a host port receives the traffic.
const (
	// StatusWins: the claim receives the port's traffic for its host IP (no earlier claim
	// that wins conflicts with it).
	StatusWins = "wins"
	// StatusShadowed: an earlier claim in CNI-HOSTPORT-DNAT that conflicts with this one
	// wins; this one receives nothing until the other goes.
	StatusShadowed = "shadowed"
	// StatusNoDNAT: the jump sends the port into a chain that has no DNAT rule for it, so
	// packets fall through to the next rule.
	StatusNoDNAT = "no-dnat"
)

// Problem kinds an audit reports. The names are part of the documented JSON shape.
const (
	KindShadowedClaim    = "shadowed-claim"
	KindDuplicateJump    = "duplicate-jump"
	KindOrphanChain      = "orphan-chain"
	KindPortMismatch     = "port-mismatch"
	KindMissingEntryJump = "missing-entry-jump"
	KindMissingSetMark   = "missing-setmark"
	KindMissingMasq      = "missing-masq"
	KindMissingMasqJump  = "missing-masq-jump"
)

// DefaultMarkBit is upstream portmap's markMasqBit default (0x2000).
const DefaultMarkBit = 13

// AuditClaim is one claim on a host port, as one jump of CNI-HOSTPORT-DNAT makes it.
type AuditClaim struct {
	Position    int    `json:"position"` // 1-based rule number of the jump in CNI-HOSTPORT-DNAT
	Network     string `json:"network"`
	ContainerID string `json:"containerID"`
	Chain       string `json:"chain"`
	HostIP      string `json:"hostIP"`      // "" = every local address
	Destination string `json:"destination"` // pod IP:port; "" when the chain has no DNAT for the port
	Status      string `json:"status"`
	ShadowedBy  string `json:"shadowedBy,omitempty"` // chain of the winning claim
	// OwnerState is "alive", "stale" or "unknown" (pkg/liveness); "" when not judged.
	OwnerState string             `json:"ownerState,omitempty"`
	Evidence   *liveness.Evidence `json:"evidence,omitempty"`

	owner hostport.Owner
	a     *state.Attachment
	m     *state.Mapping // nil for StatusNoDNAT
}

// Owner returns the claim's owner.
func (c AuditClaim) Owner() hostport.Owner { return c.owner }

// PortClaims is every claim on one (protocol, host port), in jump order.
type PortClaims struct {
	Protocol string       `json:"protocol"`
	HostPort int          `json:"hostPort"`
	Claims   []AuditClaim `json:"claims"`
}

// Problem is one finding: what is wrong and the fix.
type Problem struct {
	Kind        string `json:"kind"`
	Chain       string `json:"chain,omitempty"`
	Network     string `json:"network,omitempty"`
	ContainerID string `json:"containerID,omitempty"`
	Protocol    string `json:"protocol,omitempty"`
	HostPort    int    `json:"hostPort,omitempty"`
	Message     string `json:"message"`
	Fix         string `json:"fix"`
}

// AuditSummary counts what the audit saw; the prometheus output is built from it.
type AuditSummary struct {
	Chains         int `json:"chains"`
	Claims         int `json:"claims"`
	HostPorts      int `json:"hostPorts"`
	ShadowedClaims int `json:"shadowedClaims"` // claims with status shadowed (problem kind shadowed-claim)
	// Deprecated: DuplicateClaims is ShadowedClaims under its former name, still emitted for
	// one release (docs/audit-json.md).
	DuplicateClaims   int `json:"duplicateClaims"`
	DuplicateJumps    int `json:"duplicateJumps"`
	OrphanChains      int `json:"orphanChains"`
	PortMismatches    int `json:"portMismatches"`
	MissingEntryJumps int `json:"missingEntryJumps"`
	MissingMasquerade int `json:"missingMasquerade"`
	AddressReuses     int `json:"addressReuses"`
	// nftables backend only (zero for iptables): problems of kinds split-claim,
	// stale-upstream-rule, layout-damaged, orphan-gate and orphan-masquerade.
	SplitClaims        int `json:"splitClaims"`
	StaleUpstreamRules int `json:"staleUpstreamRules"`
	LayoutProblems     int `json:"layoutProblems"`
	OrphanElements     int `json:"orphanElements"`
	AliveOwners        int `json:"aliveOwners"` // claims whose owner was judged alive
	StaleOwners        int `json:"staleOwners"` // claims whose owner was judged stale
	Problems           int `json:"problems"`
}

// FamilyAudit is the audit of one family's nat table.
type FamilyAudit struct {
	Family hostport.Family `json:"family"`
	// Backend is what was audited: BackendIPTables (the family's nat table) or
	// BackendNFTables (portguard's inet table and upstream's cni_hostport tables).
	Backend      string       `json:"backend"`
	Available    bool         `json:"available"`
	Error        string       `json:"error,omitempty"`
	Ports        []PortClaims `json:"ports"`
	OrphanChains []string     `json:"orphanChains"`
	Problems     []Problem    `json:"problems"`
	Summary      AuditSummary `json:"summary"`
}

// Healthy reports whether the family was read and shows no problem.
func (fa FamilyAudit) Healthy() bool { return fa.Available && len(fa.Problems) == 0 }

// AuditReport is `portguardctl audit -o json` (documented in docs/audit-json.md).
type AuditReport struct {
	Kind     string        `json:"kind"`       // always "PortguardAudit"
	Version  int           `json:"apiVersion"` // shape version, 1
	Healthy  bool          `json:"healthy"`
	Families []FamilyAudit `json:"families"`
}

// NewAuditReport wraps family audits.
func NewAuditReport(fas []FamilyAudit) AuditReport {
	r := AuditReport{Kind: "PortguardAudit", Version: 1, Healthy: true, Families: fas}
	if r.Families == nil {
		r.Families = []FamilyAudit{}
	}
	// A family that could not be read (no IPv6 stack) does not make the node unhealthy;
	// it shows as available=false, and the CLI fails when it was asked for explicitly.
	for _, fa := range fas {
		if fa.Available && len(fa.Problems) > 0 {
			r.Healthy = false
		}
	}
	return r
}

// UnavailableAudit records a family whose table could not be read.
func UnavailableAudit(f hostport.Family, err error) FamilyAudit {
	return FamilyAudit{Family: f, Backend: BackendIPTables, Error: err.Error(), Ports: []PortClaims{}, OrphanChains: []string{}, Problems: []Problem{}}
}

// analysis is what audit and repair both derive from a complete state.
type analysis struct {
	s         *state.State
	claims    []*AuditClaim // in jump order; a jump with several ports yields several
	dupJumps  []state.Jump  // jumps equal to an earlier jump into the same chain
	orphans   []*state.Attachment
	jumpOnly  map[string][]string // chain -> "proto/port" its jumps send but it does not DNAT
	dnatOnly  map[string][]string // chain -> "proto/port" it DNATs but no jump sends
	markBit   int
	unknown   []hostport.Owner // --keep owners without a claim in this family
	conflicts []string         // --keep owners that conflict with each other
	// spare are claims repair must keep although they lose their port: their owner is
	// alive and so is the winner's (neither named by --keep); liveContests says so.
	spare        map[*AuditClaim]bool
	liveContests []string
}

// analyze models every claim. lastWins decides contested ports among owners not in keep:
// false is the kernel's view (the first jump wins; audit), true keeps the last jump
// (repair: upstream portmap appends, so the last claim is the newest one), after the
// claims of owners j judges alive or cannot judge (nil j: none).
func analyze(s *state.State, keep map[hostport.Owner]bool, lastWins bool, j Liveness) *analysis {
	an := &analysis{s: s, jumpOnly: map[string][]string{}, dnatOnly: map[string][]string{}, markBit: markBit(s),
		spare: map[*AuditClaim]bool{}}
	seen := map[string]bool{}
	for _, j := range s.Jumps {
		if !j.IsClaim() {
			continue
		}
		k := state.Normalize(j.Rule)
		if seen[k] {
			an.dupJumps = append(an.dupJumps, j)
			continue
		}
		seen[k] = true
		a := s.Attachments[j.Target]
		ports := j.Ports
		if len(ports) == 0 { // a jump without a port match sends every port of its protocol
			for _, m := range a.Mappings {
				if j.Proto == "" || m.Claim.Proto == j.Proto {
					ports = append(ports, m.Claim.HostPort)
				}
			}
		}
		done := map[int]bool{}
		for _, p := range ports {
			if done[p] {
				continue
			}
			done[p] = true
			found := false
			for i := range a.Mappings {
				m := &a.Mappings[i]
				if m.Claim.HostPort != p || (j.Proto != "" && m.Claim.Proto != j.Proto) {
					continue
				}
				found = true
				an.claims = append(an.claims, &AuditClaim{Position: j.Index + 1, Chain: a.Chain, owner: a.Owner, a: a, m: m,
					HostIP: hostIPString(m.Claim), Destination: m.Dest.String(), Status: StatusWins})
			}
			if !found {
				an.claims = append(an.claims, &AuditClaim{Position: j.Index + 1, Chain: a.Chain, owner: a.Owner, a: a,
					Status: StatusNoDNAT, Destination: "", HostIP: "", m: &state.Mapping{Claim: hostport.Claim{Family: s.Family, Proto: j.Proto, HostPort: p}}})
			}
		}
	}
	for _, c := range an.claims {
		c.Network, c.ContainerID = c.owner.Network, c.owner.ContainerID
	}
	an.resolve(keep, lastWins, j)

	for _, a := range s.AttachmentsSorted() {
		if !a.Exists {
			continue
		}
		if len(a.Jumps) == 0 {
			an.orphans = append(an.orphans, a)
			continue
		}
		jp, dp := map[string]bool{}, map[string]bool{}
		for _, c := range an.claims {
			if c.a == a {
				jp[portKey(c.m.Claim.Proto, c.m.Claim.HostPort)] = true
			}
		}
		for _, m := range a.Mappings {
			dp[portKey(m.Claim.Proto, m.Claim.HostPort)] = true
		}
		for k := range jp {
			if !dp[k] {
				an.jumpOnly[a.Chain] = append(an.jumpOnly[a.Chain], k)
			}
		}
		for k := range dp {
			if !jp[k] {
				an.dnatOnly[a.Chain] = append(an.dnatOnly[a.Chain], k)
			}
		}
		sortPortKeys(an.jumpOnly[a.Chain])
		sortPortKeys(an.dnatOnly[a.Chain])
	}
	return an
}

// resolve decides which claims win: claims of kept owners first (in jump order), then,
// with j, claims of owners alive or not judgeable, then every other claim, each tier in
// jump order (reversed when lastWins); a claim that conflicts with one already winning is
// shadowed by it. Without keep, j and lastWins this is exactly what the kernel does: the
// first matching jump of CNI-HOSTPORT-DNAT gets the packet. A live claim shadowed by
// another live claim is spared: which of two live pods keeps a port is the operator's
// call (--keep), never repair's.
func (an *analysis) resolve(keep map[hostport.Owner]bool, lastWins bool, j Liveness) {
	const kept, live, rest = 0, 1, 2
	tier := func(c *AuditClaim) int {
		switch {
		case keep[c.owner]:
			return kept
		case protected(j, c):
			return live
		}
		return rest
	}
	var winners []*AuditClaim
	found := map[hostport.Owner]bool{}
	for t := kept; t <= rest; t++ {
		order := an.claims
		if lastWins && t != kept {
			order = make([]*AuditClaim, len(an.claims))
			for i, c := range an.claims {
				order[len(an.claims)-1-i] = c
			}
		}
		for _, c := range order {
			if c.Status == StatusNoDNAT || tier(c) != t {
				continue
			}
			if t == kept {
				found[c.owner] = true
			}
			c.Status = StatusWins
			for _, w := range winners {
				if w.a != c.a && w.m.Claim.Conflicts(c.m.Claim) {
					switch {
					case t == kept:
						an.conflicts = append(an.conflicts, fmt.Sprintf("%s and %s both claim %s", w.owner, c.owner, c.m.Claim))
					case t == live && tier(w) == live:
						an.spare[c] = true
						an.liveContests = append(an.liveContests, fmt.Sprintf("%s: %s has several live claimants, %s and %s; left alone: choose one with --keep",
							an.s.Family, c.m.Claim, ownerText(w.owner, w.Chain), ownerText(c.owner, c.Chain)))
					}
					c.Status, c.ShadowedBy = StatusShadowed, w.Chain
					break
				}
			}
			if c.Status == StatusWins {
				winners = append(winners, c)
			}
		}
	}
	for o := range keep {
		if !found[o] {
			an.unknown = append(an.unknown, o)
		}
	}
}

func (an *analysis) winner(c *AuditClaim) *AuditClaim {
	for _, w := range an.claims {
		if w.Chain == c.ShadowedBy && w.Status == StatusWins && w.m.Claim.Conflicts(c.m.Claim) {
			return w
		}
	}
	return nil
}

func hostIPString(c hostport.Claim) string {
	if c.AnyHostIP() {
		return ""
	}
	return c.HostIP.String()
}

func sortPortKeys(ks []string) {
	sort.Slice(ks, func(i, j int) bool {
		pi, ni, _ := strings.Cut(ks[i], "/")
		pj, nj, _ := strings.Cut(ks[j], "/")
		if pi != pj {
			return pi < pj
		}
		a, _ := strconv.Atoi(ni)
		b, _ := strconv.Atoi(nj)
		return a < b
	})
}

// markBit reads the mark bit from CNI-HOSTPORT-SETMARK (or -MASQ); upstream's default otherwise.
func markBit(s *state.State) int {
	for _, r := range append(append([]iptables.Rule(nil), s.Table.Rules(state.SetMarkChain)...), s.Table.Rules(state.MasqChain)...) {
		v := r.Value("--set-xmark", "--set-mark", "--mark")
		val, _, _ := strings.Cut(v, "/")
		n, err := strconv.ParseUint(val, 0, 32)
		if err == nil && n != 0 && n&(n-1) == 0 {
			return bits.TrailingZeros64(n)
		}
	}
	return DefaultMarkBit
}

// usesMarks reports whether a chain's rules jump to CNI-HOSTPORT-SETMARK.
func usesMarks(s *state.State, chain string) bool {
	for _, r := range s.Table.Rules(chain) {
		if r.Target() == state.SetMarkChain {
			return true
		}
	}
	return false
}

// referencedOutside lists rules outside CNI-HOSTPORT-DNAT that jump to chain.
func referencedOutside(s *state.State, chain string) []iptables.Rule {
	var out []iptables.Rule
	for _, name := range s.Table.Order {
		if name == state.DNATChain {
			continue
		}
		for _, r := range s.Table.Rules(name) {
			if r.Target() == chain {
				out = append(out, r)
			}
		}
	}
	return out
}

func ownerText(o hostport.Owner, chain string) string {
	if o.IsZero() {
		return "chain " + chain + " (no owner comment)"
	}
	return fmt.Sprintf("%s (chain %s)", o, chain)
}

// Audit reports every claim per host port and every problem in one family's nat table.
// The state must be complete (state.ObserveAll).
func Audit(s *state.State) FamilyAudit {
	an := analyze(s, nil, false, nil)
	fa := FamilyAudit{Family: s.Family, Backend: BackendIPTables, Available: true, Ports: []PortClaims{}, OrphanChains: []string{}, Problems: []Problem{}}

	byPort := map[string]*PortClaims{}
	var keys []string
	for _, c := range an.claims {
		k := portKey(c.m.Claim.Proto, c.m.Claim.HostPort)
		pc := byPort[k]
		if pc == nil {
			pc = &PortClaims{Protocol: c.m.Claim.Proto, HostPort: c.m.Claim.HostPort}
			byPort[k] = pc
			keys = append(keys, k)
		}
		pc.Claims = append(pc.Claims, *c)
	}
	sortPortKeys(keys)
	for _, k := range keys {
		fa.Ports = append(fa.Ports, *byPort[k])
	}
	fa.Summary.Claims = len(an.claims)
	fa.Summary.HostPorts = len(keys)
	for _, a := range s.Attachments {
		if a.Exists {
			fa.Summary.Chains++
		}
	}

	add := func(p Problem) { fa.Problems = append(fa.Problems, p) }
	for _, c := range an.claims {
		if c.Status != StatusShadowed {
			continue
		}
		w := an.winner(c)
		wtext, wdest := c.ShadowedBy, ""
		if w != nil {
			wtext, wdest = ownerText(w.owner, w.Chain)+fmt.Sprintf(" at rule %d", w.Position), w.Destination
		}
		fa.Summary.ShadowedClaims++
		fa.Summary.DuplicateClaims = fa.Summary.ShadowedClaims
		add(Problem{Kind: KindShadowedClaim, Chain: c.Chain, Network: c.Network, ContainerID: c.ContainerID,
			Protocol: c.m.Claim.Proto, HostPort: c.m.Claim.HostPort,
			Message: fmt.Sprintf("%s: the claim of %s at rule %d (-> %s) is shadowed by %s (-> %s): packets to the port go to %s, never to this pod",
				c.m.Claim, ownerText(c.owner, c.Chain), c.Position, c.Destination, wtext, wdest, wdest),
			Fix: fmt.Sprintf("portguardctl repair --family %d (keeps the last added claim on the port, i.e. its last jump, and removes the others), or portguardctl repair --family %d --keep %s to keep this one",
				int(s.Family), int(s.Family), c.owner)})
	}
	for _, j := range an.dupJumps {
		fa.Summary.DuplicateJumps++
		add(Problem{Kind: KindDuplicateJump, Chain: j.Target, Network: j.Owner.Network, ContainerID: j.Owner.ContainerID,
			Message: fmt.Sprintf("rule %d of %s repeats an earlier jump into %s: %s", j.Index+1, state.DNATChain, j.Target, j.Rule.Spec()),
			Fix:     fmt.Sprintf("portguardctl repair --family %d (deletes the repeated jump)", int(s.Family))})
	}
	for _, a := range an.orphans {
		fa.OrphanChains = append(fa.OrphanChains, a.Chain)
		fa.Summary.OrphanChains++
		var dests []string
		for _, m := range a.Mappings {
			dests = append(dests, fmt.Sprintf("%s -> %s", m.Claim, m.Dest))
		}
		what := "no DNAT rules"
		if len(dests) > 0 {
			what = strings.Join(dests, ", ")
		}
		fix := fmt.Sprintf("portguardctl repair --family %d (flushes and deletes %s)", int(s.Family), a.Chain)
		if refs := referencedOutside(s, a.Chain); len(refs) > 0 {
			fix = fmt.Sprintf("%s is still referenced by non-CNI rule %s; repair leaves it alone: delete that rule first, then run portguardctl repair", a.Chain, refs[0])
		}
		add(Problem{Kind: KindOrphanChain, Chain: a.Chain,
			Message: fmt.Sprintf("chain %s has no jump from %s (%s): a leftover of a DEL that did not run or failed half-way; it forwards nothing but a later ADD may be confused by it", a.Chain, state.DNATChain, what),
			Fix:     fix})
	}
	var mismatched []string
	for ch := range an.jumpOnly {
		mismatched = append(mismatched, ch)
	}
	for ch := range an.dnatOnly {
		if an.jumpOnly[ch] == nil {
			mismatched = append(mismatched, ch)
		}
	}
	sort.Strings(mismatched)
	for _, ch := range mismatched {
		a := s.Attachments[ch]
		jo, do := an.jumpOnly[ch], an.dnatOnly[ch]
		var parts []string
		if len(jo) > 0 {
			parts = append(parts, fmt.Sprintf("its jumps send %s but it has no DNAT rule for %s (packets fall through to the next claim)", strings.Join(jo, ","), plural(jo)))
		}
		if len(do) > 0 {
			parts = append(parts, fmt.Sprintf("it DNATs %s but no jump sends %s into it (dead rules)", strings.Join(do, ","), plural(do)))
		}
		p := Problem{Kind: KindPortMismatch, Chain: ch, Network: a.Owner.Network, ContainerID: a.Owner.ContainerID,
			Message: fmt.Sprintf("%s: %s", ownerText(a.Owner, ch), strings.Join(parts, "; ")),
			Fix:     fmt.Sprintf("portguardctl repair --family %d (deletes the mismatched jump ports and DNAT rules; the chain goes when nothing valid is left)", int(s.Family))}
		if len(jo) == 1 {
			proto, port, _ := strings.Cut(jo[0], "/")
			p.Protocol = proto
			p.HostPort, _ = strconv.Atoi(port)
		}
		fa.Summary.PortMismatches++
		add(p)
	}

	hasClaims := false
	marks := false
	for _, a := range s.Attachments {
		if a.Exists && len(a.Jumps) > 0 {
			hasClaims = true
			if usesMarks(s, a.Chain) {
				marks = true
			}
		}
	}
	if hasClaims {
		for _, ch := range state.EntryChains {
			r := state.EntryJump(ch)
			if s.HasRule(r) {
				continue
			}
			fa.Summary.MissingEntryJumps++
			why := "traffic from other hosts to a host port is never DNATed"
			if ch == "OUTPUT" {
				why = "connections from the node itself to a host port (including 127.0.0.1 and the node's own IPs) are never DNATed"
			}
			add(Problem{Kind: KindMissingEntryJump, Chain: ch,
				Message: fmt.Sprintf("%s has no jump to %s while %d claims exist: %s", ch, state.DNATChain, len(an.claims), why),
				Fix:     fmt.Sprintf("portguardctl repair --family %d (appends: %s)", int(s.Family), r)})
		}
	}
	if marks {
		bit := an.markBit
		for _, m := range []struct {
			kind string
			r    iptables.Rule
			why  string
		}{
			{KindMissingSetMark, state.SetMarkRule(bit), "hairpin and localhost connections to host ports are not marked, so they are not masqueraded and the pod's reply bypasses the NAT"},
			{KindMissingMasq, state.MasqRule(bit), "marked hairpin and localhost connections are not masqueraded: the pod replies to the original source directly and the connection breaks"},
			{KindMissingMasqJump, state.MasqJump(), "CNI-HOSTPORT-MASQ is never entered, so marked connections are not masqueraded"},
		} {
			if s.HasRule(m.r) {
				continue
			}
			fa.Summary.MissingMasquerade++
			add(Problem{Kind: m.kind, Chain: m.r.Chain,
				Message: fmt.Sprintf("rule missing while CNI-DN chains jump to %s: %s: %s", state.SetMarkChain, m.r, m.why),
				Fix:     fmt.Sprintf("portguardctl repair --family %d (restores %s)", int(s.Family), m.r)})
		}
	}
	fa.Summary.Problems = len(fa.Problems)
	return fa
}

func plural(ks []string) string {
	if len(ks) == 1 {
		return "it"
	}
	return "them"
}
