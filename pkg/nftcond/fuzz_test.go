package nftcond

import (
	"strings"
	"testing"

	"github.com/google/nftables"

	"github.com/portguard/portguard/pkg/hostport"
)

// FuzzParse: Parse never panics; whatever it accepts renders to a canonical string that
// parses back to itself, as one item or split at every space (upstream joins items with
// spaces), and renders to expressions without error.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"ip saddr 192.0.2.1", "ip daddr != { 10.0.0.0/8, 192.0.2.1-192.0.2.9 }", "ip6 saddr { ::1, 2001:db8::/32 }",
		`iifname "eth*"`, "oifname != eth0", "meta mark & 0xff00 == 0x100", "mark 7", "meta mark != 0x10",
		"ip saddr 192.0.2.1\naccept", "ip saddr { 0.0.0.0/1, 128.0.0.0/1 }", `iifname "*"`, "ip6 daddr fe80::/10 iifname lo",
	} {
		f.Add(s, "", false)
		f.Add(s, "ip saddr 10.0.0.1", true)
	}
	f.Fuzz(func(t *testing.T, a, b string, v6 bool) {
		fam := hostport.V4
		if v6 {
			fam = hostport.V6
		}
		c, err := Parse("c", fam, []string{a, b})
		if err != nil {
			if _, ok := err.(*Error); !ok {
				t.Fatalf("error of type %T: %v", err, err)
			}
			return
		}
		canon := c.String()
		for _, in := range [][]string{{canon}, strings.Split(canon, " ")} {
			again, err := Parse("c", fam, in)
			if err != nil {
				t.Fatalf("%q %q -> %q does not re-parse: %v", a, b, canon, err)
			}
			if again.String() != canon {
				t.Fatalf("%q %q -> %q re-parses to %q", a, b, canon, again.String())
			}
		}
		if _, err := c.Exprs(&nftables.Table{Name: "t", Family: nftables.TableFamilyINet}, &recorder{}); err != nil {
			t.Fatalf("%q: Exprs: %v", canon, err)
		}
	})
}
