package nftaudit

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/backend/nftables"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/plan"
)

// judge is a fake plan.Liveness: owners listed are alive, everyone else stale.
type judge map[hostport.Owner]bool

func (j judge) Owner(o hostport.Owner, _ netip.Addr) liveness.Evidence {
	if j[o] {
		return liveness.Evidence{State: liveness.Alive, Reason: "test"}
	}
	return liveness.Evidence{State: liveness.Stale, Reason: "test"}
}

func (j judge) Holders(netip.Addr) []hostport.Owner { return nil }

var (
	pgOwner = hostport.Owner{Network: "net", ContainerID: "pg1"}
	upOwner = hostport.Owner{ContainerID: "up1"}
	tcp8080 = hostport.Claim{Family: hostport.V4, Proto: "tcp", HostPort: 8080}
	tcp9090 = hostport.Claim{Family: hostport.V4, Proto: "tcp", HostPort: 9090}
)

func elem(o hostport.Owner, c hostport.Claim, dest string) nftables.Element {
	return nftables.Element{Claim: c, Dest: netip.MustParseAddrPort(dest), Owner: o, Comment: nftables.OwnerComment(o)}
}

func upRule(id string, c hostport.Claim, dest string, handle uint64) nftables.UpstreamRule {
	return nftables.UpstreamRule{Family: c.Family, Chain: nftables.UpstreamHostports, Handle: handle, ContainerID: id, Claim: c, Dest: netip.MustParseAddrPort(dest)}
}

// observed: portguard's pg1 claims tcp/8080; upstream's up1 claims it too (its rule is
// looked up first) and tcp/9090.
func observed() nftables.Observed {
	return nftables.Observed{Table: true,
		Dump:     nftables.Dump{Claims: []nftables.Element{elem(pgOwner, tcp8080, "10.0.0.2:80")}},
		Upstream: []nftables.UpstreamRule{upRule("up1", tcp8080, "10.0.0.3:80", 5), upRule("up1", tcp9090, "10.0.0.3:90", 6)}}
}

func kinds(fas []plan.FamilyAudit) map[string]int {
	out := map[string]int{}
	for _, fa := range fas {
		for _, p := range fa.Problems {
			out[p.Kind]++
		}
	}
	return out
}

// The upstream rule is evaluated first: portguard's claim is shadowed and the problem is a
// split claim; a stale upstream owner adds stale-upstream-rule for each of its rules.
func TestAuditSplitAndStale(t *testing.T) {
	fas := Audit(observed(), nil, judge{pgOwner: true}, nil)
	if k := kinds(fas); k[plan.KindSplitClaim] != 1 || k[plan.KindStaleUpstreamRule] != 2 || len(k) != 2 {
		t.Fatalf("problems %v", k)
	}
	for _, pc := range fas[0].Ports {
		for _, c := range pc.Claims {
			if c.ContainerID == "pg1" && (c.Status != plan.StatusShadowed || !strings.Contains(c.ShadowedBy, "cni_hostport")) {
				t.Errorf("portguard's claim: %+v", c)
			}
		}
	}
	// Alive upstream owner: the split claim stays, no stale rule.
	if k := kinds(Audit(observed(), nil, judge{pgOwner: true, upOwner: true}, nil)); k[plan.KindSplitClaim] != 1 || len(k) != 1 {
		t.Errorf("with a live upstream owner: %v", k)
	}
}

func plannedRepair(t *testing.T, j judge, keep map[hostport.Owner]bool, scope plan.RepairScope) RepairPlan {
	t.Helper()
	p, err := PlanRepair(&nftables.Tx{}, observed(), nil, keep, j, nil, scope)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func actions(p RepairPlan) string { return strings.Join(p.Actions, "\n") }

// Tiers: a live portguard owner keeps the port from a stale upstream rule; two live owners
// are both left alone; --keep decides between them; a scope leaves the rest.
func TestRepairTiers(t *testing.T) {
	p := plannedRepair(t, judge{pgOwner: true}, nil, plan.RepairScope{})
	if a := actions(p); !strings.Contains(a, "handle 5") || !strings.Contains(a, "handle 6") || strings.Contains(a, "delete element") {
		t.Errorf("stale upstream owner: want both its rules deleted, nothing of portguard's:\n%s", a)
	}
	p = plannedRepair(t, judge{pgOwner: true, upOwner: true}, nil, plan.RepairScope{})
	if !p.Empty() || len(p.Skipped) != 1 || !strings.Contains(p.Skipped[0], "several live claimants") {
		t.Errorf("two live owners: actions %q skipped %q", p.Actions, p.Skipped)
	}
	p = plannedRepair(t, judge{pgOwner: true, upOwner: true}, map[hostport.Owner]bool{{Network: "x", ContainerID: "up1"}: true}, plan.RepairScope{})
	if a := actions(p); !strings.Contains(a, "delete element inet portguard any4 { tcp . 8080 }") || strings.Contains(a, "delete rule") {
		t.Errorf("--keep of the upstream owner: want portguard's element removed only:\n%s", a)
	}
	if len(p.Removals) != 1 || p.Removals[0].KeptFor == nil || p.Removals[0].Reasons[0] != plan.KindSplitClaim || !p.Removals[0].ChainRemoved {
		t.Errorf("removal record: %+v", p.Removals)
	}
	// Both stale: portguard's element keeps the port.
	p = plannedRepair(t, judge{}, nil, plan.RepairScope{})
	if a := actions(p); strings.Contains(a, "delete element") || !strings.Contains(a, "handle 5") {
		t.Errorf("both stale: want the upstream rules removed, the element kept:\n%s", a)
	}
	p = plannedRepair(t, judge{pgOwner: true}, nil, plan.RepairScope{Proto: "tcp", Port: 9090})
	if a := actions(p); !strings.Contains(a, "handle 6") || strings.Contains(a, "handle 5") {
		t.Errorf("--port tcp/9090: want only the rule of 9090:\n%s\nskipped %q", a, p.Skipped)
	}
}

// Orphans: a masquerade entry without a claim, an orphan gate and an unused conditions
// chain are removed; a damaged layout is rewritten; with a scope, the shared ones stay.
func TestRepairOrphans(t *testing.T) {
	o := nftables.Observed{Table: true, Layout: []string{"chain postrouting: 0 rules, not the layout's 5"},
		Dump:        nftables.Dump{Masq: []nftables.MasqElement{{Family: hostport.V4, PodIP: netip.MustParseAddr("10.0.0.9"), Owner: pgOwner, Comment: nftables.OwnerComment(pgOwner)}}},
		CondChains:  []string{"cond-4-0123456789abcdef"},
		OrphanGates: nil}
	fas := Audit(o, nil, judge{}, nil)
	if k := kinds(fas); k[plan.KindOrphanMasquerade] != 1 || k[plan.KindLayoutDamaged] != 1 || len(k) != 2 {
		t.Errorf("audit: %v", k)
	}
	p, err := PlanRepair(&nftables.Tx{}, o, nil, nil, judge{}, nil, plan.RepairScope{})
	if err != nil {
		t.Fatal(err)
	}
	if a := actions(p); !p.Layout || !strings.Contains(a, "delete element inet portguard snat4 { 10.0.0.9 }") || !strings.Contains(a, "delete chain inet portguard cond-4-0123456789abcdef") {
		t.Errorf("repair: layout %v\n%s", p.Layout, a)
	}
	p, _ = PlanRepair(&nftables.Tx{}, o, nil, nil, judge{}, nil, plan.RepairScope{Owner: pgOwner})
	if p.Layout || strings.Contains(actions(p), "delete chain") || !strings.Contains(actions(p), "snat4") {
		t.Errorf("--owner: want only the owner's entry:\n%s\nskipped %q", actions(p), p.Skipped)
	}
}

// A claim of iptables' nat table on portguard's port: reported as split; a stale iptables
// owner's attachment is planned for removal (outside the batch), a live one left alone.
func TestRepairIPTablesSplit(t *testing.T) {
	ipOwner := hostport.Owner{Network: "old", ContainerID: "ipt1"}
	ipt := []plan.FamilyAudit{{Family: hostport.V4, Backend: plan.BackendIPTables, Available: true, Ports: []plan.PortClaims{{
		Protocol: "tcp", HostPort: 8080,
		Claims: []plan.AuditClaim{plan.NewClaim(1, ipOwner, tcp8080, netip.MustParseAddrPort("10.0.0.7:80"), "CNI-DN-x")}}}}}
	o := nftables.Observed{Table: true, Dump: nftables.Dump{Claims: []nftables.Element{elem(pgOwner, tcp8080, "10.0.0.2:80")}}}
	if k := kinds(Audit(o, ipt, judge{pgOwner: true}, nil)); k[plan.KindSplitClaim] != 1 || len(k) != 1 {
		t.Errorf("audit: %v", k)
	}
	p, err := PlanRepair(&nftables.Tx{}, o, ipt, nil, judge{pgOwner: true}, nil, plan.RepairScope{})
	if err != nil || len(p.IPTables) != 1 || p.IPTables[0].Owner != ipOwner || len(p.Actions) != 0 || p.Empty() {
		t.Errorf("stale iptables owner: %+v %v", p, err)
	}
	p, _ = PlanRepair(&nftables.Tx{}, o, ipt, nil, judge{pgOwner: true, ipOwner: true}, nil, plan.RepairScope{})
	if len(p.IPTables) != 0 || !p.Empty() || len(p.Skipped) != 1 {
		t.Errorf("live iptables owner: %+v", p)
	}
}

// An element whose hashed comment no record resolves has an owner that cannot be judged: it
// ranks with live owners, so a live upstream claimant of its port does not get it removed
// (both are left alone and reported).
func TestRepairKeepsUnjudgeableElement(t *testing.T) {
	o := observed()
	o.Dump.Claims[0].Owner = hostport.Owner{}
	o.Dump.Claims[0].Comment = "sha256:0123456789abcdef"
	p, err := PlanRepair(&nftables.Tx{}, o, nil, nil, judge{upOwner: true}, nil, plan.RepairScope{})
	if err != nil {
		t.Fatal(err)
	}
	if a := actions(p); strings.Contains(a, "delete element") {
		t.Errorf("an unjudgeable owner's element was removed:\n%s", a)
	}
}

// A comment read from the kernel reaches repair's actions verbatim only when it is printable:
// a newline must not start a line of its own in what --dry-run prints as nft syntax.
func TestPrintableQuotesControlCharacters(t *testing.T) {
	if got := printable("net/c1"); got != "net/c1" {
		t.Errorf("printable(net/c1) = %q", got)
	}
	if got := printable("x\nflush ruleset"); strings.Contains(got, "\n") || !strings.HasPrefix(got, `"`) {
		t.Errorf("printable kept a raw newline: %q", got)
	}
}
