package plan

import (
	"fmt"
	"sort"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/state"
)

// DelBlind removes an attachment without reading anything: the jumps it should have and
// its chain. It is the common DEL in one process; if the table holds anything else (no
// chain, other jumps), iptables-restore refuses it whole and the caller plans with Del.
func DelBlind(d Desired) *iptables.Tx {
	tx := &iptables.Tx{}
	for _, j := range d.Jumps {
		tx.DeleteRule(j, "jump to "+d.Chain)
	}
	tx.RemoveChain(d.Chain, "remove "+d.Chain)
	return tx
}

// Del removes every jump to the chain and the chain itself, as observed.
func Del(s *state.State, chain string) Result {
	if !s.DNATKnown() {
		return Result{Need: []string{state.DNATChain}}
	}
	if !s.Table.Known(chain) {
		return Result{Need: []string{chain}}
	}
	tx := &iptables.Tx{}
	if a := s.Attachments[chain]; a != nil {
		removeAttachment(tx, a, "remove "+chain)
	}
	return Result{Tx: tx}
}

func removeAttachment(tx *iptables.Tx, a *state.Attachment, why string) {
	for _, j := range a.Jumps {
		tx.DeleteRule(j.Rule, why)
	}
	// A jump can only enter a chain that exists, so an unread chain with jumps exists.
	if a.Exists || (!a.Read && len(a.Jumps) > 0) {
		tx.RemoveChain(a.Chain, why)
	}
}

// GC removes every attachment of network whose container ID is not valid. Ownership comes
// from the jump comments, since GC gets no runtimeConfig. Suspects are owners known from
// elsewhere (the other family's jumps, the runtime's cache): a chain of theirs that no jump
// enters any more is found by its name and removed too; unread ones are asked for in Need.
func GC(s *state.State, network string, valid map[string]bool, suspects []hostport.Owner) (Result, []hostport.Owner) {
	tx := &iptables.Tx{}
	var removed []hostport.Owner
	gone := map[hostport.Owner]bool{}
	for _, a := range s.AttachmentsSorted() {
		if len(a.Jumps) == 0 || a.Owner.Network != network || valid[a.Owner.ContainerID] {
			continue
		}
		removeAttachment(tx, a, fmt.Sprintf("gc %s (%s)", a.Chain, a.Owner))
		removed = append(removed, a.Owner)
		gone[a.Owner] = true
	}
	var need []string
	for _, o := range suspects {
		if o.Network != network || valid[o.ContainerID] || gone[o] {
			continue
		}
		chain := hostport.ChainName(o)
		if !s.Table.Known(chain) {
			need = append(need, chain)
			continue
		}
		if a := s.Attachments[chain]; a != nil && a.Exists && len(a.Jumps) == 0 {
			tx.RemoveChain(chain, fmt.Sprintf("gc orphan %s (%s)", chain, o))
			removed = append(removed, o)
			gone[o] = true
		}
	}
	if len(need) > 0 {
		sort.Strings(need)
		return Result{Need: need}, nil
	}
	sort.Slice(removed, func(i, j int) bool { return removed[i].ContainerID < removed[j].ContainerID })
	return Result{Tx: tx}, removed
}
