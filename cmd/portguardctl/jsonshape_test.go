package main

import (
	"bytes"
	"encoding/json"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/plan"
	"github.com/portguard/portguard/pkg/state"
)

type field struct {
	typ      string
	required bool
}

// docShape reads the ```shape block of docs/audit-json.md.
func docShape(t *testing.T) (map[string]field, string) {
	t.Helper()
	b, err := os.ReadFile("../../docs/audit-json.md")
	if err != nil {
		t.Fatal(err)
	}
	doc := string(b)
	_, rest, ok := strings.Cut(doc, "```shape\n")
	if !ok {
		t.Fatal("docs/audit-json.md has no ```shape block")
	}
	block, _, _ := strings.Cut(rest, "```")
	shape := map[string]field{}
	for _, l := range strings.Split(block, "\n") {
		f := strings.Fields(l)
		if len(f) == 0 {
			continue
		}
		if len(f) < 3 || (f[2] != "required" && f[2] != "optional") {
			t.Fatalf("bad shape line %q", l)
		}
		shape[f[0]] = field{typ: f[1], required: f[2] == "required"}
	}
	return shape, doc
}

func jsonType(v any) string {
	switch v.(type) {
	case string:
		return "string"
	case float64:
		return "number"
	case bool:
		return "bool"
	case map[string]any:
		return "object"
	case []any:
		return "array"
	}
	return "null"
}

// validateShape checks a report against the documented shape, both ways.
func validateShape(t *testing.T, data []byte) {
	t.Helper()
	shape, _ := docShape(t)
	var v any
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&v); err != nil {
		t.Fatalf("not JSON: %v", err)
	}
	var walk func(path string, v any)
	walk = func(path string, v any) {
		if path != "" {
			f, ok := shape[path]
			if !ok {
				t.Errorf("field %s is not documented in docs/audit-json.md", path)
				return
			}
			if got := jsonType(v); got != f.typ {
				t.Errorf("field %s is %s, documented as %s", path, got, f.typ)
			}
		}
		switch x := v.(type) {
		case map[string]any:
			prefix := path
			if prefix != "" {
				prefix += "."
			}
			for k, sub := range x {
				walk(prefix+k, sub)
			}
			// every required direct child must be there
			for p, f := range shape {
				if !f.required || !strings.HasPrefix(p, prefix) {
					continue
				}
				name := strings.TrimPrefix(p, prefix)
				if strings.ContainsAny(name, ".[") {
					continue
				}
				if _, ok := x[name]; !ok {
					t.Errorf("required field %s%s missing", prefix, name)
				}
			}
		case []any:
			for _, sub := range x {
				walk(path+"[]", sub)
			}
		}
	}
	walk("", v)
}

func TestDocExampleMatchesShape(t *testing.T) {
	_, doc := docShape(t)
	_, rest, ok := strings.Cut(doc, "## Example\n\n```json\n")
	if !ok {
		t.Fatal("no example in docs/audit-json.md")
	}
	example, _, _ := strings.Cut(rest, "```")
	validateShape(t, []byte(example))
	var rep plan.AuditReport
	if err := json.Unmarshal([]byte(example), &rep); err != nil {
		t.Fatal(err)
	}
}

func TestPlannedReportMatchesShape(t *testing.T) {
	o1 := hostport.Owner{Network: "cbr0", ContainerID: "a"}
	o2 := hostport.Owner{Network: "cbr0", ContainerID: "b"}
	c1, c2 := hostport.ChainName(o1), hostport.ChainName(o2)
	text := `*nat
:PREROUTING ACCEPT [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
:` + c1 + ` - [0:0]
:` + c2 + ` - [0:0]
:CNI-DN-000000000000000000000 - [0:0]
-A ` + c1 + ` -d 192.0.2.1/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.88.0.2:80
-A ` + c2 + ` -p tcp -m tcp --dport 8086 -s 10.88.0.0/24 -j CNI-HOSTPORT-SETMARK
-A ` + c2 + ` -p tcp -m tcp --dport 8086 -j DNAT --to-destination 10.88.0.3:80
-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"cbr0\" id: \"a\"" -m multiport --dports 8080 -j ` + c1 + `
-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"cbr0\" id: \"a\"" -m multiport --dports 8080 -j ` + c1 + `
-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"cbr0\" id: \"b\"" -m multiport --dports 8080 -j ` + c2 + `
COMMIT
`
	tb := iptables.NewTable()
	if err := tb.Parse(text); err != nil {
		t.Fatal(err)
	}
	rep := plan.NewAuditReport([]plan.FamilyAudit{plan.Audit(state.New(hostport.V4, tb)), plan.UnavailableAudit(hostport.V6, iptables.ErrUnavailable)})
	b, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	validateShape(t, b)
	// every problem kind that occurs is documented
	_, doc := docShape(t)
	for _, fa := range rep.Families {
		for _, p := range fa.Problems {
			if !regexp.MustCompile("`" + regexp.QuoteMeta(p.Kind) + "`").MatchString(doc) {
				t.Errorf("problem kind %s is not documented", p.Kind)
			}
		}
	}
	if len(rep.Families[0].Problems) < 5 {
		t.Fatalf("expected many problems, got %+v", rep.Families[0].Problems)
	}
}
