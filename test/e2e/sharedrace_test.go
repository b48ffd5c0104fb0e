package e2e

// This test drives bin/portguard (make build) directly in its own throwaway namespaces
// (pgsr-*), without the testbed, because it needs its own iptables-restore shim.

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func shEnv(t *testing.T, stdin string, env []string, name string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestAddRestoresEntryJumpRemovedBeforeItsPayload: with the netlink paths ADD checks the
// shared layout over netlink before its payload, in another nf_tables transaction (the -C
// assertions it replaces were part of the payload's). An entry jump removed in between
// must still be restored: ADD checks again after its payload and plans again if the
// layout went. The shim's iptables-restore removes PREROUTING's entry jump just before
// the payload, standing for any writer outside portguard's lock (a firewall reload, an
// operator, another tool). With PORTGUARD_NETLINK=off the ADD restores it.
func TestAddRestoresEntryJumpRemovedBeforeItsPayload(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	bin, _ := filepath.Abs("../../bin/portguard")
	if _, err := os.Stat(bin); err != nil {
		t.Skip("run make build first: " + err.Error())
	}
	if v, _ := shEnv(t, "", nil, "iptables", "-V"); !strings.Contains(v, "nf_tables") {
		t.Skip("iptables is not the nf_tables backend: " + v)
	}
	realRestore, err := exec.LookPath("iptables-restore")
	if err != nil {
		t.Skip(err)
	}
	realIptables, _ := exec.LookPath("iptables")
	for _, netlink := range []string{"on", "off"} {
		t.Run("netlink="+netlink, func(t *testing.T) {
			b := make([]byte, 4)
			rand.Read(b)
			id := hex.EncodeToString(b)
			node, pod := "pgsr-node-"+id, "pgsr-pod-"+id
			for _, ns := range []string{node, pod} {
				if out, err := shEnv(t, "", nil, "ip", "netns", "add", ns); err != nil {
					t.Fatalf("ip netns add %s: %v %s", ns, err, out)
				}
				defer shEnv(t, "", nil, "ip", "netns", "del", ns)
			}
			dir := t.TempDir()
			marker := filepath.Join(dir, "remove-entry-jump")
			shim := filepath.Join(dir, "shim")
			os.MkdirAll(shim, 0o755)
			script := fmt.Sprintf("#!/bin/sh\nif [ -f '%s' ]; then rm -f '%s'; '%s' -t nat -D PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT; fi\nexec '%s' \"$@\"\n",
				marker, marker, realIptables, realRestore)
			if err := os.WriteFile(filepath.Join(shim, "iptables-restore"), []byte(script), 0o755); err != nil {
				t.Fatal(err)
			}
			add := func(cid string, port int, ip string) {
				t.Helper()
				conf := fmt.Sprintf(`{"cniVersion":"1.0.0","name":"pgsnet","type":"portmap","snat":true,`+
					`"runtimeConfig":{"portMappings":[{"hostPort":%d,"containerPort":80,"protocol":"tcp"}]},`+
					`"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/%s"}],`+
					`"ips":[{"address":"%s","interface":0}]}}`, port, pod, ip)
				out, err := shEnv(t, conf, []string{
					"PATH=" + shim + ":" + os.Getenv("PATH"), "CNI_COMMAND=ADD", "CNI_CONTAINERID=" + cid,
					"CNI_NETNS=/var/run/netns/" + pod, "CNI_IFNAME=eth0", "CNI_PATH=" + filepath.Dir(bin),
					"PORTGUARD_LOCK_FILE=" + filepath.Join(dir, "lock"), "PORTGUARD_NETLINK=" + netlink,
					"PORTGUARD_STATE_DIR=" + filepath.Join(dir, "state"),
				}, "ip", "netns", "exec", node, bin)
				if err != nil {
					t.Fatalf("ADD %s: %v\n%s", cid, err, out)
				}
			}
			add("c1", 60000, "10.244.200.3/16") // creates the shared layout
			if err := os.WriteFile(marker, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			add("c2", 60001, "10.244.200.4/16")
			if _, err := os.Stat(marker); err == nil {
				t.Fatal("the shim never ran: ADD started no iptables-restore")
			}
			out, err := shEnv(t, "", nil, "ip", "netns", "exec", node, "iptables", "-t", "nat", "-S", "PREROUTING")
			if err != nil {
				t.Fatalf("iptables -S PREROUTING: %v %s", err, out)
			}
			if !strings.Contains(out, "-j CNI-HOSTPORT-DNAT") {
				t.Errorf("ADD succeeded but PREROUTING has no entry jump to CNI-HOSTPORT-DNAT "+
					"(it was removed before the ADD's payload landed; the payload no longer asserts it):\n%s", out)
			}
		})
	}
}
