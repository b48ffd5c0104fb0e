package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/portguard/portguard/pkg/hostport"
)

// ctlBin is the portguardctl binary the kernel tests run inside namespaces.
var ctlBin string

func TestMain(m *testing.M) {
	code := func() int {
		// In-process commands judge owners too: never from this machine's real records.
		evidence, err := os.MkdirTemp("", "pgc-evidence-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		defer os.RemoveAll(evidence)
		os.Setenv("PORTGUARD_STATE_DIR", filepath.Join(evidence, "state"))
		os.Setenv("PORTGUARD_CNI_CACHE_DIR", filepath.Join(evidence, "cni"))
		if os.Geteuid() == 0 {
			dir, err := os.MkdirTemp("", "pgc-bin-")
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 2
			}
			defer os.RemoveAll(dir)
			ctlBin = filepath.Join(dir, "portguardctl")
			out, err := exec.Command("go", "build", "-o", ctlBin, ".").CombinedOutput()
			if err != nil {
				fmt.Fprintf(os.Stderr, "go build portguardctl: %v\n%s", err, out)
				return 2
			}
		}
		return m.Run()
	}()
	os.Exit(code)
}

// needRoot skips kernel tests when they cannot run.
func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("kernel test: needs root (network namespaces and iptables)")
	}
	for _, c := range []string{"ip", "iptables", "iptables-save", "iptables-restore"} {
		if _, err := exec.LookPath(c); err != nil {
			t.Skipf("kernel test: %s not found", c)
		}
	}
}

var nsCounter atomic.Int64

// newNS creates a throwaway network namespace "pgc-<pid>-<n>" with lo up; it is deleted
// (after killing what runs in it) when the test ends.
func newNS(t *testing.T) string {
	t.Helper()
	name := fmt.Sprintf("pgc-%d-%d", os.Getpid(), nsCounter.Add(1))
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "pids", name).Output(); err == nil {
			for _, pid := range strings.Fields(string(out)) {
				exec.Command("kill", pid).Run()
			}
		}
		exec.Command("ip", "netns", "del", name).Run()
	})
	mustNS(t, name, "ip", "link", "set", "lo", "up")
	return name
}

type result struct {
	stdout, stderr string
	code           int
}

// inNS runs a command in the namespace with a bound on its runtime.
func inNS(t *testing.T, ns string, env []string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("%v: %v", args, err)
		}
		code = ee.ExitCode()
	}
	return result{out.String(), errb.String(), code}
}

func mustNS(t *testing.T, ns string, args ...string) string {
	t.Helper()
	r := inNS(t, ns, nil, args...)
	if r.code != 0 {
		t.Fatalf("%s: %v: exit %d: %s", ns, args, r.code, r.stderr)
	}
	return r.stdout
}

// ctl runs portguardctl in the namespace with a private lock file, and private (empty)
// attachment records and libcni cache, so the liveness evidence is the test's own and never
// another process's on the same machine (a demo's pods, another test's).
func ctl(t *testing.T, ns string, args ...string) result {
	t.Helper()
	dir := t.TempDir()
	env := []string{"PORTGUARD_LOCK_FILE=" + filepath.Join(dir, "portguard.lock"),
		"PORTGUARD_STATE_DIR=" + filepath.Join(dir, "state"), "PORTGUARD_CNI_CACHE_DIR=" + filepath.Join(dir, "cni")}
	return inNS(t, ns, env, append([]string{ctlBin}, args...)...)
}

// ipt runs one iptables command in the namespace, as upstream portmap (go-iptables) does:
// one process per rule, arguments in upstream's order.
func ipt(t *testing.T, ns string, f hostport.Family, args ...string) {
	t.Helper()
	bin := "iptables"
	if f == hostport.V6 {
		bin = "ip6tables"
	}
	mustNS(t, ns, append([]string{bin, "-w", "-t", "nat"}, args...)...)
}

// saveNat is iptables-save -t nat without its comment lines and chain counters.
func saveNat(t *testing.T, ns string, f hostport.Family) string {
	t.Helper()
	bin := "iptables-save"
	if f == hostport.V6 {
		bin = "ip6tables-save"
	}
	out := mustNS(t, ns, bin, "-t", "nat")
	var lines []string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "#") || l == "" {
			continue
		}
		if strings.HasPrefix(l, ":") {
			if i := strings.Index(l, " ["); i > 0 {
				l = l[:i]
			}
		}
		lines = append(lines, l)
	}
	return strings.Join(lines, "\n") + "\n"
}

// chainsOf extracts the declarations and rules of the named chains from saveNat output.
func chainsOf(save string, keep func(chain string) bool) string {
	var out []string
	for _, l := range strings.Split(save, "\n") {
		f := strings.Fields(l)
		switch {
		case strings.HasPrefix(l, ":") && len(f) > 0 && keep(f[0][1:]):
			out = append(out, l)
		case strings.HasPrefix(l, "-A ") && len(f) > 1 && keep(f[1]):
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// upstream writes attachments and shared chains the way upstream portmap v1.10.0 does.
type upstream struct {
	t      *testing.T
	ns     string
	f      hostport.Family
	shared bool
}

func newUpstream(t *testing.T, ns string, f hostport.Family) *upstream {
	return &upstream{t: t, ns: ns, f: f}
}

// setup creates the shared chains (genToplevelDnatChain, genSetMarkChain, genMarkMasqChain).
func (u *upstream) setup() {
	if u.shared {
		return
	}
	u.shared = true
	ipt(u.t, u.ns, u.f, "-N", "CNI-HOSTPORT-SETMARK")
	ipt(u.t, u.ns, u.f, "-A", "CNI-HOSTPORT-SETMARK", "-m", "comment", "--comment", "CNI portfwd masquerade mark", "-j", "MARK", "--set-xmark", "0x2000/0x2000")
	ipt(u.t, u.ns, u.f, "-N", "CNI-HOSTPORT-MASQ")
	ipt(u.t, u.ns, u.f, "-A", "CNI-HOSTPORT-MASQ", "-m", "mark", "--mark", "0x2000/0x2000", "-j", "MASQUERADE")
	ipt(u.t, u.ns, u.f, "-I", "POSTROUTING", "1", "-m", "comment", "--comment", "CNI portfwd requiring masquerade", "-j", "CNI-HOSTPORT-MASQ")
	ipt(u.t, u.ns, u.f, "-N", "CNI-HOSTPORT-DNAT")
	for _, ch := range []string{"PREROUTING", "OUTPUT"} {
		ipt(u.t, u.ns, u.f, "-A", ch, "-m", "addrtype", "--dst-type", "LOCAL", "-j", "CNI-HOSTPORT-DNAT")
	}
}

// chain creates an attachment's chain: per mapping the hairpin and localhost mark rules and
// the DNAT (dnatPort lets the DNAT rule match another port than the jump, as in the blog
// post), then appends its jump.
func (u *upstream) attach(o hostport.Owner, jumpPort, dnatPort int, podCIDR, podIP string, podPort int) string {
	u.setup()
	ch := hostport.ChainName(o)
	ipt(u.t, u.ns, u.f, "-N", ch)
	base := []string{"-A", ch, "-p", "tcp", "--dport", fmt.Sprint(dnatPort)}
	ipt(u.t, u.ns, u.f, append(base, "-s", podCIDR, "-j", "CNI-HOSTPORT-SETMARK")...)
	dest := fmt.Sprintf("%s:%d", podIP, podPort)
	if u.f == hostport.V4 {
		ipt(u.t, u.ns, u.f, append(base, "-s", "127.0.0.1", "-j", "CNI-HOSTPORT-SETMARK")...)
	} else {
		dest = fmt.Sprintf("[%s]:%d", podIP, podPort)
	}
	ipt(u.t, u.ns, u.f, append(base, "-j", "DNAT", "--to-destination", dest)...)
	u.jump(o, jumpPort)
	return ch
}

func (u *upstream) jump(o hostport.Owner, port int) {
	ipt(u.t, u.ns, u.f, "-A", "CNI-HOSTPORT-DNAT", "-m", "comment", "--comment",
		fmt.Sprintf(`dnat name: "%s" id: "%s"`, o.Network, o.ContainerID),
		"-m", "multiport", "-p", "tcp", "--destination-ports", fmt.Sprint(port), "-j", hostport.ChainName(o))
}

// foreign writes rules that are not CNI's: a kube-proxy-like KUBE-SERVICES chain entered
// from PREROUTING and OUTPUT, and an operator's own DNAT rule.
func foreign(t *testing.T, ns string, f hostport.Family) {
	svc, dest := "10.96.0.10/32", "10.244.9.9:53"
	if f == hostport.V6 {
		svc, dest = "fd00:96::10/128", "[fd00:244::9]:53"
	}
	ipt(t, ns, f, "-N", "KUBE-SERVICES")
	ipt(t, ns, f, "-N", "KUBE-SVC-TCOU7JCQXEZGVUNU")
	ipt(t, ns, f, "-A", "KUBE-SERVICES", "-d", svc, "-p", "tcp", "-m", "comment", "--comment", "kube-system/kube-dns:dns-tcp cluster IP", "-m", "tcp", "--dport", "53", "-j", "KUBE-SVC-TCOU7JCQXEZGVUNU")
	ipt(t, ns, f, "-A", "KUBE-SVC-TCOU7JCQXEZGVUNU", "-m", "comment", "--comment", "kube-system/kube-dns:dns-tcp", "-j", "DNAT", "-p", "tcp", "--to-destination", dest)
	ipt(t, ns, f, "-I", "PREROUTING", "1", "-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES")
	ipt(t, ns, f, "-I", "OUTPUT", "1", "-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES")
	ipt(t, ns, f, "-A", "PREROUTING", "-p", "tcp", "--dport", "2222", "-m", "comment", "--comment", "operator: ssh to the bastion pod", "-j", "DNAT", "--to-destination", dest)
}

// foreignRules is what must stay byte-identical: KUBE-* chains and every non-CNI rule of
// the built-in chains.
func foreignRules(save string) string {
	var out []string
	for _, l := range strings.Split(save, "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		name := strings.TrimPrefix(f[0], ":")
		if f[0] == "-A" {
			name = f[1]
		}
		if strings.HasPrefix(name, "KUBE-") {
			out = append(out, l)
			continue
		}
		if f[0] == "-A" && (name == "PREROUTING" || name == "OUTPUT" || name == "POSTROUTING") && !strings.Contains(l, "CNI-HOSTPORT") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
