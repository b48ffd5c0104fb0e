package engine

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/portguard/portguard/pkg/backend"
	"github.com/portguard/portguard/pkg/config"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/liveness"
)

// ErrHostPortInUse is the CNI error code of an ADD refused because another attachment holds
// one of its host ports: its owner is alive (conflictPolicy takeover) or any owner
// (conflictPolicy reject). The spec's codes 1-99 have none for a busy resource: 7 (invalid
// network config) would send the operator to a config that is fine, and 11 (try again
// later) invites retries that fail for as long as the owner lives; codes from 100 are the
// plugin's own.
const ErrHostPortInUse = 100

// decide is the Decide hook of ADD: under conflictPolicy reject any conflict refuses the
// ADD; under takeover and force it gathers evidence on every owner the plan takes claims
// from and attaches it to the takeover, and under takeover an owner that is alive, or
// cannot be judged, refuses the whole ADD before anything is applied.
func (e *Engine) decide(ts []backend.Takeover, cs []backend.Conflict, policy string) error {
	if policy == config.PolicyReject && len(cs) > 0 {
		return rejectError(cs)
	}
	if e.Judge == nil || (policy != config.PolicyTakeover && policy != config.PolicyForce) {
		return nil
	}
	var live []string
	for i := range ts {
		t := &ts[i]
		var dest netip.Addr
		if len(t.Destinations) > 0 {
			if ap, err := netip.ParseAddrPort(t.Destinations[0]); err == nil {
				dest = ap.Addr()
			}
		}
		ev := e.Judge.Owner(t.From, dest)
		t.Evidence = &ev
		if ev.State == liveness.Stale || policy == config.PolicyForce {
			continue
		}
		for _, c := range cs {
			if c.Owner == t.From && c.Chain == t.Chain {
				live = append(live, fmt.Sprintf("%s is held by %s (-> %s), judged %s: %s", c.Claim, c.OwnerName(), c.Dest, ev.State, evidenceText(ev)))
			}
		}
	}
	if len(live) == 0 {
		return nil
	}
	return types.NewError(ErrHostPortInUse,
		"host port in use by a live attachment: "+strings.Join(live, "; "),
		"stop or DEL the other container first; conflictPolicy force takes the port even from a live owner")
}

func rejectError(cs []backend.Conflict) error {
	var parts []string
	for _, c := range cs {
		parts = append(parts, c.String())
	}
	return types.NewError(ErrHostPortInUse,
		fmt.Sprintf("conflictPolicy reject: host port already claimed: %s", strings.Join(parts, "; ")),
		"remove the other attachment (CNI DEL or portguardctl repair) or use conflictPolicy takeover")
}

func evidenceText(ev liveness.Evidence) string {
	s := ev.Reason
	if ev.Source != "" {
		s += " (record: " + ev.Source + ")"
	}
	return s
}

// applied is the Applied hook of ADD: OnTakeover hears of the takeover, and the record of
// an owner whose claims it removed after judging it stale goes: nothing of it lives, and
// its record would only be read again.
func (e *Engine) applied(t backend.Takeover) {
	if e.OnTakeover != nil {
		e.OnTakeover(t)
	}
	if e.Judge != nil && t.ChainRemoved && t.Evidence != nil && t.Evidence.State == liveness.Stale {
		_ = e.Judge.Records.Remove(t.From)
	}
}

// record is the Record hook of ADD: portguard's record of the attachment, with the pod's
// addresses in fams, written under the lock and before its rules, so that a claim never
// exists without the evidence that its owner lives.
func (e *Engine) record(c *config.Config, owner hostport.Owner, fams []hostport.Family) error {
	if e.Judge == nil || e.Sandbox.Netns == "" || len(fams) == 0 {
		return nil
	}
	r := e.Sandbox
	r.Owner, r.Addrs = owner, nil
	if r.NetnsID == (liveness.NetnsID{}) {
		r.NetnsID = liveness.IdentifyNetns(r.Netns)
	}
	for _, f := range fams {
		r.Addrs = append(r.Addrs, c.PodIPs[f].Addr())
	}
	return e.Judge.Records.Put(r)
}

// forget removes the attachment's record once its rules are gone.
func (e *Engine) forget(o hostport.Owner) {
	if e.Judge != nil {
		_ = e.Judge.Records.Remove(o)
	}
}
