package iptablestest

import (
	"errors"
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
)

const base = `*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
:CNI-DN-a - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"net\" id: \"a\"" -m multiport --dports 8080 -j CNI-DN-a
-A CNI-DN-a -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.88.0.2:80
COMMIT
`

func newKernel(t *testing.T) *Kernel {
	t.Helper()
	k, err := New(map[hostport.Family]string{hostport.V4: base})
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// Every refusal the kernel makes fails the whole payload at its line, and changes nothing.
func TestRefusedPayloadsChangeNothing(t *testing.T) {
	cases := map[string]string{
		"-D of a missing rule":         "-D CNI-DN-a -p tcp --dport 9090 -j DNAT --to-destination 10.88.0.2:80",
		"-C of a missing rule":         "-C CNI-HOSTPORT-DNAT -j CNI-DN-b",
		"-X of a referenced chain":     "-F CNI-DN-a\n-X CNI-DN-a",
		"-X of a chain with rules":     "-D CNI-HOSTPORT-DNAT 1\n-X CNI-DN-a",
		"-X of a missing chain":        "-X CNI-DN-b",
		"-X of a built-in chain":       "-X OUTPUT",
		"-N of an existing chain":      "-N CNI-DN-a",
		"-A into a missing chain":      "-A CNI-DN-b -j RETURN",
		"-I into a missing chain":      "-I CNI-DN-b 1 -j RETURN",
		"-I past the end":              "-I CNI-DN-a 4 -j RETURN",
		"-A jumping to a missing one":  "-A CNI-HOSTPORT-DNAT -j CNI-DN-b",
		"-F of a missing chain":        "-F CNI-DN-b",
		"an unknown command":           "-Z CNI-DN-a",
		"a -D by number past the end":  "-D CNI-DN-a 3",
		"-g to a target, not a chain":  "-A CNI-DN-a -g DNAT",
		"a payload of another table":   "",
		"a payload without its COMMIT": "",
	}
	for name, bad := range cases {
		before := newKernel(t)
		k := newKernel(t)
		payload := "*nat\n-A CNI-DN-a -s 10.88.0.0/16 -j RETURN\n:CNI-DN-new - [0:0]\n" + bad + "\nCOMMIT\n"
		line := 4 + strings.Count(bad, "\n")
		switch name {
		case "a payload of another table":
			payload, line = "*filter\n-A INPUT -j ACCEPT\nCOMMIT\n", 1
		case "a payload without its COMMIT":
			payload, line = "*nat\n-A CNI-DN-a -j RETURN\n", 3
		}
		err := k.Restore(hostport.V4, payload)
		var re *iptables.RestoreError
		if !errors.As(err, &re) || re.Line != line || iptables.FailedLine(re.Stderr) != line {
			t.Errorf("%s: got %v, want a RestoreError at line %d", name, err, line)
		}
		if k.Dump(hostport.V4) != before.Dump(hostport.V4) {
			t.Errorf("%s: the refused payload changed the table:\n%s", name, k.Dump(hostport.V4))
		}
	}
}

func TestAppliedPayload(t *testing.T) {
	k := newKernel(t)
	// A rule spelled the way iptables does not print it still matches for -C and -D.
	payload := `*nat
:CNI-DN-b - [0:0]
-C CNI-DN-a -p tcp --destination-port 8080 -j DNAT --to-destination 10.88.0.2:80
-A CNI-DN-b -p tcp -m tcp --dport 9090 -j DNAT --to-destination 10.88.0.3:90
-I CNI-HOSTPORT-DNAT 1 -p tcp -m comment --comment "dnat name: \"net\" id: \"b\"" -m multiport --dports 9090 -j CNI-DN-b
-D CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"net\" id: \"a\"" -m multiport --dports 8080 -j CNI-DN-a
-F CNI-DN-a
-X CNI-DN-a
COMMIT
`
	if err := k.Restore(hostport.V4, payload); err != nil {
		t.Fatal(err)
	}
	if k.Has(hostport.V4, "CNI-DN-a") || len(k.Rules(hostport.V4, "CNI-DN-b")) != 1 {
		t.Fatalf("table after the payload:\n%s", k.Dump(hostport.V4))
	}
	// Reads parse back what was written, quoted comment included.
	tb := iptables.NewTable()
	if err := k.List(hostport.V4, "CNI-HOSTPORT-DNAT", tb); err != nil {
		t.Fatal(err)
	}
	if err := k.List(hostport.V4, "CNI-DN-a", tb); err != nil {
		t.Fatal(err)
	}
	rs := tb.Rules("CNI-HOSTPORT-DNAT")
	if len(rs) != 1 || rs[0].Value("--comment") != `dnat name: "net" id: "b"` || !tb.Missing["CNI-DN-a"] {
		t.Fatalf("listed %+v, missing %v", rs, tb.Missing)
	}
	// A declared chain that exists is flushed.
	if err := k.Restore(hostport.V4, "*nat\n:CNI-DN-b - [0:0]\nCOMMIT\n"); err != nil || len(k.Rules(hostport.V4, "CNI-DN-b")) != 0 || !k.Has(hostport.V4, "CNI-DN-b") {
		t.Fatalf("declare of an existing chain: %v\n%s", err, k.Dump(hostport.V4))
	}
	want := []string{"restore ipv4", "list ipv4 CNI-HOSTPORT-DNAT", "list ipv4 CNI-DN-a", "restore ipv4"}
	if got := strings.Join(k.Calls(), ","); got != strings.Join(want, ",") {
		t.Fatalf("calls %s", got)
	}
}

// The refused line is the transaction's line, so Explain names the operation's purpose.
func TestExplainNamesRefusedOperation(t *testing.T) {
	k := newKernel(t)
	tx := &iptables.Tx{}
	tx.DeclareChain("CNI-DN-b", "create the chain")
	tx.CheckRule(iptables.Rule{Chain: "CNI-HOSTPORT-DNAT", Args: []string{"-j", "CNI-DN-zzz"}}, "the victim's jump is still there")
	tx.AppendRule(iptables.Rule{Chain: "CNI-DN-b", Args: []string{"-j", "RETURN"}}, "a rule")
	payload, err := tx.Render()
	if err != nil {
		t.Fatal(err)
	}
	err = k.Restore(hostport.V4, payload)
	var re *iptables.RestoreError
	if !errors.As(err, &re) || tx.Explain(re.Line) != "the victim's jump is still there" {
		t.Fatalf("got %v", err)
	}
}

func TestBeforeRestoreAndUnusable(t *testing.T) {
	k := newKernel(t)
	k.BeforeRestore = func(f hostport.Family, _ string) {
		if err := k.Apply(f, "*nat\n-D CNI-DN-a 1\nCOMMIT\n"); err != nil {
			t.Fatal(err)
		}
	}
	err := k.Restore(hostport.V4, "*nat\n-C CNI-DN-a -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.88.0.2:80\nCOMMIT\n")
	var re *iptables.RestoreError
	if !errors.As(err, &re) || re.Line != 2 {
		t.Fatalf("a rule another writer removed first still checked: %v", err)
	}
	k.Unusable = map[hostport.Family]bool{hostport.V6: true}
	for _, err := range []error{k.Restore(hostport.V6, "*nat\nCOMMIT\n"), k.List(hostport.V6, "X", iptables.NewTable()),
		k.Save(hostport.V6, iptables.NewTable()), k.Probe(hostport.V6)} {
		if !errors.Is(err, iptables.ErrUnavailable) {
			t.Errorf("unusable family answered %v", err)
		}
	}
}
