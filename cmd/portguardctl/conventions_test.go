package main

import (
	"encoding/json"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables/iptablestest"
)

// subcommands lists every subcommand; rootHelp must name each one.
var subcommands = []string{"audit", "repair", "doctor", "gc", "export", "version"}

// Every subcommand's --help (and -h) prints its help on stdout with a Usage line, its flags
// and examples, and exits 0 without doing anything else.
func TestEverySubcommandHelp(t *testing.T) {
	f := iptablestest.MustNew(map[hostport.Family]string{hostport.V4: fakeBlog})
	withFake(t, f)
	for _, cmd := range subcommands {
		if !regexp.MustCompile(`(?m)^  ` + cmd + ` `).MatchString(rootHelp) {
			t.Errorf("portguardctl --help does not list %s", cmd)
		}
		for _, h := range []string{"--help", "-h"} {
			out, errs, code := runCLI(cmd, h)
			if code != 0 || errs != "" || !strings.HasPrefix(out, "Usage: portguardctl "+cmd) ||
				!strings.Contains(out, "Examples:") || !strings.Contains(out, "\nFlags:\n") {
				t.Errorf("%s %s: exit %d stderr %q stdout:\n%s", cmd, h, code, errs, out)
			}
		}
	}
	if calls := f.Calls(); len(calls) != 0 {
		t.Errorf("--help ran iptables: %v", calls)
	}
}

// A bad flag names the subcommand's --help.
func TestUnknownFlagPointsToHelp(t *testing.T) {
	for _, cmd := range subcommands {
		_, errs, code := runCLI(cmd, "--bogus")
		if code != 2 || !strings.Contains(errs, "-bogus") || !strings.Contains(errs, `run "portguardctl `+cmd+` --help"`) {
			t.Errorf("%s --bogus: exit %d %q", cmd, code, errs)
		}
	}
}

// -o takes the same names everywhere: text and json (audit also prometheus), text the default;
// audit's former "table" still works; a bad value lists the valid ones.
func TestOutputFormatsAreConsistent(t *testing.T) {
	healthy := "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"
	withFake(t, iptablestest.MustNew(map[hostport.Family]string{hostport.V4: healthy, hostport.V6: healthy}))
	for _, cmd := range []string{"audit", "version"} {
		def, _, c1 := runCLI(cmd)
		text, _, c2 := runCLI(cmd, "-o", "text")
		if c1 != 0 || c2 != 0 || def != text {
			t.Errorf("%s: default output differs from -o text (exit %d, %d)", cmd, c1, c2)
		}
		out, _, code := runCLI(cmd, "-o", "json")
		var v map[string]any
		if code != 0 || json.Unmarshal([]byte(out), &v) != nil {
			t.Errorf("%s -o json: exit %d %q", cmd, code, out)
		}
	}
	// --family: "4, 6 or all", all when not given
	for args, want := range map[string]string{"": "ipv4,ipv6", "--family all": "ipv4,ipv6", "--family 4": "ipv4", "--family 6": "ipv6"} {
		out, _, code := runCLI(append([]string{"audit", "-o", "json"}, strings.Fields(args)...)...)
		var rep struct{ Families []struct{ Family string } }
		json.Unmarshal([]byte(out), &rep)
		var got []string
		for _, f := range rep.Families {
			got = append(got, f.Family)
		}
		if code != 0 || strings.Join(got, ",") != want {
			t.Errorf("audit %s: exit %d families %v, want %s", args, code, got, want)
		}
	}
	if table, _, _ := runCLI("audit", "-o", "table"); !strings.Contains(table, "Healthy:") {
		t.Errorf("audit -o table (alias of text): %q", table)
	}
	for cmd, want := range map[string]string{"audit": "must be text, json or prometheus", "doctor": "must be text or json", "version": "must be text or json"} {
		if _, errs, code := runCLI(cmd, "-o", "yaml"); code != 2 || !strings.Contains(errs, want) {
			t.Errorf("%s -o yaml: exit %d %q", cmd, code, errs)
		}
	}
	// each help states the values and the default it has
	for _, cmd := range []string{"audit", "doctor", "version"} {
		out, _, _ := runCLI(cmd, "--help")
		if !strings.Contains(out, "[-o text|json") || !regexp.MustCompile(`-o string\n\s+output format: text.*\(default "text"\)`).MatchString(out) {
			t.Errorf("%s --help does not state -o text|json with default text:\n%s", cmd, out)
		}
	}
}

// audit -o prometheus exits 0 with problems (they are in the metrics), 2 when it cannot
// collect; the text and JSON outputs keep exit 1 for problems. Shadowed claims appear under
// their name and the deprecated alias, with the same value.
func TestPrometheusExitAndNames(t *testing.T) {
	shadow := `*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
:CNI-DN-aaaaaaaaaaaaaaaaaaaaa - [0:0]
:CNI-DN-bbbbbbbbbbbbbbbbbbbbb - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"cbr0\" id: \"a\"" -m multiport --dports 8080 -j CNI-DN-aaaaaaaaaaaaaaaaaaaaa
-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"cbr0\" id: \"b\"" -m multiport --dports 8080 -j CNI-DN-bbbbbbbbbbbbbbbbbbbbb
-A CNI-DN-aaaaaaaaaaaaaaaaaaaaa -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.88.0.2:80
-A CNI-DN-bbbbbbbbbbbbbbbbbbbbb -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.88.0.3:80
COMMIT
`
	f := iptablestest.MustNew(map[hostport.Family]string{hostport.V4: shadow})
	f.Unusable = map[hostport.Family]bool{hostport.V6: true}
	withFake(t, f)
	out, errs, code := runCLI("audit", "-o", "prometheus")
	if code != 0 || errs != "" {
		t.Fatalf("prometheus with problems: exit %d %q", code, errs)
	}
	for _, want := range []string{`portguard_shadowed_claims{backend="iptables",family="ipv4"} 1`, `portguard_duplicate_claims{backend="iptables",family="ipv4"} 1`,
		`portguard_audit_healthy{backend="iptables",family="ipv4"} 0`, `portguard_audit_up{backend="iptables",family="ipv6"} 0`, "# HELP portguard_duplicate_claims Deprecated alias of portguard_shadowed_claims"} {
		if !strings.Contains(out, want) {
			t.Errorf("lacks %q:\n%s", want, out)
		}
	}
	for _, o := range []string{"text", "json"} {
		if _, _, code := runCLI("audit", "-o", o); code != 1 {
			t.Errorf("audit -o %s with problems: exit %d, want 1", o, code)
		}
	}
	out, _, _ = runCLI("audit", "-o", "json")
	var rep struct {
		Families []struct {
			Summary map[string]int `json:"summary"`
		} `json:"families"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil || rep.Families[0].Summary["shadowedClaims"] != 1 || rep.Families[0].Summary["duplicateClaims"] != 1 {
		t.Errorf("JSON summary: %v %+v", err, rep)
	}
	// Nothing to collect: exit 2 and nothing on stdout.
	f.Unusable = map[hostport.Family]bool{hostport.V4: true, hostport.V6: true}
	if out, _, code := runCLI("audit", "-o", "prometheus"); code != 2 || out != "" {
		t.Errorf("prometheus without iptables: exit %d stdout %q", code, out)
	}
}

// docs/cli.md lists exactly the metrics audit -o prometheus writes.
func TestMetricsDocumented(t *testing.T) {
	healthy := "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"
	withFake(t, iptablestest.MustNew(map[hostport.Family]string{hostport.V4: healthy, hostport.V6: healthy}))
	out, _, code := runCLI("audit", "-o", "prometheus")
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	emitted := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^# TYPE (\S+) `).FindAllStringSubmatch(out, -1) {
		emitted[m[1]] = true
	}
	doc, err := os.ReadFile("../../docs/cli.md")
	if err != nil {
		t.Fatal(err)
	}
	documented := map[string]bool{}
	for _, m := range regexp.MustCompile("(?m)^\\| `(portguard_[a-z_]+)` \\|").FindAllStringSubmatch(string(doc), -1) {
		documented[m[1]] = true
	}
	for m := range emitted {
		if !documented[m] {
			t.Errorf("metric %s is not in docs/cli.md", m)
		}
	}
	for m := range documented {
		if !emitted[m] {
			t.Errorf("docs/cli.md lists %s, which audit does not write", m)
		}
	}
	if len(emitted) < 10 {
		t.Fatalf("only %d metrics parsed", len(emitted))
	}
}
