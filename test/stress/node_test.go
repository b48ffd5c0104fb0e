// Package stress hammers the portguard plugin binary in throwaway network namespaces: a
// parallel storm of ADDs and DELs with real packets (storm_test.go), a seeded random run of
// ADD/DEL/CHECK/GC with SIGKILLs at random moments checked against a model after every step
// (crash_test.go), and the host-wide lock's timeout and release (lock_test.go).
//
// Every namespace is named "pgs-<random>-..." and removed in t.Cleanup; traffic is only sent
// from a namespace the test created to an address inside it. The plugin is exec'd directly
// (CNI env + stdin config with prevResult) inside the node namespace via `ip netns exec`.
package stress

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/portguard/portguard/pkg/config"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/plan"
	"github.com/portguard/portguard/pkg/state"
	"github.com/portguard/portguard/test/testbed"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if builtDir != "" {
		os.RemoveAll(builtDir)
	}
	os.Exit(code)
}

// ---------------------------------------------------------------------------------------
// Environment and the plugin binary

var requiredTools = []string{"ip", "iptables", "ip6tables", "iptables-save", "ip6tables-save",
	"iptables-restore", "ip6tables-restore", "sh", "sleep"}

// require skips the test when it cannot run here (not root, tools missing); with
// PORTGUARD_E2E_REQUIRED=1 it fails instead, so CI cannot skip silently.
func require(t *testing.T, extra ...string) {
	t.Helper()
	if os.Geteuid() != 0 {
		skipOrFail(t, "stress tests need root (network namespaces, iptables)")
	}
	var missing []string
	for _, c := range append(append([]string(nil), requiredTools...), extra...) {
		if _, err := exec.LookPath(c); err != nil {
			missing = append(missing, c)
		}
	}
	if len(missing) > 0 {
		skipOrFail(t, "stress tests need these tools on PATH (run `make deps`): "+strings.Join(missing, ", "))
	}
}

func skipOrFail(t *testing.T, reason string) {
	t.Helper()
	if os.Getenv("PORTGUARD_E2E_REQUIRED") == "1" {
		t.Fatal(reason)
	}
	t.Skip(reason)
}

var (
	pluginOnce sync.Once
	pluginPath string
	pluginErr  error
	builtDir   string
)

// pluginBinary is $PORTGUARD_BIN_DIR/portguard (the Makefile exports it after `make build`),
// or the plugin built from the working tree into a temporary directory, so a plain
// `go test ./test/stress` never runs a stale binary.
func pluginBinary(t *testing.T) string {
	t.Helper()
	pluginOnce.Do(func() {
		if d := os.Getenv("PORTGUARD_BIN_DIR"); d != "" {
			if st, err := os.Stat(filepath.Join(d, "portguard")); err == nil && st.Mode()&0o111 != 0 {
				pluginPath = filepath.Join(d, "portguard")
				return
			}
		}
		root, err := testbed.RepoRoot()
		if err != nil {
			pluginErr = err
			return
		}
		if builtDir, err = os.MkdirTemp("", "pgs-bin-"); err != nil {
			pluginErr = err
			return
		}
		pluginPath = filepath.Join(builtDir, "portguard")
		cmd := exec.Command("go", "build", "-o", pluginPath, "./plugins/portguard")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			pluginErr = fmt.Errorf("go build ./plugins/portguard: %v\n%s", err, out)
		}
	})
	if pluginErr != nil {
		t.Fatal(pluginErr)
	}
	return pluginPath
}

func randomHex(n int) string {
	b := make([]byte, (n+1)/2)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)[:n]
}

// ---------------------------------------------------------------------------------------
// The node: a network namespace standing in for the host

type node struct {
	t        *testing.T
	id       string
	ns       string // node netns
	podNS    string // a pod netns for CNI_NETNS when the call's pod has none of its own
	dir      string // per-test temp dir
	lockFile string // PORTGUARD_LOCK_FILE
	shimDir  string // "" without the iptables-restore shim
	plugin   string
	runner   *iptables.Exec

	mu         sync.Mutex
	namespaces []string
	procs      []*exec.Cmd
}

// newNode creates the node namespace (loopback up, forwarding on) and registers its removal
// with everything else the test creates.
func newNode(t *testing.T, withShim bool) *node {
	t.Helper()
	n := &node{t: t, id: randomHex(6), dir: t.TempDir(), plugin: pluginBinary(t)}
	n.ns = "pgs-" + n.id + "-n"
	n.lockFile = filepath.Join(n.dir, "portguard.lock")
	n.runner = &iptables.Exec{WaitSeconds: 10, Prefix: []string{"ip", "netns", "exec", n.ns}}
	t.Cleanup(n.cleanup)
	n.addNetns(n.ns)
	n.podNS = "pgs-" + n.id + "-x"
	n.addNetns(n.podNS)
	n.must("ip", "netns", "exec", n.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1",
		"net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
	if withShim {
		n.writeShim()
	}
	return n
}

func (n *node) addNetns(name string) {
	n.t.Helper()
	if !strings.HasPrefix(name, "pgs-") {
		n.t.Fatalf("refusing to create namespace %q outside the pgs- prefix", name)
	}
	n.must("ip", "netns", "add", name)
	n.mu.Lock()
	n.namespaces = append(n.namespaces, name)
	n.mu.Unlock()
	n.must("ip", "-n", name, "link", "set", "lo", "up")
}

func (n *node) cleanup() {
	n.mu.Lock()
	procs, namespaces := n.procs, n.namespaces
	n.procs, n.namespaces = nil, nil
	n.mu.Unlock()
	for _, c := range procs {
		if c.Process != nil {
			syscall.Kill(-c.Process.Pid, syscall.SIGKILL)
			c.Process.Kill()
			c.Wait()
		}
	}
	for i := len(namespaces) - 1; i >= 0; i-- {
		exec.Command("ip", "netns", "del", namespaces[i]).Run()
	}
}

// must runs a command (bounded by 30 s) and fails the test on error.
func (n *node) must(args ...string) string {
	n.t.Helper()
	out, err := runCmd(30*time.Second, nil, args...)
	if err != nil {
		n.t.Fatal(err)
	}
	return out
}

func runCmd(timeout time.Duration, stdin []byte, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s: %v: %s%s", strings.Join(args, " "), err, errb.String(), out.String())
	}
	return out.String(), nil
}

// inNode runs a command inside the node namespace.
func (n *node) inNode(args ...string) string {
	n.t.Helper()
	return n.must(append([]string{"ip", "netns", "exec", n.ns}, args...)...)
}

// writeShim puts iptables-restore and ip6tables-restore wrappers first on the plugin's PATH.
// Per call (through the environment) they can sleep before running the real binary
// (PGS_RESTORE_DELAY, seconds), so a SIGKILL can land while a restore is pending, and they
// log "s" (started), "x" (real restore running) and "d" (done) to PGS_MARK, so the test knows
// where a kill landed.
func (n *node) writeShim() {
	n.t.Helper()
	n.shimDir = filepath.Join(n.dir, "shim")
	if err := os.MkdirAll(n.shimDir, 0o755); err != nil {
		n.t.Fatal(err)
	}
	for _, name := range []string{"iptables-restore", "ip6tables-restore"} {
		real, err := exec.LookPath(name)
		if err != nil {
			n.t.Fatal(err)
		}
		script := fmt.Sprintf(`#!/bin/sh
[ -n "$PGS_MARK" ] && echo s $(date +%%s.%%N) >>"$PGS_MARK"
[ -n "$PGS_RESTORE_DELAY" ] && sleep "$PGS_RESTORE_DELAY"
[ -n "$PGS_MARK" ] && echo x $(date +%%s.%%N) >>"$PGS_MARK"
'%s' "$@"
rc=$?
[ -n "$PGS_MARK" ] && echo d $(date +%%s.%%N) >>"$PGS_MARK"
exit $rc
`, real)
		if err := os.WriteFile(filepath.Join(n.shimDir, name), []byte(script), 0o755); err != nil {
			n.t.Fatal(err)
		}
	}
}

// The foreign rules every test loads before portguard runs: a kube-proxy-like chain entered
// from PREROUTING and OUTPUT, a user DNAT rule and a MASQUERADE.
const foreignV4 = `*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-STRESS - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-SVC-STRESS
-A KUBE-SVC-STRESS -p udp -j DNAT --to-destination 10.244.0.5:53
-A OUTPUT -p tcp -m tcp --dport 9999 -j DNAT --to-destination 127.0.0.1:9998
-A POSTROUTING -s 10.99.0.0/16 -j MASQUERADE
COMMIT
`

const foreignV6 = `*nat
:KUBE-SERVICES - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d fd00:96::10/128 -p tcp -m tcp --dport 443 -j DNAT --to-destination [fd00:244::5]:6443
-A OUTPUT -p tcp -m tcp --dport 9999 -j DNAT --to-destination [::1]:9998
COMMIT
`

func (n *node) loadForeign() {
	n.t.Helper()
	for _, x := range []struct{ bin, payload string }{{"iptables-restore", foreignV4}, {"ip6tables-restore", foreignV6}} {
		if _, err := runCmd(30*time.Second, []byte(x.payload), "ip", "netns", "exec", n.ns, x.bin, "--noflush"); err != nil {
			n.t.Fatal(err)
		}
	}
}

// foreignText is every line of an iptables-save dump that is not portguard's: chain
// declarations (counters stripped) and rules that neither live in nor jump to a CNI- chain.
func foreignText(raw string) string {
	var keep []string
	for _, l := range strings.Split(raw, "\n") {
		switch {
		case strings.HasPrefix(l, ":"):
			if f := strings.Fields(l); len(f) >= 2 && !strings.HasPrefix(f[0], ":CNI-") {
				keep = append(keep, f[0]+" "+f[1])
			}
		case strings.HasPrefix(l, "-A ") && !strings.Contains(l, "CNI-"):
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

// ---------------------------------------------------------------------------------------
// Observation: state.ObserveAll through a runner that also keeps the raw dump

// capture is an iptables.Runner that keeps the text of the last iptables-save it ran.
type capture struct {
	*iptables.Exec
	ns  string
	raw string
}

func (c *capture) Save(f hostport.Family, t *iptables.Table) error {
	bin := "iptables-save"
	if f == hostport.V6 {
		bin = "ip6tables-save"
	}
	out, err := runCmd(30*time.Second, nil, "ip", "netns", "exec", c.ns, bin, "-t", "nat")
	if err != nil {
		return err
	}
	c.raw = out
	return t.Parse(out)
}

type observation struct {
	f   hostport.Family
	raw string
	s   *state.State
}

func (n *node) observe(f hostport.Family) (*observation, error) {
	c := &capture{Exec: n.runner, ns: n.ns}
	s, err := state.ObserveAll(c, f)
	if err != nil {
		return nil, err
	}
	return &observation{f: f, raw: c.raw, s: s}, nil
}

func (n *node) mustObserve(f hostport.Family) *observation {
	n.t.Helper()
	o, err := n.observe(f)
	if err != nil {
		n.t.Fatal(err)
	}
	return o
}

// ---------------------------------------------------------------------------------------
// Attachments and plugin calls

type mapping struct {
	Proto    string `json:"protocol"`
	HostPort int    `json:"hostPort"`
	CtrPort  int    `json:"containerPort"`
}

func (m mapping) key() string { return m.Proto + "/" + strconv.Itoa(m.HostPort) }

// attachment is one (network, container ID) with its pod addresses and port mappings.
type attachment struct {
	Name    string // short label used in logs (and what the pod answers)
	Network string
	ID      string
	IP4     string // CIDR, "" when the pod has no IPv4
	IP6     string
	Maps    []mapping
	Policy  string // conflictPolicy ("" for the default, takeover)
	Backend string // "backend" ("" for the default: iptables where its binaries are)
}

func (a *attachment) owner() hostport.Owner {
	return hostport.Owner{Network: a.Network, ContainerID: a.ID}
}

func (a *attachment) chain() string { return hostport.ChainName(a.owner()) }

func (a *attachment) ip(f hostport.Family) string {
	if f == hostport.V6 {
		return a.IP6
	}
	return a.IP4
}

// claims are the (proto/port) keys the attachment wants in a family ("" IP: none).
func (a *attachment) claims(f hostport.Family) map[string]bool {
	out := map[string]bool{}
	if a.ip(f) == "" {
		return out
	}
	for _, m := range a.Maps {
		out[m.key()] = true
	}
	return out
}

// netConf is the network configuration a runtime passes for ADD, DEL and CHECK: portguard's
// keys, runtimeConfig.portMappings (restricted to keep when non-nil) and prevResult.
func (a *attachment) netConf(lockTimeout int, keep map[string]bool) []byte {
	var maps []mapping
	for _, m := range a.Maps {
		if keep == nil || keep[m.key()] {
			maps = append(maps, m)
		}
	}
	var ips []map[string]any
	for _, ip := range []string{a.IP4, a.IP6} {
		if ip != "" {
			ips = append(ips, map[string]any{"address": ip, "interface": 0})
		}
	}
	conf := map[string]any{
		"cniVersion":    "1.1.0",
		"name":          a.Network,
		"type":          "portguard",
		"runtimeConfig": map[string]any{"portMappings": maps},
		"prevResult": map[string]any{
			"cniVersion": "1.1.0",
			"interfaces": []any{map[string]any{"name": "eth0", "sandbox": "/var/run/netns/" + a.Name}},
			"ips":        ips,
		},
	}
	if lockTimeout > 0 {
		conf["lockTimeout"] = lockTimeout
	}
	if a.Policy != "" {
		conf["conflictPolicy"] = a.Policy
	}
	if a.Backend != "" {
		conf["backend"] = a.Backend
	}
	b, err := json.Marshal(conf)
	if err != nil {
		panic(err)
	}
	return b
}

// gcConf is a GC call's configuration with a valid-attachments list.
func gcConf(network string, valid []string, lockTimeout int) []byte {
	return gcConfFor("", network, valid, lockTimeout)
}

// gcConfFor is gcConf for a backend ("" for the default).
func gcConfFor(backend, network string, valid []string, lockTimeout int) []byte {
	list := []any{}
	for _, id := range valid {
		list = append(list, map[string]any{"containerID": id, "ifname": "eth0"})
	}
	conf := map[string]any{
		"cniVersion":                "1.1.0",
		"name":                      network,
		"type":                      "portguard",
		"cni.dev/valid-attachments": list,
	}
	if lockTimeout > 0 {
		conf["lockTimeout"] = lockTimeout
	}
	if backend != "" {
		conf["backend"] = backend
	}
	b, _ := json.Marshal(conf)
	return b
}

// desired computes, with portguard's own planner, the jumps and chain rules an attachment
// must have in a family when it holds exactly the claims in hold.
func (a *attachment) desired(f hostport.Family, hold map[string]bool) (jumps, rules []string, err error) {
	c, err := config.Parse(a.netConf(0, hold), "eth0")
	if err != nil {
		return nil, nil, err
	}
	ip, ok := c.PodIPs[f]
	if !ok {
		return nil, nil, fmt.Errorf("%s has no %s address", a.Name, f)
	}
	d := plan.DesiredFor(c, a.owner(), f, ip)
	for _, r := range d.Jumps {
		jumps = append(jumps, state.Normalize(r))
	}
	for _, r := range d.Rules {
		rules = append(rules, state.Normalize(r))
	}
	sort.Strings(jumps)
	sort.Strings(rules)
	return jumps, rules, nil
}

// callSpec is one plugin invocation.
type callSpec struct {
	Verb  string // ADD, DEL, CHECK, GC
	ID    string // CNI_CONTAINERID ("" for GC)
	Stdin []byte
	Env   []string // extra environment (shim controls)
	NetNS string   // CNI_NETNS (default: the node's spare pod namespace)
	// Kill sends SIGKILL after KillAfter if the call is still running: to the whole process
	// group (plugin and the iptables processes it started) when KillGroup, else to the plugin
	// only (as a runtime's context timeout does).
	Kill      bool
	KillAfter time.Duration
	KillGroup bool
	Timeout   time.Duration // overall bound (default 60 s)
	// LeaveOrphans returns at once after a kill, while processes the plugin started may still
	// run (by default a killed call returns once its whole process group is gone).
	LeaveOrphans bool
	// OnKill, when set, runs right after the SIGKILL was sent.
	OnKill func()
	// Started, when set, receives the call's process group id once it runs.
	Started chan<- int
}

type callResult struct {
	Stdout, Stderr string
	Exit           int  // exit code; -1 when killed by a signal
	Killed         bool // ended by our SIGKILL
	Pgid           int
	Dur            time.Duration
	Err            error // start/wait failure other than a non-zero exit
}

// cniError decodes the CNI error JSON a failed call printed.
func (r callResult) cniError() (code uint, msg string) {
	var e struct {
		Code    uint   `json:"code"`
		Msg     string `json:"msg"`
		Details string `json:"details"`
	}
	if json.Unmarshal([]byte(r.Stdout), &e) != nil {
		return 0, ""
	}
	return e.Code, strings.TrimSpace(e.Msg + " " + e.Details)
}

func (r callResult) String() string {
	if r.Killed {
		return fmt.Sprintf("killed after %s", r.Dur.Round(time.Millisecond))
	}
	s := fmt.Sprintf("exit %d in %s", r.Exit, r.Dur.Round(time.Millisecond))
	if r.Exit != 0 {
		s += ": " + strings.TrimSpace(r.Stdout) + " " + strings.TrimSpace(r.Stderr)
	}
	if r.Err != nil {
		s += fmt.Sprintf(" (%v)", r.Err)
	}
	return s
}

// short is String on one line, the error message cut to 160 characters.
func (r callResult) short() string {
	if r.Killed || r.Exit == 0 {
		return r.String()
	}
	code, msg := r.cniError()
	if len(msg) > 160 {
		msg = msg[:160] + "..."
	}
	return fmt.Sprintf("exit %d in %s: code %d: %s", r.Exit, r.Dur.Round(time.Millisecond), code, msg)
}

func (n *node) pluginEnv(c callSpec) []string {
	path := os.Getenv("PATH")
	if n.shimDir != "" {
		path = n.shimDir + string(os.PathListSeparator) + path
	}
	env := []string{
		"PATH=" + path,
		"CNI_COMMAND=" + c.Verb,
		"CNI_PATH=" + filepath.Dir(n.plugin),
		"PORTGUARD_LOCK_FILE=" + n.lockFile,
		"PORTGUARD_STATE_DIR=" + filepath.Join(n.dir, "portguard-state"),
		"PORTGUARD_CNI_CACHE_DIR=" + filepath.Join(n.dir, "cni-cache"),
	}
	if c.Verb != "GC" && c.Verb != "STATUS" {
		netns := c.NetNS
		if netns == "" {
			netns = n.podNS
		}
		env = append(env, "CNI_CONTAINERID="+c.ID, "CNI_IFNAME=eth0", "CNI_NETNS=/var/run/netns/"+netns)
	}
	return append(env, c.Env...)
}

// call runs the plugin inside the node namespace in its own process group. A killed call
// returns once every process of its group is gone, so an iptables-restore it left running
// has finished (or died) before the test looks at the kernel.
func (n *node) call(c callSpec) callResult {
	if c.Timeout == 0 {
		c.Timeout = 60 * time.Second
	}
	cmd := exec.Command("ip", "netns", "exec", n.ns, n.plugin)
	cmd.Env = n.pluginEnv(c)
	cmd.Stdin = bytes.NewReader(c.Stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return callResult{Exit: -1, Err: err}
	}
	pgid := cmd.Process.Pid
	if c.Started != nil {
		c.Started <- pgid
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var err error
	var kill <-chan time.Time
	if c.Kill {
		kill = time.After(c.KillAfter)
	}
	overall := time.NewTimer(c.Timeout)
	defer overall.Stop()
	timedOut := false
	select {
	case err = <-done:
	case <-kill:
		if c.KillGroup {
			syscall.Kill(-pgid, syscall.SIGKILL)
		} else {
			syscall.Kill(pgid, syscall.SIGKILL)
		}
		if c.OnKill != nil {
			c.OnKill()
		}
		err = <-done
	case <-overall.C:
		timedOut = true
		syscall.Kill(-pgid, syscall.SIGKILL)
		err = <-done
	}
	res := callResult{Stdout: out.String(), Stderr: errb.String(), Dur: time.Since(start), Pgid: pgid}
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		res.Exit = -1
		res.Killed = ws.Signal() == syscall.SIGKILL && !timedOut
	} else {
		res.Exit = cmd.ProcessState.ExitCode()
	}
	if timedOut {
		res.Err = fmt.Errorf("call did not finish within %s", c.Timeout)
	} else if err != nil && res.Exit == 0 {
		res.Err = err
	}
	if (res.Killed && !c.LeaveOrphans) || timedOut {
		if err := waitGroupGone(pgid, 20*time.Second); err != nil && res.Err == nil {
			res.Err = err
		}
	}
	return res
}

// takeLock takes the host-wide portguard lock the way the plugin does (flock(2) on
// PORTGUARD_LOCK_FILE), waiting up to timeout. Release by closing the file.
func (n *node) takeLock(timeout time.Duration) (*os.File, error) {
	f, err := os.OpenFile(n.lockFile, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(timeout)
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("portguard lock %s not free after %s: %v", n.lockFile, timeout, err)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// waitGroupGone waits until no live (non-zombie) process is left in a process group.
func waitGroupGone(pgid int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if !groupAlive(pgid) {
			return nil
		}
		if time.Now().After(deadline) {
			syscall.Kill(-pgid, syscall.SIGKILL)
			return fmt.Errorf("processes of group %d still running after %s", pgid, timeout)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func groupAlive(pgid int) bool {
	if err := syscall.Kill(-pgid, 0); err == syscall.ESRCH {
		return false
	}
	if _, err := os.ReadDir("/proc"); err != nil {
		return true
	}
	return len(groupMembers(pgid)) > 0
}

// groupMembers lists the live processes of a group as "pid comm state". Zombies and
// processes already in exit (PF_EXITING) do not count: an exiting process runs no more
// system calls, so it cannot change the table, and it lets go of the portguard lock while
// closing its files, a moment before it turns into a zombie.
func groupMembers(pgid int) []string {
	var out []string
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) < 7 || f[0] == "Z" || f[0] == "X" {
			continue
		}
		if flags, _ := strconv.ParseUint(f[6], 10, 64); flags&pfExiting != 0 {
			continue
		}
		if g, _ := strconv.Atoi(f[2]); g == pgid && pid > 0 {
			comm := strings.TrimSpace(s[strings.IndexByte(s, '(')+1 : i])
			out = append(out, fmt.Sprintf("%d %s %s", pid, comm, f[0]))
		}
	}
	return out
}

// pfExiting is the kernel's PF_EXITING task flag (field 9 of /proc/PID/stat).
const pfExiting = 0x4
