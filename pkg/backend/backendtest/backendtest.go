// Package backendtest holds what the kernel tests of the engine and of each backend share:
// a throwaway network namespace, commands run in it, and a parsed call configuration.
package backendtest

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/config"
)

// NetNS creates a network namespace named pgk-<8 hex> for the test and removes it when the
// test ends. It skips the test without root or without iptables-restore.
func NetNS(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces")
	}
	if _, err := exec.LookPath("iptables-restore"); err != nil {
		t.Skip("iptables not installed")
	}
	b := make([]byte, 4)
	rand.Read(b)
	name := "pgk-" + hex.EncodeToString(b)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	return name
}

// InNS runs args inside namespace ns and returns the combined output; a failure fails the
// test.
func InNS(t *testing.T, ns string, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %v\n%s", args, err, out)
	}
	return string(out)
}

// Conf parses the configuration of a call in network "knet" with interface eth0: extra
// are further top-level fields (each followed by a comma), mappings the portMappings
// entries (JSON, comma-separated), ips the prevResult's addresses (CIDR).
func Conf(t *testing.T, extra, mappings string, ips ...string) *config.Config {
	t.Helper()
	var ipj []string
	for _, ip := range ips {
		ipj = append(ipj, `{"address":"`+ip+`","interface":0}`)
	}
	c, err := config.Parse([]byte(`{"cniVersion":"1.0.0","name":"knet","type":"portguard",`+extra+`
		"runtimeConfig":{"portMappings":[`+mappings+`]},
		"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/x"}],"ips":[`+strings.Join(ipj, ",")+`]}}`), "eth0")
	if err != nil {
		t.Fatal(err)
	}
	return c
}
