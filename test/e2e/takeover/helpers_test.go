// Package takeover holds portguard's end-to-end tests for issue 3 ("never a duplicate"):
// takeover of stale claims on ADD, the conflict policies, CHECK against shadowing, GC and
// STATUS, with real packets sent from a client namespace to node-IP:hostPort and the answer
// naming the pod that got them.
//
// Every test builds its own test bed (test/testbed): a node namespace, a client namespace,
// pods wired by bridge + host-local through cnitool, and socat responders answering with the
// pod's name. Nothing here touches the host's own tables.
package takeover

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/portguard/portguard/test/testbed"
)

var families = []testbed.Family{testbed.V4, testbed.V6}

// newBed starts a parallel test on its own test bed.
func newBed(t *testing.T) *testbed.Bed {
	t.Helper()
	t.Parallel()
	return testbed.New(t)
}

// pgNet is a bridge + host-local + portguard network whose event log (logFile) goes to a
// file in the bed; extra portguard keys come from conf.
func pgNet(b *testbed.Bed, c testbed.NetConfig, conf map[string]any) (*testbed.Network, string) {
	b.T.Helper()
	logFile := filepath.Join(b.Dir, "portguard.log") // shared by the bed's networks
	pc := map[string]any{"logFile": logFile}
	for k, v := range conf {
		pc[k] = v
	}
	c.PortPlugin = "portguard"
	c.PortConf = pc
	return b.Network(c), logFile
}

// answer dials proto addr:port from the client namespace and returns the pod name that
// answered (or the error).
func answer(b *testbed.Bed, proto string, addr net.IP, port int) (string, error) {
	return testbed.Dial(proto, b.Client, addr.String(), port)
}

// wantAnswer fails the test unless the pod named want answers proto addr:port. Only "no
// answer at all" is retried (up to 3 connections, each a new flow): on a loaded machine
// a UDP answer can miss the testbed's read deadline. A wrong answer fails at once.
func wantAnswer(t *testing.T, b *testbed.Bed, proto string, addr net.IP, port int, want string) {
	t.Helper()
	var got string
	var err error
	for i := 0; i < 3; i++ {
		got, err = answer(b, proto, addr, port)
		if err == nil {
			break
		}
	}
	if err != nil || got != want {
		t.Errorf("%s %s:%d from the client: answer %q, err %v; want %q", proto, addr, port, got, err, want)
	}
}

// wantNoAnswerFrom fails the test when the pod named notWant answers proto addr:port.
func wantNoAnswerFrom(t *testing.T, b *testbed.Bed, proto string, addr net.IP, port int, notWant string) {
	t.Helper()
	got, err := answer(b, proto, addr, port)
	if err == nil && got == notWant {
		t.Errorf("%s %s:%d from the client: %q answered, it must not", proto, addr, port, got)
	}
}

// wantChains fails the test unless the node's CNI-DN-* chains of family f are exactly want.
func wantChains(t *testing.T, b *testbed.Bed, f testbed.Family, want ...string) {
	t.Helper()
	got := b.DNChains(f)
	w := append([]string(nil), want...)
	sort.Strings(w)
	if strings.Join(got, " ") != strings.Join(w, " ") {
		t.Errorf("%s CNI-DN chains = %v, want %v", f, got, w)
	}
}

// jumps returns the rules of CNI-HOSTPORT-DNAT that jump to chain.
func jumps(b *testbed.Bed, f testbed.Family, chain string) []string {
	b.T.Helper()
	return b.NAT(f).JumpsTo("CNI-HOSTPORT-DNAT", chain)
}

// wantOnlyJumps fails the test unless CNI-HOSTPORT-DNAT of f holds exactly the given number
// of jump rules to each listed chain and nothing else.
func wantOnlyJumps(t *testing.T, b *testbed.Bed, f testbed.Family, want map[string]int) {
	t.Helper()
	rules := b.HostportJumps(f)
	got := map[string]int{}
	for _, r := range rules {
		got[target(r)]++
	}
	ok := len(got) == len(want)
	for c, n := range want {
		if got[c] != n {
			ok = false
		}
	}
	if !ok {
		t.Errorf("%s CNI-HOSTPORT-DNAT:\n%s\nwant jumps per chain %v", f, strings.Join(rules, "\n"), want)
	}
}

var targetRe = regexp.MustCompile(`\s-[jg]\s+(\S+)`)

func target(rule string) string {
	m := targetRe.FindAllStringSubmatch(rule, -1)
	if len(m) == 0 {
		return ""
	}
	return m[len(m)-1][1]
}

// event is one JSON line portguard writes on stderr and to logFile.
type event struct {
	Event    string `json:"event"`
	Takeover *struct {
		Family string `json:"family"`
		From   owner  `json:"from"`
		Chain  string `json:"chain"`
		Claims []struct {
			Protocol string `json:"protocol"`
			HostIP   string `json:"hostIP"`
			HostPort int    `json:"hostPort"`
		} `json:"claims"`
		Destinations []string  `json:"destinations"`
		ChainRemoved bool      `json:"chainRemoved"`
		For          owner     `json:"for"`
		Evidence     *evidence `json:"evidence"`
	} `json:"takeover"`
	Removed  *owner    `json:"removed"`
	Evidence *evidence `json:"evidence"` // gc events
}

// evidence is pkg/liveness.Evidence as the event log writes it.
type evidence struct {
	State  string `json:"state"`
	Source string `json:"source"`
	Netns  string `json:"netns"`
	PID    int    `json:"pid"`
	Reason string `json:"reason"`
}

type owner struct {
	Network     string `json:"network"`
	ContainerID string `json:"containerID"`
}

// events parses the JSON event lines in text (stderr of cnitool or the log file), ignoring
// every other line.
func events(text string) []event {
	var out []event
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if !strings.HasPrefix(line, "{") {
			continue
		}
		var e event
		if json.Unmarshal([]byte(line), &e) == nil && e.Event != "" {
			out = append(out, e)
		}
	}
	return out
}

func takeoverEvents(text string) []event {
	var out []event
	for _, e := range events(text) {
		if e.Event == "takeover" && e.Takeover != nil {
			out = append(out, e)
		}
	}
	return out
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return string(data)
}

// counters matches iptables-save packet/byte counters.
var counters = regexp.MustCompile(`\[\d+:\d+\]`)

// normalizedNAT is iptables-save -t nat of the node without comment lines and counters, so
// two dumps differ only when rules or chains differ.
func normalizedNAT(t *testing.T, b *testbed.Bed, f testbed.Family) string {
	t.Helper()
	var out []string
	for _, line := range strings.Split(b.MustSaveNAT(f), "\n") {
		if strings.HasPrefix(line, "#") || strings.TrimSpace(line) == "" {
			continue
		}
		out = append(out, counters.ReplaceAllString(line, "[0:0]"))
	}
	return strings.Join(out, "\n")
}

// subnetIP returns the address at offset k of a pod subnet, with the subnet's prefix, for
// the "ips" capability of host-local ("198.19.7.20/26").
func subnetIP(n *net.IPNet, k int) string {
	ip := make(net.IP, len(n.IP))
	copy(ip, n.IP)
	for i := len(ip) - 1; k > 0 && i >= 0; i-- {
		s := int(ip[i]) + k
		ip[i] = byte(s)
		k = s >> 8
	}
	ones, _ := n.Mask.Size()
	return fmt.Sprintf("%s/%d", ip, ones)
}

// pluginConf is the single-plugin configuration libcni hands portguard for network n:
// name, cniVersion, type and whatever else is given.
func pluginConf(t *testing.T, n *testbed.Network, kv map[string]any) []byte {
	t.Helper()
	var list struct {
		CNIVersion string           `json:"cniVersion"`
		Name       string           `json:"name"`
		Plugins    []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(n.Conflist, &list); err != nil {
		t.Fatal(err)
	}
	conf := map[string]any{"cniVersion": list.CNIVersion, "name": list.Name}
	for _, p := range list.Plugins {
		if p["type"] == "portguard" {
			for k, v := range p {
				if k != "capabilities" {
					conf[k] = v
				}
			}
		}
	}
	if conf["type"] == nil {
		conf["type"] = "portguard"
	}
	for k, v := range kv {
		conf[k] = v
	}
	raw, err := json.Marshal(conf)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// gcCall runs portguard's GC for network n directly (CNI 1.1.0) with the given valid
// attachments (container IDs, interface eth0).
func gcCall(t *testing.T, b *testbed.Bed, n *testbed.Network, valid ...*testbed.Pod) (*testbed.Result, error) {
	t.Helper()
	atts := []map[string]string{}
	for _, p := range valid {
		atts = append(atts, map[string]string{"containerID": p.ContainerID, "ifname": "eth0"})
	}
	return b.PluginCall("portguard", "GC", pluginConf(t, n, map[string]any{"cni.dev/valid-attachments": atts}))
}

// reAdd runs portguard's ADD for pod p directly, with the result of the pod's earlier
// cnitool ADD as prevResult: the runtime repeating the port-mapping step for a live pod.
func reAdd(t *testing.T, b *testbed.Bed, n *testbed.Network, p *testbed.Pod, prev string, mappings ...testbed.PortMapping) (*testbed.Result, error) {
	t.Helper()
	var prevResult map[string]any
	if err := json.Unmarshal([]byte(prev), &prevResult); err != nil {
		t.Fatalf("prevResult %q: %v", prev, err)
	}
	conf := pluginConf(t, n, map[string]any{
		"runtimeConfig": map[string]any{"portMappings": mappings},
		"prevResult":    prevResult,
	})
	return b.PluginCall("portguard", "ADD", conf,
		"CNI_CONTAINERID="+p.ContainerID, "CNI_NETNS="+p.Path, "CNI_IFNAME=eth0")
}

func hostPort(ip net.IP, port int) string { return net.JoinHostPort(ip.String(), fmt.Sprint(port)) }
