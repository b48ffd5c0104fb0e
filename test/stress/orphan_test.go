package stress

import (
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/portguard/portguard/pkg/hostport"
)

// TestKilledCallsRestoreDoesNotLandLater: a runtime that gives up on a plugin call SIGKILLs
// the plugin process only (Go's exec.CommandContext does exactly that); an iptables-restore
// the plugin had started keeps running (here: it is still waiting, as it would for the xtables
// lock). The next portguard call must not interleave with it: when the next call on the same
// port has succeeded, the late restore of the dead call must not change the outcome.
//
// Two variants: a fresh node (the dead call's payload creates CNI-HOSTPORT-DNAT) and a node
// that already has portguard's chains.
func TestKilledCallsRestoreDoesNotLandLater(t *testing.T) {
	for _, warm := range []bool{false, true} {
		name := "fresh-node"
		if warm {
			name = "warm-node"
		}
		t.Run(name, func(t *testing.T) {
			require(t)
			n := newNode(t, true)
			n.loadForeign()
			if warm {
				other := &attachment{Name: "other", Network: "onet", ID: "other", IP4: "198.18.60.9/24", Maps: []mapping{{"tcp", 7070, 80}}}
				if r := n.call(callSpec{Verb: "ADD", ID: other.ID, Stdin: other.netConf(5, nil)}); r.Exit != 0 {
					t.Fatalf("ADD other: %s", r)
				}
			}
			dead := &attachment{Name: "dead", Network: "onet", ID: "dead", IP4: "198.18.60.10/24", Maps: []mapping{{"tcp", 8080, 80}}}
			live := &attachment{Name: "live", Network: "onet", ID: "live", IP4: "198.18.60.11/24", Maps: []mapping{{"tcp", 8080, 80}}}

			mark := n.dir + "/dead.mark"
			started := make(chan int, 1)
			res := make(chan callResult, 1)
			go func() {
				res <- n.call(callSpec{Verb: "ADD", ID: dead.ID, Stdin: dead.netConf(5, nil), Started: started,
					Env: []string{"PGS_RESTORE_DELAY=0.7", "PGS_MARK=" + mark}, LeaveOrphans: true})
			}()
			pgid := <-started
			waitMark(t, mark, 10*time.Second)
			syscall.Kill(pgid, syscall.SIGKILL) // the plugin only, as a runtime's timeout does
			deadRes := <-res
			if !deadRes.Killed {
				t.Fatalf("dead ADD was not killed: %s", deadRes)
			}
			r := n.call(callSpec{Verb: "ADD", ID: live.ID, Stdin: live.netConf(5, nil)})
			if r.Exit != 0 {
				t.Fatalf("ADD live after the dead call was killed: %s", r)
			}
			if err := waitGroupGone(pgid, 10*time.Second); err != nil {
				t.Fatal(err)
			}
			o := n.mustObserve(hostport.V4)
			var claims []string
			for _, j := range o.s.Jumps {
				if j.IsClaim() && j.Proto == "tcp" && j.HasPort(8080) {
					claims = append(claims, j.Owner.String())
				}
			}
			var problems []string
			if len(claims) != 1 || claims[0] != live.owner().String() {
				problems = append(problems, "claims on tcp/8080 in kernel order: ["+strings.Join(claims, ", ")+"], want only "+live.owner().String())
			}
			if a := o.s.Attachments[live.chain()]; a == nil || len(a.Jumps) == 0 {
				problems = append(problems, "live's chain "+live.chain()+" has no jump (claim lost)")
			}
			for _, ch := range []string{"PREROUTING", "OUTPUT"} {
				if c := strings.Count(o.raw, "-A "+ch+" -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT"); c != 1 {
					problems = append(problems, ch+" has the entry jump "+strconv.Itoa(c)+" times")
				}
			}
			if c := strings.Count(o.raw, "-A POSTROUTING -m comment --comment \"CNI portfwd requiring masquerade\" -j CNI-HOSTPORT-MASQ"); c != 1 {
				problems = append(problems, "POSTROUTING has the masquerade jump "+strconv.Itoa(c)+" times")
			}
			if len(problems) > 0 {
				t.Errorf("the killed call's iptables-restore landed after the next call succeeded (the host-wide lock "+
					"is not held by the iptables-restore child):\n  %s\nnat table:\n%s", strings.Join(problems, "\n  "), o.raw)
			}
		})
	}
}
