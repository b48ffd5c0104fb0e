package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/iptables/iptablestest"
)

func runCLI(args ...string) (string, string, int) {
	var out, errb bytes.Buffer
	code := run(args, &out, &errb)
	return out.String(), errb.String(), code
}

func TestUsageErrorsAreOneLineExit2(t *testing.T) {
	for _, args := range [][]string{
		{},
		{"frobnicate"},
		{"audit", "--bogus"},
		{"audit", "-o", "yaml"},
		{"audit", "--family", "5"},
		{"audit", "stray"},
		{"repair", "--keep", "no-slash"},
		{"repair", "--keep", "net/bad id"},
		{"gc"},
		{"gc", "--network", "n"},
		{"gc", "--network", "n", "--valid", "a", "--remove-all"},
		{"gc", "--network", "n", "--valid", "../../etc"},
		{"doctor", "-o", "yaml"},
		{"repair", "--lock-timeout", "soon"},
	} {
		out, errs, code := runCLI(args...)
		if code != 2 {
			t.Errorf("%v: exit %d, want 2", args, code)
		}
		if len(args) == 0 {
			continue
		}
		if out != "" || strings.Count(errs, "\n") != 1 || !strings.HasPrefix(errs, "portguardctl ") {
			t.Errorf("%v: stdout %q stderr %q, want one line on stderr", args, out, errs)
		}
	}
}

func TestHelp(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"help"}, {"audit", "--help"}, {"repair", "-h"}, {"doctor", "--help"}, {"gc", "--help"}} {
		out, errs, code := runCLI(args...)
		if code != 0 || errs != "" || !strings.Contains(out, "Examples:") {
			t.Errorf("%v: exit %d stderr %q stdout:\n%s", args, code, errs, out)
		}
	}
}

// withFake runs the commands against iptablestest's fake nat tables (no root needed).
func withFake(t *testing.T, f *iptablestest.Kernel) {
	old := newRunner
	newRunner = func(time.Duration) iptables.Runner { return f }
	t.Cleanup(func() { newRunner = old })
}

const fakeBlog = `*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
:CNI-DN-aaaaaaaaaaaaaaaaaaaaa - [0:0]
:CNI-DN-bbbbbbbbbbbbbbbbbbbbb - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"cbr0\" id: \"bad\"" -m multiport --dports 8080 -j CNI-DN-aaaaaaaaaaaaaaaaaaaaa
-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"cbr0\" id: \"good\"" -m multiport --dports 8080 -j CNI-DN-bbbbbbbbbbbbbbbbbbbbb
-A CNI-DN-aaaaaaaaaaaaaaaaaaaaa -p tcp -m tcp --dport 8086 -j DNAT --to-destination 10.88.0.2:80
-A CNI-DN-bbbbbbbbbbbbbbbbbbbbb -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.88.0.3:80
COMMIT
`

func TestAuditWithFakeRunner(t *testing.T) {
	f := iptablestest.MustNew(map[hostport.Family]string{hostport.V4: fakeBlog})
	f.Unusable = map[hostport.Family]bool{hostport.V6: true}
	withFake(t, f)
	out, errs, code := runCLI("audit")
	if code != 1 || errs != "" {
		t.Fatalf("exit %d stderr %q", code, errs)
	}
	for _, want := range []string{"no-dnat", "port-mismatch", "ipv6: not audited"} {
		if !strings.Contains(out, want) {
			t.Errorf("lacks %q:\n%s", want, out)
		}
	}
	// one iptables-save per family, nothing else
	if got := strings.Join(f.Calls(), ","); got != "save ipv4,save ipv6" {
		t.Errorf("calls %s", got)
	}
	// asking for the unusable family explicitly is an environment error
	if _, errs, code := runCLI("audit", "--family", "6"); code != 2 || !strings.Contains(errs, "iptables unavailable") {
		t.Errorf("--family 6: exit %d %q", code, errs)
	}
	// dry-run renders without restoring
	f.ResetCalls()
	out, _, code = runCLI("repair", "--dry-run")
	if code != 0 || !strings.Contains(out, "-D CNI-HOSTPORT-DNAT -p tcp -m comment --comment \"dnat name: \\\"cbr0\\\" id: \\\"bad\\\"\"") || len(f.Payloads(hostport.V4)) != 0 {
		t.Fatalf("dry-run exit %d payloads %d:\n%s", code, len(f.Payloads(hostport.V4)), out)
	}
}

// A node without a usable ip6tables is healthy when IPv4 is: JSON and exit status agree.
func TestUnavailableFamilyDoesNotMakeUnhealthy(t *testing.T) {
	healthy := `*nat
:PREROUTING ACCEPT [0:0]
COMMIT
`
	f := iptablestest.MustNew(map[hostport.Family]string{hostport.V4: healthy})
	f.Unusable = map[hostport.Family]bool{hostport.V6: true}
	withFake(t, f)
	out, _, code := runCLI("audit", "-o", "json")
	if code != 0 || !strings.Contains(out, `"healthy": true`) || !strings.Contains(out, `"available": false`) {
		t.Fatalf("exit %d:\n%s", code, out)
	}
}
