package nftables

import (
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/hostport"
)

// Verify reads the layout in two dumps of the table (sets, rule marks) and names each kind
// of damage: a rule that is not the layout's (no mark), a missing map, a missing chain, a
// missing table; Ensure repairs each one.
func TestKernelVerifyNamesDamage(t *testing.T) {
	t.Parallel()
	k := newKBed(t)
	for _, tc := range []struct {
		damage []string
		want   string
	}{
		{[]string{"add", "rule", "inet", TableName, chainOutput, "counter"}, "chain output: "},
		{[]string{"delete", "map", "inet", TableName, setName(setGuard, hostport.V6)}, "map " + setName(setGuard, hostport.V6) + " missing"},
		{[]string{"delete", "chain", "inet", TableName, chainPostrouting}, "chain postrouting: 0 rules"},
		{[]string{"delete", "table", "inet", TableName}, "table inet " + TableName + " missing"},
	} {
		if p, err := k.tab.Verify(); err != nil || len(p) != 0 {
			t.Fatalf("Verify of the layout in place: %v, %v", p, err)
		}
		k.MustExec(k.Node, append([]string{"nft"}, tc.damage...)...)
		p, err := k.tab.Verify()
		if err != nil || len(p) != 1 || !strings.HasPrefix(p[0], tc.want) {
			t.Errorf("after nft %v: Verify says %q (%v), want one problem starting %q", tc.damage, p, err, tc.want)
		}
		if wrote, err := k.tab.Ensure(); err != nil || !wrote {
			t.Fatalf("Ensure after nft %v: %v, %v", tc.damage, wrote, err)
		}
	}
}
