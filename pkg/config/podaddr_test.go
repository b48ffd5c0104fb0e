package config

import (
	"errors"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/portguard/portguard/pkg/hostport"
)

// podConf is a config with one mapping (both families) and prevResult's ips; ips[0] is the
// host side's address, so the pod's addresses start at ips[1].
func podConf(mappings, ips string) []byte {
	return []byte(`{"cniVersion":"1.0.0","name":"n","type":"portguard","runtimeConfig":{"portMappings":[` + mappings + `]},
	"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"veth0"},{"name":"eth0","sandbox":"/var/run/netns/p"}],
	"ips":[{"address":"10.88.0.1/16","interface":0}` + ips + `]}}`)
}

const tcp8080 = `{"hostPort":8080,"containerPort":80,"protocol":"tcp"}`

func TestPodAddressesRefused(t *testing.T) {
	cases := []struct{ ips, field, why string }{
		{`,{"address":"0.0.0.0/0","interface":1}`, "prevResult.ips[1]", "unspecified"},
		{`,{"address":"::/0","interface":1}`, "prevResult.ips[1]", "unspecified"},
		{`,{"address":"127.0.0.5/8","interface":1}`, "prevResult.ips[1]", "loopback"},
		{`,{"address":"::1/128","interface":1}`, "prevResult.ips[1]", "loopback"},
		{`,{"address":"224.0.0.5/24","interface":1}`, "prevResult.ips[1]", "link-local multicast"},
		{`,{"address":"239.1.2.3/8","interface":1}`, "prevResult.ips[1]", "a multicast"},
		{`,{"address":"ff02::1/64","interface":1}`, "prevResult.ips[1]", "link-local multicast"},
		{`,{"address":"ff05::2/64","interface":1}`, "prevResult.ips[1]", "a multicast"},
		{`,{"address":"255.255.255.255/32","interface":1}`, "prevResult.ips[1]", "limited broadcast"},
		{`,{"address":"10.88.255.255/16","interface":1}`, "prevResult.ips[1]", "broadcast address of 10.88.0.0/16"},
		{`,{"address":"192.168.7.127/25","interface":1}`, "prevResult.ips[1]", "broadcast address of 192.168.7.0/25"},
		{`,{"address":"10.9.9.9/0","interface":1},{"address":"255.255.255.255/0"}`, "", ""},
		{`,{"address":"fe80::5/64","interface":1}`, "prevResult.ips[1]", "IPv6 link-local"},
		{`,{"address":"::ffff:10.88.0.6/64","interface":1}`, "prevResult.ips[1]", "impossible prefix"},
		// The v4 address is fine; the v6 one (ips[2]) is not.
		{`,{"address":"10.88.0.5/16","interface":1},{"address":"::/0","interface":1}`, "prevResult.ips[2]", "unspecified"},
		// An address without an interface index counts as the pod's.
		{`,{"address":"0.0.0.0/0"}`, "prevResult.ips[1]", "unspecified"},
	}
	for _, tc := range cases {
		c, err := Parse(podConf(tcp8080, tc.ips), "eth0")
		if tc.field == "" {
			if err != nil {
				t.Errorf("%s: %v", tc.ips, err)
			}
			continue
		}
		var ce *types.Error
		if !errors.As(err, &ce) || ce.Code != types.ErrInvalidNetworkConfig {
			t.Errorf("%s: want a CNI error code %d, got %v (config %+v)", tc.ips, types.ErrInvalidNetworkConfig, err, c)
			continue
		}
		if !strings.HasPrefix(ce.Msg, tc.field+": ") || !strings.Contains(ce.Msg, tc.why) {
			t.Errorf("%s: message %q does not name %s and say %q", tc.ips, ce.Msg, tc.field, tc.why)
		}
	}
}

func TestPodAddressesAccepted(t *testing.T) {
	cases := []struct{ mappings, ips, v4, v6 string }{
		// Not a subnet broadcast address: /23 ends at .1.255; /31 and /32 have none.
		{tcp8080, `,{"address":"10.88.0.255/23","interface":1}`, "10.88.0.255/23", ""},
		{tcp8080, `,{"address":"10.0.0.1/31","interface":1}`, "10.0.0.1/31", ""},
		{tcp8080, `,{"address":"10.0.0.7/32","interface":1}`, "10.0.0.7/32", ""},
		// IPv4 link-local is forwarded like any address (see podAddrProblem).
		{tcp8080, `,{"address":"169.254.172.5/22","interface":1}`, "169.254.172.5/22", ""},
		// Only the address a mapping is forwarded to is checked: the second of a family is
		// not used, and no mapping applies to IPv6 here.
		{tcp8080, `,{"address":"10.88.0.5/16","interface":1},{"address":"0.0.0.0/0","interface":1}`, "10.88.0.5/16", ""},
		{`{"hostPort":8080,"containerPort":80,"protocol":"tcp","hostIP":"192.0.2.1"}`,
			`,{"address":"10.88.0.5/16","interface":1},{"address":"fe80::5/64","interface":1}`, "10.88.0.5/16", "fe80::5/64"},
		// Without mappings nothing is forwarded: prevResult passes through untouched.
		{``, `,{"address":"0.0.0.0/0","interface":1}`, "0.0.0.0/0", ""},
	}
	for _, tc := range cases {
		c, err := Parse(podConf(tc.mappings, tc.ips), "eth0")
		if err != nil {
			t.Errorf("%s %s: %v", tc.mappings, tc.ips, err)
			continue
		}
		v4, v6 := c.PodIPs[hostport.V4], c.PodIPs[hostport.V6]
		if (tc.v4 != "" || v4.IsValid()) && v4.String() != tc.v4 || (tc.v6 != "" || v6.IsValid()) && v6.String() != tc.v6 {
			t.Errorf("%s: pod addresses %v, want %s %s", tc.ips, c.PodIPs, tc.v4, tc.v6)
		}
	}
}

// DEL reads what ADD refuses: the rules an earlier ADD (upstream portmap, or a portguard
// before the check) installed for such an address must still be removable.
func TestParseDelKeepsRefusedPodAddresses(t *testing.T) {
	stdin := podConf(tcp8080, `,{"address":"0.0.0.0/0","interface":1},{"address":"fe80::5/64","interface":1}`)
	if _, err := Parse(stdin, "eth0"); err == nil {
		t.Fatal("Parse accepted 0.0.0.0/0")
	}
	c, err := ParseDel(stdin, "eth0")
	if err != nil {
		t.Fatal(err)
	}
	if c.PodIPs[hostport.V4].String() != "0.0.0.0/0" || c.PodIPs[hostport.V6].String() != "fe80::5/64" {
		t.Fatalf("ParseDel pod addresses %v", c.PodIPs)
	}
}
