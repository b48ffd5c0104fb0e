package config

import (
	"errors"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/portguard/portguard/pkg/hostport"
)

const prev = `"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"host0"},{"name":"eth0","sandbox":"/var/run/netns/p"}],
 "ips":[{"address":"10.1.0.9/24","interface":0},{"address":"10.88.0.5/16","interface":1},{"address":"fd00::5/64","interface":1}]}`

func parse(t *testing.T, body string) (*Config, error) {
	t.Helper()
	return Parse([]byte(`{"cniVersion":"1.0.0","name":"net1","type":"portguard",`+body+`}`), "eth0")
}

func TestDefaultsMatchUpstream(t *testing.T) {
	c, err := parse(t, `"runtimeConfig":{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"TCP"}]},`+prev)
	if err != nil {
		t.Fatal(err)
	}
	if !c.SNAT || c.MasqAll || c.MarkBit != 13 || c.Policy != PolicyTakeover || c.LockTimeout != DefaultLockTimeout {
		t.Fatalf("defaults: %+v", c)
	}
	if len(c.Mappings) != 1 || c.Mappings[0].Proto != "tcp" {
		t.Fatalf("protocol not normalised: %+v", c.Mappings)
	}
	if got := c.PodIPs[hostport.V4].String(); got != "10.88.0.5/16" {
		t.Fatalf("pod IPv4 %s: the host-side interface's address must be skipped", got)
	}
	if got := c.PodIPs[hostport.V6].String(); got != "fd00::5/64" {
		t.Fatalf("pod IPv6 %s", got)
	}
}

func TestBadInputNamesTheField(t *testing.T) {
	cases := map[string]string{
		`"runtimeConfig":{"portMappings":[{"hostPort":70000,"containerPort":80,"protocol":"tcp"}]}`:               "runtimeConfig.portMappings[0].hostPort",
		`"runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":0,"protocol":"tcp"}]}`:                   "runtimeConfig.portMappings[0].containerPort",
		`"runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80,"protocol":"icmp"}]}`:                 "runtimeConfig.portMappings[0].protocol",
		`"runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80,"protocol":"tcp","hostIP":"1.2.3"}]}`: "runtimeConfig.portMappings[0].hostIP",
		`"runtimeConfig":{"portMappings":[{"hostPort":"80","containerPort":80,"protocol":"tcp"}]}`:                "hostPort",
		`"markMasqBit":32`:                                         "markMasqBit",
		`"markMasqBit":3,"externalSetMarkChain":"X"`:               "markMasqBit",
		`"externalSetMarkChain":"A B"`:                             "externalSetMarkChain",
		`"backend":"nft"`:                                          "backend",
		`"backend":"nftables","markMasqBit":3`:                     "markMasqBit",
		`"backend":"nftables","externalSetMarkChain":"X"`:          "externalSetMarkChain",
		`"backend":"nftables","conflictPolicy":"allow"`:            "conflictPolicy",
		`"conditionsV4":["-d","1.2.3.4","-j","ACCEPT"]`:            "conditionsV4[2]",
		`"conditionsV4":["-m","comment","--comment","x\nCOMMIT"]`:  "conditionsV4[3]",
		`"conditionsV6":["ip6 saddr ::1"]`:                         "conditionsV6",
		`"conditionsV4":["-d","1.2.3.4","--ins","PREROUTING","1"]`: "conditionsV4[2]",
		`"conditionsV4":["-APREROUTING"]`:                          "conditionsV4[0]",
		`"conditionsV4":["--flush"]`:                               "conditionsV4[0]",
		`"conditionsV4":["-d","1.2.3.4","-t","filter"]`:            "conditionsV4[2]",
		`"conflictPolicy":"yolo"`:                                  "conflictPolicy",
		`"lockTimeout":0`:                                          "lockTimeout",
		`"logFile":"relative.log"`:                                 "logFile",
	}
	for body, field := range cases {
		_, err := parse(t, body)
		var ce *types.Error
		if !errors.As(err, &ce) {
			t.Errorf("%s: want a CNI error, got %v", body, err)
			continue
		}
		if ce.Code != types.ErrInvalidNetworkConfig || !strings.Contains(ce.Msg, field) {
			t.Errorf("%s: got code %d %q, want code %d naming %s", body, ce.Code, ce.Msg, types.ErrInvalidNetworkConfig, field)
		}
	}
}

func TestConditionsAcceptMatchesAndBoundTheirSize(t *testing.T) {
	c, err := parse(t, `"conditionsV4":["!","-d","192.0.2.10/32","-m","addrtype","--dst-type","LOCAL","--source","10.0.0.0/8"]`)
	if err != nil || len(c.Conditions[hostport.V4]) != 9 {
		t.Fatalf("ordinary match conditions refused: %v", err)
	}
	var many []string
	for i := 0; i < 45; i++ {
		many = append(many, `"-m","comment","--comment","`+strings.Repeat("x", 200)+`"`)
	}
	if _, err := parse(t, `"conditionsV4":[`+strings.Join(many, ",")+`]`); err == nil {
		t.Fatal("conditions long enough to split an iptables-restore line were accepted")
	}
}

func TestHostileNamesAndIDs(t *testing.T) {
	_, err := Parse([]byte(`{"cniVersion":"1.0.0","name":"net\" id: \"x","type":"portguard"}`), "eth0")
	var ce *types.Error
	if !errors.As(err, &ce) || !strings.Contains(ce.Msg, "name") {
		t.Fatalf("hostile network name: %v", err)
	}
	for _, id := range []string{"", "-x", "a b", "a\"b", "a\nb", "ab;rm", strings.Repeat("é", 3)} {
		err := ValidateContainerID(id)
		if !errors.As(err, &ce) || ce.Code != types.ErrInvalidEnvironmentVariables || !strings.Contains(ce.Msg, "CNI_CONTAINERID") {
			t.Errorf("container ID %q: %v", id, err)
		}
	}
	if err := ValidateContainerID("0123abc_.-Z"); err != nil {
		t.Fatal(err)
	}
	if _, err := Parse([]byte(`{"name":`), "eth0"); !errors.As(err, &ce) || ce.Code != types.ErrInvalidNetworkConfig {
		t.Fatalf("malformed JSON: %v", err)
	}
}

func TestDuplicateMappings(t *testing.T) {
	c, err := parse(t, `"runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80,"protocol":"tcp"},{"hostPort":80,"containerPort":80,"protocol":"tcp"}]}`)
	if err != nil || len(c.Mappings) != 1 {
		t.Fatalf("exact repeat: %v %+v", err, c)
	}
	if _, err := parse(t, `"runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80,"protocol":"tcp"},{"hostPort":80,"containerPort":81,"protocol":"tcp"}]}`); err == nil {
		t.Fatal("one host port mapped to two container ports was accepted")
	}
	c, err = parse(t, `"runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80,"protocol":"tcp","hostIP":"192.0.2.1"},{"hostPort":80,"containerPort":81,"protocol":"tcp","hostIP":"192.0.2.2"}]}`)
	if err != nil || len(c.Mappings) != 2 {
		t.Fatalf("same port on two host IPs: %v", err)
	}
}

func TestExplicitEmptyMappingsDifferFromAbsent(t *testing.T) {
	for _, body := range []string{`"runtimeConfig":{"portMappings":[]}`, `"runtimeConfig":{"portMappings":null}`} {
		if c, _ := parse(t, body); !c.Raw.PortMappingsSent {
			t.Fatalf("%s read as absent", body)
		}
	}
	for _, body := range []string{`"snat":false`, `"runtimeConfig":{"bandwidth":{}}`} {
		if c, _ := parse(t, body); c.Raw.PortMappingsSent {
			t.Fatalf("%s read as present", body)
		}
	}
}

func TestPodIPsFromMappedAndBrokenAddresses(t *testing.T) {
	c, err := Parse([]byte(`{"cniVersion":"1.0.0","name":"n","type":"portguard",
		"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"::ffff:10.88.0.6/120"}]}}`), "eth0")
	if err != nil {
		t.Fatal(err)
	}
	if got := c.PodIPs[hostport.V4].String(); got != "10.88.0.6/24" {
		t.Fatalf("IPv4-mapped pod address read as %q", got)
	}
	c, _ = Parse([]byte(`{"cniVersion":"1.0.0","name":"n","type":"portguard",
		"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"::ffff:10.88.0.6/64"}]}}`), "eth0")
	if len(c.PodIPs) != 0 {
		t.Fatalf("an impossible prefix produced a pod address: %v", c.PodIPs)
	}
}

func TestAddressListsExpandAsIptablesDoes(t *testing.T) {
	c, err := parse(t, `"conditionsV4":["--src","10.0.0.1,10.0.0.2/8","-m","comment","--comment","-d","--destination","192.0.2.1/32,127.0.0.1"],
		"conditionsV6":["!","--ds","fd00::1/128","-m","iprange","--dst-range","fd00::1-fd00::9"]`)
	if err != nil {
		t.Fatal(err)
	}
	got := ExpandConditions(c.Conditions[hostport.V4])
	var flat []string
	for _, g := range got {
		flat = append(flat, g[1]+" "+g[7])
	}
	want := "10.0.0.1 192.0.2.1/32|10.0.0.1 127.0.0.1|10.0.0.2/8 192.0.2.1/32|10.0.0.2/8 127.0.0.1"
	if strings.Join(flat, "|") != want {
		t.Fatalf("expansion %q, want %q (sources outer, as iptables adds them; the comment's -d is no option)", strings.Join(flat, "|"), want)
	}
	if got := ExpandConditions(c.Conditions[hostport.V6]); len(got) != 1 || strings.Join(got[0], " ") != strings.Join(c.Conditions[hostport.V6], " ") {
		t.Fatalf("conditions without a list must stay one rule as written: %q", got)
	}
	if got := ExpandConditions(nil); len(got) != 1 || len(got[0]) != 0 {
		t.Fatalf("no conditions must give one rule without conditions: %q", got)
	}
}

func TestAddressOptionsWhoseRulesCannotBeKnownAreRefused(t *testing.T) {
	cases := map[string]string{
		`"conditionsV4":["-d","localhost"]`:                              "conditionsV4[1]",
		`"conditionsV4":["-s","10.0.0.1,example.org"]`:                   "conditionsV4[1]",
		`"conditionsV4":["-m","comment","--comment","a","-d","fd00::1"]`: "conditionsV4[5]",
		`"conditionsV6":["-d","192.0.2.1"]`:                              "conditionsV6[1]",
		`"conditionsV4":["!","-d","10.0.0.1,10.0.0.2"]`:                  "conditionsV4[2]",
		`"conditionsV4":["-d","10.0.0.1,"]`:                              "conditionsV4[1]",
		`"conditionsV4":["-d","10.0.0.1","--dst","10.0.0.2"]`:            "conditionsV4[2]",
		`"conditionsV4":["-d10.0.0.1"]`:                                  "conditionsV4[0]",
		`"conditionsV4":["--destination=10.0.0.1,10.0.0.2"]`:             "conditionsV4[0]",
		`"conditionsV4":["--proto","udp"]`:                               "conditionsV4[0]",
		`"conditionsV6":["-d","fd00::1","-p","udp"]`:                     "conditionsV6[2]",
		`"conditionsV4":["-m","iprange","-s"]`:                           "conditionsV4[2]",
	}
	for body, field := range cases {
		_, err := parse(t, body)
		var ce *types.Error
		if !errors.As(err, &ce) || ce.Code != types.ErrInvalidNetworkConfig || !strings.Contains(ce.Msg, field) {
			t.Errorf("%s: got %v, want a CNI error naming %s", body, err, field)
		}
	}
}

// DEL drops conditions ADD would refuse (an earlier version accepted host names) instead
// of failing the teardown; nothing of them is kept.
func TestParseDelDropsRefusedConditions(t *testing.T) {
	in := []byte(`{"cniVersion":"1.0.0","name":"net","type":"portguard","conditionsV4":["-d","somehost.example"],"conditionsV6":["-d","fd00::1"]}`)
	if _, err := Parse(in, "eth0"); err == nil {
		t.Fatal("Parse accepted a host name in conditionsV4")
	}
	c, err := ParseDel(in, "eth0")
	if err != nil {
		t.Fatalf("ParseDel: %v", err)
	}
	if len(c.Conditions[hostport.V4]) != 0 || len(c.Conditions[hostport.V6]) != 2 {
		t.Errorf("conditions %v: want the refused IPv4 ones dropped, IPv6 kept", c.Conditions)
	}
}

// Without the backend key DefaultBackend picks it, and the nftables backend's refusals hold
// for a picked backend too; the key, when set, wins.
func TestDefaultBackendHook(t *testing.T) {
	old := DefaultBackend
	DefaultBackend = func() string { return BackendNFTables }
	t.Cleanup(func() { DefaultBackend = old })
	if c, err := parse(t, `"snat":true`); err != nil || c.Backend != BackendNFTables {
		t.Fatalf("backend unset, nftables picked: %v, %v", c, err)
	}
	if _, err := parse(t, `"markMasqBit":3`); err == nil || !strings.Contains(err.Error(), "markMasqBit") {
		t.Errorf("markMasqBit with nftables picked: %v, want refused naming the field", err)
	}
	if c, err := parse(t, `"backend":"iptables","markMasqBit":3`); err != nil || c.Backend != BackendIPTables {
		t.Errorf("backend iptables set: %v, %v", c, err)
	}
}

func TestNFTablesBackendSelected(t *testing.T) {
	c, err := parse(t, `"backend":"nftables"`)
	if err != nil || c.Backend != BackendNFTables {
		t.Fatalf("backend nftables: %v, %v", c, err)
	}
	if c, err := parse(t, `"backend":"iptables","markMasqBit":3`); err != nil || c.Backend != BackendIPTables || c.MarkBit != 3 {
		t.Fatalf("backend iptables with markMasqBit: %v, %v", c, err)
	}
}

// With the nftables backend, conditions are nft matches parsed by pkg/nftcond into
// NFTConditions, upstream's list-of-fragments form included; iptables Conditions stay empty.
func TestNFTablesConditionsParsedIntoExpressions(t *testing.T) {
	c, err := parse(t, `"backend":"nftables","conditionsV4":["ip","saddr","{ 192.0.2.1, 10.0.0.0/8 }","iifname eth0"],"conditionsV6":["ip6 daddr != fd00::/8"]`)
	if err != nil {
		t.Fatal(err)
	}
	if c.Backend != BackendNFTables || len(c.Conditions) != 0 {
		t.Fatalf("backend %q, iptables conditions %v", c.Backend, c.Conditions)
	}
	if got := c.NFTConditions[hostport.V4].String(); got != `ip saddr { 10.0.0.0/8, 192.0.2.1 } iifname "eth0"` {
		t.Errorf("conditionsV4: %q", got)
	}
	if got := c.NFTConditions[hostport.V6].String(); got != "ip6 daddr != fd00::/8" {
		t.Errorf("conditionsV6: %q", got)
	}
	// Upstream's own test config (portmap_test.go, "allows nftables conditions").
	c, err = parse(t, `"backend":"nftables","conditionsV4":["ip","saddr","1.2.3.4"],"conditionsV6":["ip6","saddr","12::34"]`)
	if err != nil || c.NFTConditions[hostport.V4].String() != "ip saddr 1.2.3.4" || c.NFTConditions[hostport.V6].String() != "ip6 saddr 12::34" {
		t.Errorf("upstream's example: %v, %v", c, err)
	}
	for _, body := range []string{`"backend":"nftables"`, `"backend":"nftables","conditionsV4":[""]`, `"backend":"nftables","conditionsV6":[]`} {
		c, err := parse(t, body)
		if err != nil || len(c.NFTConditions) != 0 {
			t.Errorf("%s: %v, %v: want no conditions", body, c.NFTConditions, err)
		}
	}
	// The iptables backend (explicit or by default) still reads iptables arguments.
	for _, body := range []string{`"conditionsV4":["-s","192.0.2.1"]`, `"backend":"iptables","conditionsV4":["-s","192.0.2.1"]`} {
		c, err := parse(t, body)
		if err != nil || c.Backend != BackendIPTables || len(c.Conditions[hostport.V4]) != 2 || len(c.NFTConditions) != 0 {
			t.Errorf("%s: %+v, %v", body, c, err)
		}
	}
}

func TestNFTablesConditionsRefusalsNameTheItem(t *testing.T) {
	for body, want := range map[string]string{
		`"conditionsV4":["ip saddr 192.0.2.1","accept"]`:           "conditionsV4[1]: \"accept\" is an nft statement",
		`"conditionsV4":["ip saddr 192.0.2.1\nadd table ip x"]`:    "conditionsV4[0]: byte 0x0a",
		`"conditionsV4":["ip saddr 192.0.2.1;","add table ip x"]`:  "conditionsV4[0]: ';' ends an nft statement",
		`"conditionsV4":["ip6 saddr ::1"]`:                         "conditionsV4[0]: an ip6 match among IPv4 conditions",
		`"conditionsV6":["iifname eth0","ip saddr 192.0.2.1"]`:     "conditionsV6[1]: an ip match among IPv6 conditions",
		`"conditionsV4":["-s","192.0.2.1"]`:                        "conditionsV4: \"-s\" looks like an iptables argument",
		`"conditionsV4":["tcp dport 80"]`:                          "conditionsV4[0]: \"tcp\" is not a match (accepted: ",
		`"conditionsV6":["ip6 saddr { fd00::1 ","jump x }"]`:       "conditionsV6[1]: \"jump\" is an nft statement",
		`"conditionsV4":["iifname","{ \"a\" }"]`:                   "conditionsV4[1]: iifname: sets of names are not accepted",
		`"conditionsV4":["meta mark & 0xff == 0x100"]`:             "conditionsV4[0]: meta mark & 0x000000ff cannot equal 0x00000100",
		`"conditionsV4":["ip saddr 192.0.2.1","ip daddr nothost"]`: "conditionsV4[1]: ip daddr \"nothost\": not an IPv4 address",
	} {
		_, err := parse(t, `"backend":"nftables",`+body)
		var ce *types.Error
		if !errors.As(err, &ce) {
			t.Errorf("%s: want a CNI error, got %v", body, err)
			continue
		}
		if ce.Code != types.ErrInvalidNetworkConfig || !strings.HasPrefix(ce.Msg, want) {
			t.Errorf("%s: got code %d %q, want code %d starting %q", body, ce.Code, ce.Msg, types.ErrInvalidNetworkConfig, want)
		}
	}
}

// DEL under the nftables backend drops conditions ADD refuses, as under iptables.
func TestNFTablesParseDelDropsRefusedConditions(t *testing.T) {
	in := []byte(`{"cniVersion":"1.0.0","name":"net","type":"portguard","backend":"nftables","conditionsV4":["ip saddr somehost"],"conditionsV6":["ip6 saddr fd00::1"]}`)
	if _, err := Parse(in, "eth0"); err == nil {
		t.Fatal("Parse accepted a host name in conditionsV4")
	}
	c, err := ParseDel(in, "eth0")
	if err != nil {
		t.Fatalf("ParseDel: %v", err)
	}
	if _, ok := c.NFTConditions[hostport.V4]; ok || c.NFTConditions[hostport.V6].String() != "ip6 saddr fd00::1" {
		t.Errorf("conditions %v: want the refused IPv4 ones dropped, IPv6 kept", c.NFTConditions)
	}
}
