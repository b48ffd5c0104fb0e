package iptbackend

import (
	"errors"
	"fmt"
	"strings"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/plan"
	"github.com/portguard/portguard/pkg/state"
)

// GC removes this network's attachments whose container IDs are not in valid, and the
// chains of such attachments that no jump enters any more (backend.Backend). It goes on
// past errors and reports them all.
func (b *Backend) GC(network string, valid map[string]bool, cached []hostport.Owner) (_ []hostport.Owner, err error) {
	defer func() { err = busy(err) }()
	var errs []error
	// Ownership lives in the jump comments of CNI-HOSTPORT-DNAT: one read per family.
	states := map[hostport.Family]*state.State{}
	suspects := append([]hostport.Owner(nil), cached...)
	for _, f := range hostport.Families {
		s, err := state.Observe(b.Runner, f, state.DNATChain)
		if errors.Is(err, iptables.ErrUnavailable) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", f, err))
			continue
		}
		states[f] = s
		for _, a := range s.Attachments {
			if len(a.Jumps) > 0 && a.Owner.Network == network {
				suspects = append(suspects, a.Owner)
			}
		}
	}
	if len(states) == 0 && len(errs) == 0 {
		errs = append(errs, fmt.Errorf("neither iptables nor ip6tables is usable"))
	}
	var removed []hostport.Owner
	seen := map[hostport.Owner]bool{}
	for _, f := range hostport.Families {
		s := states[f]
		if s == nil {
			continue
		}
		var gone []hostport.Owner
		res, err := planWith(b.Runner, s, func(s *state.State) plan.Result {
			r, g := plan.GC(s, network, valid, suspects)
			gone = g
			return r
		})
		if err == nil {
			err = Apply(b.Runner, f, res.Tx)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", f, err))
			continue
		}
		for _, o := range gone {
			if !seen[o] {
				seen[o] = true
				removed = append(removed, o)
			}
		}
	}
	return removed, errors.Join(errs...)
}

// Status reports whether iptables works for the families that have it, without taking
// any lock or reading a table (backend.Backend).
func (b *Backend) Status() error {
	var errs []string
	usable := 0
	for _, f := range hostport.Families {
		err := b.Runner.Probe(f)
		switch {
		case err == nil:
			usable++
		case errors.Is(err, iptables.ErrUnavailable) && f == hostport.V6:
			// An IPv4-only host: fine as long as IPv4 works.
		default:
			errs = append(errs, fmt.Sprintf("%s: %v", f, err))
		}
	}
	if usable == 0 || len(errs) > 0 {
		return errors.New("iptables is not usable: " + strings.Join(errs, "; "))
	}
	return nil
}
