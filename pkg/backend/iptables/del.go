package iptbackend

import (
	"errors"
	"fmt"

	"github.com/portguard/portguard/pkg/backend"
	"github.com/portguard/portguard/pkg/config"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/plan"
	"github.com/portguard/portguard/pkg/state"
)

// Del removes the attachment under the shared lock, where the payload needs no read
// (backend.Backend): the runtime passes the mappings of the ADD, so the jumps and the
// chain to delete are known, and one payload removes them or fails whole. Such payloads
// only touch the attachment's own rules, so a node drain's DELs go in parallel, while ADD,
// GC and repair (exclusive) never interleave with them. The families whose blind payload
// could not work (a jump rewritten by a partial takeover, a DEL without portMappings) are
// returned for DelRest. Del succeeds when there is nothing to remove and when only some
// families' iptables work.
func (b *Backend) Del(c *config.Config, owner hostport.Owner) (slow []hostport.Family, err error) {
	var errs []error
	tried := 0
	b.delUsable = 0
	for _, f := range hostport.Families {
		_, hasIP := c.PodIPs[f]
		if c.PrevResult != nil && !hasIP {
			continue // prevResult is the ADD's result: ADD wrote nothing in this family
		}
		tried++
		if nl := b.conn(f); nl != nil {
			if done, _ := nl.RemoveAttachment(f, hostport.ChainName(owner)); done {
				b.delUsable++
				continue
			}
		}
		d := plan.DesiredFor(c, owner, f, c.PodIPs[f])
		if len(d.Jumps) == 0 {
			slow = append(slow, f)
			continue
		}
		err := Apply(b.Runner, f, plan.DelBlind(d))
		var re *iptables.RestoreError
		switch {
		case errors.Is(err, iptables.ErrUnavailable):
		case errors.As(err, &re):
			slow = append(slow, f)
		case err != nil:
			b.delUsable++
			errs = append(errs, fmt.Errorf("%s: %w", f, err))
		default:
			b.delUsable++
		}
	}
	if len(slow) == 0 && tried > 0 && b.delUsable == 0 {
		return nil, errUnusable
	}
	return slow, busy(errors.Join(errs...))
}

// DelRest reads and plans, under the exclusive lock, the removal of what Del could not
// remove blind in families rest (backend.Backend).
func (b *Backend) DelRest(owner hostport.Owner, rest []hostport.Family) error {
	var errs []error
	for _, f := range rest {
		err := b.delFamily(owner, f)
		if errors.Is(err, iptables.ErrUnavailable) {
			continue
		}
		b.delUsable++
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", f, err))
		}
	}
	if len(rest) > 0 && b.delUsable == 0 {
		return errUnusable
	}
	return busy(errors.Join(errs...))
}

// errUnusable is Del's error when no family's iptables works.
var errUnusable = backend.Mark(errors.New("neither iptables nor ip6tables is usable"), backend.ErrUnusable)

// delFamily removes what the table shows of the attachment: every jump to its chain, and
// the chain.
func (b *Backend) delFamily(owner hostport.Owner, f hostport.Family) error {
	chain := hostport.ChainName(owner)
	s, err := state.Observe(b.Runner, f, state.DNATChain)
	if err != nil {
		return err
	}
	if !s.DNATExists() {
		return nil
	}
	for attempt := 0; ; attempt++ {
		res, err := planWith(b.Runner, s, func(s *state.State) plan.Result { return plan.Del(s, chain) })
		if err != nil {
			return err
		}
		err = Apply(b.Runner, f, res.Tx)
		var re *iptables.RestoreError
		if err == nil || attempt > 0 || !errors.As(err, &re) {
			return err
		}
		if s, err = state.Observe(b.Runner, f, state.DNATChain, chain); err != nil {
			return err
		}
	}
}
