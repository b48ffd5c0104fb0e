package main

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/testutils"

	iptbackend "github.com/portguard/portguard/pkg/backend/iptables"
	"github.com/portguard/portguard/pkg/config"
	"github.com/portguard/portguard/pkg/engine"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables/iptablestest"
	"github.com/portguard/portguard/pkg/plan"
	"github.com/portguard/portguard/pkg/state"
)

// The verbs run in-process (containernetworking's testutils) against iptablestest's fake
// nat table, injected through newEngine. VERSION runs the real main in a child process.

func TestMain(m *testing.M) {
	if os.Getenv("PORTGUARD_TEST_RUN_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// withFake makes every engine the plugin creates run against a fresh fake, and keeps the
// plugin's records and cache reads in temporary directories.
func withFake(t *testing.T) *iptablestest.Kernel {
	t.Helper()
	k, err := iptablestest.New(nil)
	if err != nil {
		t.Fatal(err)
	}
	lockPath := filepath.Join(t.TempDir(), "lock")
	saved := newEngine
	newEngine = func(timeout time.Duration) *engine.Engine {
		return &engine.Engine{Backend: &iptbackend.Backend{Runner: k}, LockPath: lockPath, LockTimeout: timeout}
	}
	t.Cleanup(func() { newEngine = saved })
	t.Setenv("PORTGUARD_STATE_DIR", t.TempDir())
	t.Setenv("PORTGUARD_CNI_CACHE_DIR", t.TempDir())
	return k
}

// netconf is a configuration with prevResult putting ip on eth0. snat is off so that ADD
// does not set route_localnet on the test host's interfaces; mappings are tcp, so no
// conntrack flush runs either.
func netconf(mappings, ip string) []byte {
	s := `{"cniVersion":"1.0.0","name":"pnet","type":"portguard","snat":false`
	if mappings != "-" {
		s += `,"runtimeConfig":{"portMappings":[` + mappings + `]}`
	}
	if ip != "" {
		s += `,"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/x"}],
			"ips":[{"address":"` + ip + `","interface":0}]}`
	}
	return []byte(s + "}")
}

func cmdArgs(id string, stdin []byte) *skel.CmdArgs {
	return &skel.CmdArgs{ContainerID: id, Netns: "/var/run/netns/x", IfName: "eth0", StdinData: stdin}
}

const tcp8080 = `{"hostPort":8080,"containerPort":80,"protocol":"tcp"}`

// Bad input is a CNI error with the right code naming the field, and no iptables call.
func TestBadInputRunsNothing(t *testing.T) {
	cases := []struct {
		name, verb, id string
		stdin          []byte
		code           uint
		field          string
	}{
		{"container ID", "ADD", "-bad/id", netconf(tcp8080, "10.88.0.5/16"), types.ErrInvalidEnvironmentVariables, "CNI_CONTAINERID"},
		{"container ID on DEL", "DEL", "", netconf(tcp8080, "10.88.0.5/16"), types.ErrInvalidEnvironmentVariables, "CNI_CONTAINERID"},
		{"container ID on CHECK", "CHECK", "a b", netconf(tcp8080, "10.88.0.5/16"), types.ErrInvalidEnvironmentVariables, "CNI_CONTAINERID"},
		{"host port", "ADD", "c1", netconf(`{"hostPort":0,"containerPort":80,"protocol":"tcp"}`, "10.88.0.5/16"), types.ErrInvalidNetworkConfig, "runtimeConfig.portMappings[0].hostPort"},
		{"host port on DEL", "DEL", "c1", netconf(`{"hostPort":8080,"containerPort":80,"protocol":"gre"}`, "10.88.0.5/16"), types.ErrInvalidNetworkConfig, "runtimeConfig.portMappings[0].protocol"},
		{"malformed JSON", "ADD", "c1", []byte(`{"cniVersion":"1.0.0",`), types.ErrInvalidNetworkConfig, "(config)"},
		{"conflict policy", "CHECK", "c1", []byte(`{"cniVersion":"1.0.0","name":"pnet","type":"portguard","conflictPolicy":"maybe"}`), types.ErrInvalidNetworkConfig, "conflictPolicy"},
		{"no prevResult", "ADD", "c1", netconf(tcp8080, ""), types.ErrInvalidNetworkConfig, "prevResult: missing"},
		{"no prevResult on CHECK", "CHECK", "c1", netconf(tcp8080, ""), types.ErrInvalidNetworkConfig, "prevResult: missing"},
		{"unspecified pod address", "ADD", "c1", netconf(tcp8080, "0.0.0.0/0"), types.ErrInvalidNetworkConfig, "prevResult.ips[0]"},
		{"broadcast pod address on CHECK", "CHECK", "c1", netconf(tcp8080, "10.88.255.255/16"), types.ErrInvalidNetworkConfig, "prevResult.ips[0]"},
		{"no pod address on eth0", "ADD", "c1", []byte(`{"cniVersion":"1.0.0","name":"pnet","type":"portguard","runtimeConfig":{"portMappings":[` + tcp8080 + `]},
			"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth1","sandbox":"/x"}],"ips":[{"address":"10.88.0.5/16","interface":0}]}}`), types.ErrInvalidNetworkConfig, `prevResult: no IP address on the sandbox interface "eth0"`},
	}
	for _, tc := range cases {
		k := withFake(t)
		args := cmdArgs(tc.id, tc.stdin)
		var err error
		switch tc.verb {
		case "ADD":
			_, _, err = testutils.CmdAddWithArgs(args, func() error { return cmdAdd(args) })
		case "DEL":
			err = testutils.CmdDelWithArgs(args, func() error { return cmdDel(args) })
		case "CHECK":
			err = testutils.CmdCheckWithArgs(args, func() error { return cmdCheck(args) })
		}
		var ce *types.Error
		if !errors.As(err, &ce) || ce.Code != tc.code || !strings.HasPrefix(ce.Msg, tc.field) {
			t.Errorf("%s (%s): got %v, want code %d naming %s", tc.name, tc.verb, err, tc.code, tc.field)
		}
		if calls := k.Calls(); len(calls) > 0 {
			t.Errorf("%s (%s): bad input reached iptables: %v", tc.name, tc.verb, calls)
		}
	}
}

// A pod without host ports costs nothing: ADD prints prevResult unchanged and CHECK passes,
// without an iptables call; so does DEL when the runtime says there are no mappings.
func TestNoMappingsPassesPrevResultThrough(t *testing.T) {
	k := withFake(t)
	stdin := netconf("", "10.88.0.5/16")
	args := cmdArgs("c1", stdin)
	res, out, err := testutils.CmdAddWithArgs(args, func() error { return cmdAdd(args) })
	if err != nil {
		t.Fatal(err)
	}
	r, err := current.NewResultFromResult(res)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.IPs) != 1 || r.IPs[0].Address.String() != "10.88.0.5/16" || len(r.Interfaces) != 1 || r.Interfaces[0].Sandbox != "/var/run/netns/x" {
		t.Fatalf("ADD printed %s", out)
	}
	if err := testutils.CmdCheckWithArgs(args, func() error { return cmdCheck(args) }); err != nil {
		t.Fatal(err)
	}
	if err := testutils.CmdDelWithArgs(args, func() error { return cmdDel(args) }); err != nil {
		t.Fatal(err)
	}
	if calls := k.Calls(); len(calls) > 0 {
		t.Fatalf("a pod without host ports reached iptables: %v", calls)
	}
	// Without the portMappings key at all, DEL looks (the ADD may have had mappings).
	args = cmdArgs("c1", netconf("-", "10.88.0.5/16"))
	if err := testutils.CmdDelWithArgs(args, func() error { return cmdDel(args) }); err != nil {
		t.Fatal(err)
	}
	if calls := k.Calls(); len(calls) == 0 {
		t.Fatal("DEL without portMappings did not look for the attachment's rules")
	}
}

// ADD installs through the engine and prints prevResult; CHECK passes; a second pod takes
// the port over; DEL of both leaves no claim.
func TestAddCheckDel(t *testing.T) {
	k := withFake(t)
	a1 := cmdArgs("c1", netconf(tcp8080, "10.88.0.5/16"))
	res, _, err := testutils.CmdAddWithArgs(a1, func() error { return cmdAdd(a1) })
	if err != nil {
		t.Fatal(err)
	}
	if r, _ := current.NewResultFromResult(res); r == nil || r.IPs[0].Address.String() != "10.88.0.5/16" {
		t.Fatalf("ADD printed %v", res)
	}
	if err := testutils.CmdCheckWithArgs(a1, func() error { return cmdCheck(a1) }); err != nil {
		t.Fatalf("CHECK after ADD: %v", err)
	}
	owners := func() []string {
		s, err := state.ObserveAll(k, hostport.V4)
		if err != nil {
			t.Fatal(err)
		}
		fa := plan.Audit(s)
		if !fa.Healthy() {
			t.Fatalf("audit %+v\n%s", fa.Problems, k.Dump(hostport.V4))
		}
		var ids []string
		for _, p := range fa.Ports {
			for _, c := range p.Claims {
				ids = append(ids, c.ContainerID)
			}
		}
		return ids
	}
	if got := owners(); !slices.Equal(got, []string{"c1"}) {
		t.Fatalf("claims %v", got)
	}
	a2 := cmdArgs("c2", netconf(tcp8080, "10.88.0.6/16"))
	if _, _, err := testutils.CmdAddWithArgs(a2, func() error { return cmdAdd(a2) }); err != nil {
		t.Fatal(err)
	}
	if got := owners(); !slices.Equal(got, []string{"c2"}) {
		t.Fatalf("claims after the takeover %v", got)
	}
	if err := testutils.CmdCheckWithArgs(a1, func() error { return cmdCheck(a1) }); err == nil {
		t.Fatal("CHECK of the pod whose port was taken over passed")
	}
	for _, a := range []*skel.CmdArgs{a1, a2, a2} {
		if err := testutils.CmdDelWithArgs(a, func() error { return cmdDel(a) }); err != nil {
			t.Fatalf("DEL %s: %v", a.ContainerID, err)
		}
	}
	if got := owners(); len(got) != 0 {
		t.Fatalf("claims after DEL %v", got)
	}
}

// STATUS reports iptables usable, and ErrPluginNotAvailable (50) when neither family is.
func TestStatus(t *testing.T) {
	k := withFake(t)
	args := cmdArgs("", []byte(`{"cniVersion":"1.1.0","name":"pnet","type":"portguard"}`))
	if err := testutils.CmdStatus(func() error { return cmdStatus(args) }); err != nil {
		t.Fatal(err)
	}
	k.Unusable = map[hostport.Family]bool{hostport.V4: true, hostport.V6: true}
	var ce *types.Error
	if err := testutils.CmdStatus(func() error { return cmdStatus(args) }); !errors.As(err, &ce) || ce.Code != types.ErrPluginNotAvailable {
		t.Fatalf("STATUS without iptables: %v", err)
	}
}

// VERSION is answered by the real main (skel), with every version the plugin speaks.
func TestVersion(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "PORTGUARD_TEST_RUN_MAIN=1", "CNI_COMMAND=VERSION")
	cmd.Stdin = strings.NewReader(`{"cniVersion":"1.0.0"}`)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("VERSION: %v %s", err, out)
	}
	var v struct {
		CNIVersion        string   `json:"cniVersion"`
		SupportedVersions []string `json:"supportedVersions"`
	}
	if err := json.Unmarshal(out, &v); err != nil {
		t.Fatalf("VERSION printed %q: %v", out, err)
	}
	want := []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}
	if !slices.Equal(v.SupportedVersions, want) || v.CNIVersion == "" {
		t.Fatalf("VERSION printed %s", out)
	}
	// An ADD without the CNI_* variables is refused by skel with code 4, before cmdAdd
	// (and with it the real iptables) runs.
	cmd = exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "PORTGUARD_TEST_RUN_MAIN=1", "CNI_COMMAND=ADD", "CNI_CONTAINERID=", "CNI_NETNS=", "CNI_IFNAME=", "CNI_PATH=")
	cmd.Stdin = strings.NewReader(string(netconf(tcp8080, "10.88.0.5/16")))
	out, err = cmd.Output()
	var e types.Error
	if err == nil || json.Unmarshal(out, &e) != nil || e.Code != types.ErrInvalidEnvironmentVariables || !strings.Contains(e.Msg, "CNI_CONTAINERID") {
		t.Fatalf("ADD without CNI_CONTAINERID: %v, printed %s", err, out)
	}
}

// DEL takes the pod address ADD refuses: an ADD by upstream portmap (or an earlier
// portguard) installed rules for it, and DEL must remove them rather than fail forever.
func TestDelRemovesWhatAnOlderAddInstalledForARefusedAddress(t *testing.T) {
	k := withFake(t)
	stdin := netconf(tcp8080, "0.0.0.0/0")
	args := cmdArgs("old", stdin)
	if _, _, err := testutils.CmdAddWithArgs(args, func() error { return cmdAdd(args) }); err == nil {
		t.Fatal("ADD accepted 0.0.0.0/0")
	}
	// What that ADD would have installed before the check existed.
	old, err := config.ParseDel(stdin, "eth0")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := newEngine(time.Second).Add(old, hostport.Owner{Network: "pnet", ContainerID: "old"}); err != nil {
		t.Fatal(err)
	}
	chain := hostport.ChainName(hostport.Owner{Network: "pnet", ContainerID: "old"})
	if !k.Has(hostport.V4, chain) {
		t.Fatal("setup: no chain")
	}
	if err := testutils.CmdDelWithArgs(args, func() error { return cmdDel(args) }); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	if k.Has(hostport.V4, chain) || len(k.Rules(hostport.V4, state.DNATChain)) != 0 {
		t.Fatalf("DEL left rules:\n%s", k.Dump(hostport.V4))
	}
}

// GC removes the network's attachments missing from cni.dev/valid-attachments and keeps
// the valid ones.
func TestGC(t *testing.T) {
	k := withFake(t)
	for _, a := range []*skel.CmdArgs{cmdArgs("keep", netconf(tcp8080, "10.88.0.5/16")),
		cmdArgs("gone", netconf(`{"hostPort":9090,"containerPort":90,"protocol":"tcp"}`, "10.88.0.6/16"))} {
		if _, _, err := testutils.CmdAddWithArgs(a, func() error { return cmdAdd(a) }); err != nil {
			t.Fatal(err)
		}
	}
	args := cmdArgs("", []byte(`{"cniVersion":"1.1.0","name":"pnet","type":"portguard",
		"cni.dev/valid-attachments":[{"containerID":"keep","ifname":"eth0"}]}`))
	if err := cmdGC(args); err != nil {
		t.Fatal(err)
	}
	if k.Has(hostport.V4, hostport.ChainName(hostport.Owner{Network: "pnet", ContainerID: "gone"})) ||
		!k.Has(hostport.V4, hostport.ChainName(hostport.Owner{Network: "pnet", ContainerID: "keep"})) {
		t.Fatalf("after GC:\n%s", k.Dump(hostport.V4))
	}
}
