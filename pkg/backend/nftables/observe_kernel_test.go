package nftables

import (
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/nftcond"
	"github.com/portguard/portguard/test/testbed"
)

// TestProbeChangesNothing: the probe succeeds on this kernel, and the ruleset (listed by
// nft, generation included) is the same before and after it.
func TestProbeChangesNothing(t *testing.T) {
	t.Parallel()
	b := testbed.New(t)
	b.MustExec(b.Node, "nft", "add table inet kube-proxy")
	before := b.MustExec(b.Node, "nft", "list ruleset")
	var gen0, gen1 uint32
	err := inNode(b, func() error {
		tab, err := Open()
		if err != nil {
			return err
		}
		defer tab.Close()
		if gen0, err = tab.nl.GenID(); err != nil {
			return err
		}
		if err := Probe(); err != nil {
			return err
		}
		gen1, err = tab.nl.GenID()
		return err
	})
	if err != nil {
		t.Fatalf("Probe: %v", err)
	}
	if after := b.MustExec(b.Node, "nft", "list ruleset"); after != before || gen0 != gen1 {
		t.Fatalf("the probe changed the ruleset (generation %d -> %d):\nbefore:\n%s\nafter:\n%s", gen0, gen1, before, after)
	}
	if strings.Contains(before, probeTable) {
		t.Fatal("probe table listed")
	}
}

// TestObserveOrphans: Observe finds a gate element whose claim was deleted by hand, the
// conditions chain only it used, and a damaged layout; RemoveGates and RemoveCondChains
// delete exactly them in one batch.
func TestObserveOrphans(t *testing.T) {
	t.Parallel()
	k := newKBed(t)
	a := k.pod("A")
	var ch string
	err := inNode(k.Bed, func() error {
		c, err := nftcond.Parse("conditionsV4", hostport.V4, []string{"ip saddr 198.18.0.0/15"})
		if err != nil {
			return err
		}
		ch, err = k.tab.EnsureConditions(c)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	att := noMasq(k.attachment(a, claim(hostport.V4, "tcp", 8080)))
	att.Conditions = map[hostport.Family]string{hostport.V4: ch}
	if err := inNode(k.Bed, func() error { return k.commit(func(tx *Tx) error { return tx.AddAttachment(att) }) }); err != nil {
		t.Fatal(err)
	}
	var o Observed
	if err := inNode(k.Bed, func() (err error) { _, o, err = k.tab.Observe(); return err }); err != nil {
		t.Fatal(err)
	}
	if len(o.OrphanGates) != 0 || len(o.OrphanCondChains) != 0 || len(o.Layout) != 0 || !o.Table || len(o.Dump.Claims) != 1 {
		t.Fatalf("healthy table observed as %+v", o)
	}
	k.MustExec(k.Node, "nft", "delete element inet portguard any4 { tcp . 8080 }")
	k.MustExec(k.Node, "nft", "flush chain inet portguard postrouting")
	err = inNode(k.Bed, func() error {
		tx, obs, err := k.tab.Observe()
		if err != nil {
			return err
		}
		o = obs
		tx.RemoveGates(o.OrphanGates...)
		tx.RemoveCondChains(o.OrphanCondChains...)
		if len(o.OrphanGates) == 1 {
			// the chain is still used until the gate goes: both in one batch
			if err := tx.Commit(); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(o.OrphanGates) != 1 || o.OrphanGates[0].Claim != claim(hostport.V4, "tcp", 8080) || o.OrphanGates[0].Jump != ch {
		t.Fatalf("orphan gates %+v, want the gate of tcp/8080 to %s", o.OrphanGates, ch)
	}
	if len(o.OrphanCondChains) != 0 {
		t.Fatalf("chain %v reported orphan while a gate element jumps to it", o.OrphanCondChains)
	}
	if len(o.Layout) != 1 || !strings.Contains(o.Layout[0], "postrouting") {
		t.Fatalf("layout damage %v, want postrouting", o.Layout)
	}
	// Now the chain is an orphan.
	err = inNode(k.Bed, func() error {
		tx, obs, err := k.tab.Observe()
		if err != nil {
			return err
		}
		o = obs
		tx.RemoveCondChains(o.OrphanCondChains...)
		return tx.Commit()
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(o.OrphanGates) != 0 || len(o.OrphanCondChains) != 1 || o.OrphanCondChains[0] != ch {
		t.Fatalf("after the gate went: gates %v chains %v, want chain %s", o.OrphanGates, o.OrphanCondChains, ch)
	}
	if out := k.MustExec(k.Node, "nft", "list table inet portguard"); strings.Contains(out, ch) {
		t.Fatalf("chain %s still there:\n%s", ch, out)
	}
}

// BenchmarkObserve measures one Observe (what audit, repair, doctor and export read: the
// layout, every element, gates, conditions chains, upstream's tables) of a table holding N
// attachments (v4 + v6 claims and masquerade entries each), in a namespace of its own.
//
//	go test -run '^$' -bench Observe -benchtime 20x ./pkg/backend/nftables/
func BenchmarkObserve(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	for _, n := range []int{1000, 5000} {
		b.Run(fmt.Sprintf("N=%d", n), func(b *testing.B) {
			_, t := ensuredTable(b)
			prefill(b, t, n)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				_, o, err := t.Observe()
				if err != nil || len(o.Dump.Claims) != 2*n {
					b.Fatalf("Observe: %d claims, %v", len(o.Dump.Claims), err)
				}
			}
		})
	}
}
