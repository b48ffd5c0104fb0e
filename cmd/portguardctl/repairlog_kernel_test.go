package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/plan"
)

type repairEvent struct {
	Event  string             `json:"event"`
	Repair plan.RepairRemoval `json:"repair"`
	Time   string             `json:"time"`
}

// readRepairLog parses JSON lines (other lines, e.g. stderr notes, are ignored when lax).
func readRepairLog(t *testing.T, text string, lax bool) []repairEvent {
	t.Helper()
	var out []repairEvent
	for _, l := range strings.Split(strings.TrimSpace(text), "\n") {
		if l == "" {
			continue
		}
		var ev repairEvent
		if err := json.Unmarshal([]byte(l), &ev); err != nil {
			if lax {
				continue
			}
			t.Fatalf("log line is not JSON: %v: %q", err, l)
		}
		if ev.Event != "repair" || ev.Time == "" {
			t.Fatalf("log line %q: want event repair with a time", l)
		}
		out = append(out, ev)
	}
	return out
}

// chainsOf lists the CNI-DN chains an iptables-save text declares.
func dnChains(save string) map[string]bool {
	out := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^:(CNI-DN-\S+)`).FindAllStringSubmatch(save, -1) {
		out[m[1]] = true
	}
	return out
}

// linesWith keeps the lines of an iptables-save text that mention s.
func linesWith(save, s string) string {
	var out []string
	for _, l := range strings.Split(save, "\n") {
		if strings.Contains(l, s) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestRepairLogAndPortScope: on an upstream-format node with two broken ports (tcp/8080
// contested by a stale and a live claim; tcp/9090 sent into a chain that DNATs 9096),
// repair --port tcp/8080 fixes only 8080, leaves 9090's rules byte-identical and says so,
// and logs exactly the chain it removed, to stderr and --log-file; a later full repair
// appends the rest, and every chain that disappeared is in the log.
func TestRepairLogAndPortScope(t *testing.T) {
	needRoot(t)
	ns := newNS(t)
	foreign(t, ns, hostport.V4)
	u := newUpstream(t, ns, hostport.V4)
	u.attach(stale, 8080, 8080, "10.88.0.0/24", "10.88.0.2", 80)
	u.attach(live, 8080, 8080, "10.88.0.0/24", "10.88.0.3", 80)
	u.attach(wrong, 9090, 9096, "10.88.0.0/24", "10.88.0.5", 90)
	before := saveNat(t, ns, hostport.V4)
	rep, _ := auditJSON(t, ns, "--family", "4")
	if k := problemKinds(rep); k[plan.KindShadowedClaim] != 1 || k[plan.KindPortMismatch] != 1 || len(k) != 2 {
		t.Fatalf("fixture problems %v", k)
	}
	logFile := filepath.Join(t.TempDir(), "repair.log")

	r := ctl(t, ns, "repair", "--family", "4", "--port", "tcp/8080", "--log-file", logFile)
	if r.code != 1 || !strings.Contains(r.stdout, "left alone (outside --port tcp/8080)") || !strings.Contains(r.stdout, "audit after repair: problems left") {
		t.Fatalf("repair --port tcp/8080: exit %d (want 1: 9090 is left)\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	after := saveNat(t, ns, hostport.V4)
	wch := hostport.ChainName(wrong)
	if a, b := linesWith(before, wch), linesWith(after, wch); a != b || a == "" {
		t.Fatalf("--port tcp/8080 touched the 9090 rules:\nbefore:\n%s\nafter:\n%s", a, b)
	}
	if a, b := foreignRules(before), foreignRules(after); a != b {
		t.Fatalf("non-CNI rules changed:\n%s\n---\n%s", a, b)
	}
	rep, _ = auditJSON(t, ns, "--family", "4")
	if k := problemKinds(rep); k[plan.KindPortMismatch] != 1 || len(k) != 1 {
		t.Fatalf("after --port tcp/8080: problems %v, want the 9090 mismatch only", k)
	}

	data, err := os.ReadFile(logFile)
	if err != nil {
		t.Fatal(err)
	}
	logged := readRepairLog(t, string(data), false)
	if len(logged) != 1 {
		t.Fatalf("log has %d lines, want 1 (the stale claim):\n%s", len(logged), data)
	}
	rm := logged[0].Repair
	if rm.Owner != stale || rm.Chain != hostport.ChainName(stale) || !rm.ChainRemoved || rm.Family != "ipv4" ||
		fmt.Sprint(rm.Destinations) != "[10.88.0.2:80]" || len(rm.Claims) != 1 || rm.Claims[0].HostPort != 8080 ||
		fmt.Sprint(rm.Reasons) != "[shadowed-claim]" || rm.KeptFor == nil || *rm.KeptFor != live {
		t.Fatalf("logged removal %+v", rm)
	}
	if rm.OwnerState == "" || rm.Evidence == nil {
		t.Errorf("the removal carries no liveness judgement: %+v", rm)
	}
	if got := readRepairLog(t, r.stderr, true); len(got) != 1 || got[0].Repair.Chain != rm.Chain {
		t.Errorf("stderr does not carry the same event: %q", r.stderr)
	}
	if gone := diffChains(before, after); fmt.Sprint(gone) != fmt.Sprint([]string{rm.Chain}) {
		t.Errorf("chains removed %v, log says %s", gone, rm.Chain)
	}

	// The full repair appends what it removes; every chain gone since the start is logged.
	if r := ctl(t, ns, "repair", "--family", "4", "--log-file", logFile); r.code != 0 {
		t.Fatalf("full repair: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	data, _ = os.ReadFile(logFile)
	logged = readRepairLog(t, string(data), false)
	var loggedGone []string
	for _, ev := range logged {
		if ev.Repair.ChainRemoved {
			loggedGone = append(loggedGone, ev.Repair.Chain)
		}
	}
	sort.Strings(loggedGone)
	if gone := diffChains(before, saveNat(t, ns, hostport.V4)); len(logged) != 2 || fmt.Sprint(gone) != fmt.Sprint(loggedGone) {
		t.Fatalf("chains removed %v, logged %v (%d lines):\n%s", gone, loggedGone, len(logged), data)
	}
	if rm := logged[1].Repair; rm.Owner != wrong || fmt.Sprint(rm.Reasons) != "[port-mismatch]" {
		t.Fatalf("second removal %+v", rm)
	}

	// --owner with no chain is a usage error; --port in a bad shape too.
	for _, args := range [][]string{{"--owner", "cbr0/nosuchcontainer"}, {"--port", "8080"}} {
		if r := ctl(t, ns, append([]string{"repair"}, args...)...); r.code != 2 {
			t.Errorf("repair %v: exit %d %q", args, r.code, r.stderr)
		}
	}
}

func diffChains(before, after string) []string {
	b, a := dnChains(before), dnChains(after)
	var gone []string
	for c := range b {
		if !a[c] {
			gone = append(gone, c)
		}
	}
	sort.Strings(gone)
	return gone
}
