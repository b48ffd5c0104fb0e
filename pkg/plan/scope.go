package plan

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/state"
)

// RepairScope narrows a repair to the problems that involve one host port, one owner, or
// both (a problem must then involve each). The zero scope is the whole table.
type RepairScope struct {
	Proto string // "tcp", "udp" or "sctp"; "" with Port 0 = any port
	Port  int    // host port, 1-65535; 0 = any port
	// Owner, when set, matches chains whose jump comment names it and chains named after
	// it (hostport.ChainName), so an orphan chain without comment is found too.
	Owner hostport.Owner
}

// IsZero reports whether the scope is the whole table.
func (sc RepairScope) IsZero() bool { return sc.Port == 0 && sc.Owner.IsZero() }

// String is the scope as the CLI flags spell it: "--port tcp/8080 --owner net/id".
func (sc RepairScope) String() string {
	var parts []string
	if sc.Port != 0 {
		parts = append(parts, "--port "+portKey(sc.Proto, sc.Port))
	}
	if !sc.Owner.IsZero() {
		parts = append(parts, "--owner "+sc.Owner.String())
	}
	return strings.Join(parts, " ")
}

// ParsePortScope parses "PROTO/PORT" (tcp, udp or sctp; 1-65535) as the --port of a
// repair. The error names the flag and the accepted shape.
func ParsePortScope(s string) (proto string, port int, err error) {
	p, n, ok := strings.Cut(s, "/")
	v, perr := strconv.Atoi(n)
	p = strings.ToLower(p)
	if !ok || perr != nil || v < 1 || v > 65535 || (p != "tcp" && p != "udp" && p != "sctp") {
		return "", 0, fmt.Errorf("--port %q: want PROTO/PORT with PROTO tcp, udp or sctp and PORT 1-65535 (e.g. tcp/8080)", s)
	}
	return p, v, nil
}

// ownerIs reports whether attachment a belongs to the scope's owner (any owner when unset).
func (sc RepairScope) ownerIs(a *state.Attachment) bool {
	return sc.Owner.IsZero() || a.Owner == sc.Owner || a.Chain == hostport.ChainName(sc.Owner)
}

// portIs reports whether (proto, port) is the scope's port (any port when unset).
func (sc RepairScope) portIs(proto string, port int) bool {
	return sc.Port == 0 || (port == sc.Port && (proto == "" || proto == sc.Proto))
}

// mismatch reports whether a's port mismatch (one problem: the jump ports without DNAT
// and the DNATs without jump, together) is in scope: a is the owner's and one of those
// ports is the scope's. Fixing only the half on the scope's port would leave the other
// half as a new problem (a chain no jump enters).
func (sc RepairScope) mismatch(an *analysis, a *state.Attachment) bool {
	if !sc.ownerIs(a) {
		return false
	}
	if sc.Port == 0 {
		return true
	}
	for _, k := range append(append([]string(nil), an.jumpOnly[a.Chain]...), an.dnatOnly[a.Chain]...) {
		proto, n, _ := strings.Cut(k, "/")
		if p, err := strconv.Atoi(n); err == nil && sc.portIs(proto, p) {
			return true
		}
	}
	return false
}

// contest reports whether a shadowed claim is in scope: its port is the scope's and
// either it or its winner belongs to the scope's owner (keeping the owner's claim is
// what a repair of that owner is for).
func (sc RepairScope) contest(c *AuditClaim, w *AuditClaim) bool {
	if !sc.portIs(c.m.Claim.Proto, c.m.Claim.HostPort) {
		return false
	}
	return sc.ownerIs(c.a) || (w != nil && sc.ownerIs(w.a))
}

// jump reports whether a repeated jump is in scope: it enters the owner's chain and
// sends the scope's port (a jump without a port match sends every port of its protocol).
func (sc RepairScope) jump(s *state.State, j state.Jump) bool {
	a := s.Attachments[j.Target]
	if a == nil {
		a = &state.Attachment{Chain: j.Target, Owner: j.Owner}
	}
	if !sc.ownerIs(a) {
		return false
	}
	if sc.Port == 0 {
		return true
	}
	if j.Proto != "" && j.Proto != sc.Proto {
		return false
	}
	return len(j.Ports) == 0 || j.HasPort(sc.Port)
}

// chain reports whether removing a whole (orphan) chain is in scope: the owner's, and
// it DNATs the scope's port (an empty chain forwards no port: only an owner scope takes it).
func (sc RepairScope) chain(a *state.Attachment) bool {
	if !sc.ownerIs(a) {
		return false
	}
	if sc.Port == 0 {
		return true
	}
	for _, m := range a.Mappings {
		if sc.portIs(m.Claim.Proto, m.Claim.HostPort) {
			return true
		}
	}
	return false
}

// RepairRemoval is one record of what a repair removed: one owner's mappings (or a whole
// chain, or a repeated jump), with why. The CLI writes each as a JSON line
// {"event":"repair","repair":{...},"time":...}, like the plugin's takeover events.
type RepairRemoval struct {
	Family       string           `json:"family"`
	Owner        hostport.Owner   `json:"owner"` // zero for a chain no jump names
	Chain        string           `json:"chain"`
	Claims       []hostport.Claim `json:"claims"`       // the claims removed (empty for a repeated jump)
	Destinations []string         `json:"destinations"` // their DNAT destinations, in order
	ChainRemoved bool             `json:"chainRemoved"` // the chain and all its jumps are gone
	// Rule is the deleted rule of a repeated jump (iptables -S form, "-A CNI-HOSTPORT-DNAT ..."); "" otherwise.
	Rule string `json:"rule,omitempty"`
	// Reasons are the audit problem kinds this removal fixes (KindShadowedClaim,
	// KindPortMismatch, KindOrphanChain, KindDuplicateJump), sorted.
	Reasons []string `json:"reasons"`
	// KeptFor is the owner whose claim keeps the contested port; nil when none.
	KeptFor *hostport.Owner `json:"keptFor,omitempty"`
	// OwnerState and Evidence are the liveness judgement of Owner when repair had a judge
	// and an owner ("alive", "stale", "unknown"); empty otherwise.
	OwnerState string             `json:"ownerState,omitempty"`
	Evidence   *liveness.Evidence `json:"evidence,omitempty"`
}
