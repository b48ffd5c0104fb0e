package nft

import (
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/portguard/portguard/pkg/hostport"
)

// Usable reports whether family f's nat rules can be read and deleted here, in this
// network namespace, in place of running the iptables binaries at paths (iptables and
// iptables-restore, as the runner resolves them): neither is iptables-legacy
// and the kernel has no legacy (x_tables) nat table in this namespace, so every nat rule
// any iptables shows is an nf_tables rule. An unknown wrapper script counts as nft only
// by the second test: with no legacy nat table there are no legacy nat rules to miss.
func Usable(f hostport.Family, paths ...string) bool {
	for _, p := range paths {
		real, err := filepath.EvalSymlinks(p)
		if err != nil || strings.Contains(filepath.Base(real), "legacy") {
			return false
		}
	}
	// thread-self: the namespace of the calling thread, which is where a netlink socket
	// opened by it lives (tests run in a namespace on one locked thread).
	dir := "/proc/thread-self/net"
	if _, err := os.Stat(dir); err != nil {
		dir = "/proc/net" // kernels before 3.17; the plugin's threads share one namespace
	}
	names := dir + "/ip_tables_names"
	if f == hostport.V6 {
		names = dir + "/ip6_tables_names"
	}
	b, err := os.ReadFile(names)
	if err == nil && slices.Contains(strings.Fields(string(b)), "nat") {
		return false
	}
	return err == nil || os.IsNotExist(err)
}

// RemoveAttachment deletes an attachment's chain and the one jump that enters it from
// CNI-HOSTPORT-DNAT, in one transaction, without reading CNI-HOSTPORT-DNAT in the common
// case. done is false, with nothing changed, whenever the kernel shows anything else
// (another rule entering the chain, a jump elsewhere, a concurrent change); the caller
// then does it with iptables.
//
// Finding the jump: nf_tables numbers a table's chains and rules from one counter, in
// the order of the transaction's messages. portguard's ADD sends the chain, its rules and
// then the jump, so the jump's handle is the highest handle among the chain and its
// rules, plus one. That guess is verified by reading that one rule; when it misses
// (a chain written by upstream portmap, or rewritten by a takeover), the jump is looked
// up in CNI-HOSTPORT-DNAT. The chain's use count (its rules plus every rule jumping to
// it) proves the jump found is the only way in.
func (c *Conn) RemoveAttachment(f hostport.Family, chain string) (done bool, err error) {
	ops, done, err := c.RemoveAttachmentOps(f, chain)
	if err != nil || !done || len(ops) == 0 {
		return done, err
	}
	if err := c.Commit(ops...); err != nil {
		return false, err
	}
	return true, nil
}

// RemoveAttachmentOps plans what RemoveAttachment commits, for a caller that puts the
// operations into a batch of its own: done is true with no operations when the chain does
// not exist, false (and no operations) when the kernel shows anything the removal of the
// chain and its one jump would not cover.
func (c *Conn) RemoveAttachmentOps(f hostport.Family, chain string) (ops []Op, done bool, err error) {
	ch, ok, err := c.Chain(f, chain)
	if err != nil || !ok {
		// No chain, no jump: a rule cannot jump to a chain that does not exist.
		return nil, err == nil, err
	}
	rules, ok, err := c.Rules(f, chain)
	if err != nil || !ok {
		return nil, false, err
	}
	switch refs := int(ch.Use) - len(rules); refs {
	case 0:
		return []Op{DeleteChain(f, chain)}, true, nil
	case 1:
	default:
		return nil, false, nil
	}
	guess := ch.Handle
	for _, r := range rules {
		guess = max(guess, r.Handle)
	}
	guess++
	jump := uint64(0)
	if r, ok, err := c.Rule(f, hostport.DNATChain, guess); err == nil && ok && r.Jump() == chain {
		jump = r.Handle
	} else {
		all, ok, err := c.Rules(f, hostport.DNATChain)
		if err != nil || !ok {
			return nil, false, err
		}
		for _, r := range all {
			if r.Jump() == chain {
				if jump != 0 {
					return nil, false, nil
				}
				jump = r.Handle
			}
		}
		if jump == 0 {
			return nil, false, nil // the reference is outside CNI-HOSTPORT-DNAT
		}
	}
	return []Op{DeleteRule(f, hostport.DNATChain, jump), DeleteChain(f, chain)}, true, nil
}
