package e2e

import (
	"encoding/json"
	"fmt"
	"net"
	"regexp"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	tb "github.com/portguard/portguard/test/testbed"
)

// TestInvalidPodAddressRefused: an ADD whose prevResult gives the pod an address no host
// port can be forwarded to (unspecified, loopback, multicast, broadcast, IPv6 link-local,
// an impossible prefix) fails with CNI error 7 naming prevResult.ips[0], and changes
// nothing in either nat table: a pod already published keeps answering. DEL of such a
// call succeeds and changes nothing either.
func TestInvalidPodAddressRefused(t *testing.T) {
	t.Parallel()
	b, n := pgBed(t)
	a := b.NewPod("A")
	n.MustAdd(a, tb.TCP(8080, 80))
	a.Serve(80)
	z := b.NewPod("Z")

	bcast := make(net.IP, 4)
	for i, o := range n.Subnet4.IP.To4() {
		bcast[i] = o | ^n.Subnet4.Mask[i]
	}
	ones, _ := n.Subnet4.Mask.Size()
	bad := []string{"0.0.0.0/0", "127.0.0.5/8", "224.0.0.5/24", "239.1.2.3/8", "255.255.255.255/32",
		fmt.Sprintf("%s/%d", bcast, ones), "::/0", "::1/128", "ff02::1/64", "fe80::5/64", "::ffff:198.19.0.9/64"}

	before := map[tb.Family]string{}
	for _, f := range families {
		before[f] = saveWithoutCounters(b.MustSaveNAT(f))
	}
	for i, addr := range bad {
		id := fmt.Sprintf("badaddr%d", i)
		conf, err := json.Marshal(map[string]any{
			"cniVersion": "1.0.0", "name": n.Name, "type": "portguard",
			"runtimeConfig": map[string]any{"portMappings": []map[string]any{{"hostPort": 9090, "containerPort": 80, "protocol": "tcp"}}},
			"prevResult": map[string]any{"cniVersion": "1.0.0",
				"interfaces": []map[string]any{{"name": "eth0", "sandbox": z.Path}},
				"ips":        []map[string]any{{"address": addr, "interface": 0}}},
		})
		if err != nil {
			t.Fatal(err)
		}
		env := []string{"CNI_CONTAINERID=" + id, "CNI_NETNS=" + z.Path, "CNI_IFNAME=eth0"}
		res, err := b.PluginCall("portguard", "ADD", conf, env...)
		var ce types.Error
		if err == nil || json.Unmarshal([]byte(res.Stdout), &ce) != nil || ce.Code != types.ErrInvalidNetworkConfig || !strings.HasPrefix(ce.Msg, "prevResult.ips[0]: ") {
			t.Errorf("ADD with pod address %s: %v, printed %s", addr, err, res.Stdout)
		}
		unchanged := func(verb string) {
			for _, f := range families {
				if after := saveWithoutCounters(b.MustSaveNAT(f)); after != before[f] {
					t.Errorf("%s: %s with pod address %s changed the nat table:\nbefore:\n%s\nafter:\n%s", f, verb, addr, before[f], after)
				}
			}
		}
		unchanged("ADD")
		if _, err := b.PluginCall("portguard", "DEL", conf, env...); err != nil {
			t.Errorf("DEL after the refused ADD with %s: %v", addr, err)
		}
		unchanged("DEL")
	}
	for _, f := range families {
		expectAnswer(t, "tcp", b.Client, b.NodeIP(f).String(), 8080, "A")
	}
}

var saveNoise = regexp.MustCompile(`(?m)^#.*\n|\[\d+:\d+\]`)

// saveWithoutCounters drops iptables-save's comment lines (timestamps) and chain counters.
func saveWithoutCounters(s string) string { return saveNoise.ReplaceAllString(s, "") }
