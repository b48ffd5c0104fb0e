// Package testbed builds a throwaway network test bed for portguard's kernel, end-to-end,
// benchmark and crash tests.
//
// A Bed is a "node" network namespace standing in for the host, plus a "client" namespace
// connected to it by a veth pair (IPv4 and IPv6). Pods are namespaces wired by the real
// `bridge` + `host-local` plugins, driven by `cnitool` run inside the node namespace, with a
// port-mapping plugin (portguard, or upstream portmap) in the chain. Each pod can run socat
// responders that answer every TCP connection and UDP datagram with the pod's name, so a test
// sees exactly which pod got the packet.
//
// Everything is per test: namespace names (prefix "pge-"), CNI_PATH, NETCONFPATH, the
// host-local dataDir, the cnitool result cache (bind-mounted over /var/lib/cni inside the
// `ip netns exec` mount namespace, since cnitool has no cache-dir option), the portguard lock
// file and a PATH shim that logs every iptables process the plugins start. All of it is
// removed by t.Cleanup, also when the test fails.
//
// Traffic helpers only send packets from namespaces the bed created to addresses inside the
// test ranges (198.18.0.0/15, fd00::/8, loopback).
package testbed

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Family is an IP family.
type Family int

const (
	V4 Family = 4
	V6 Family = 6
)

func (f Family) String() string {
	if f == V6 {
		return "IPv6"
	}
	return "IPv4"
}

// CommandTimeout bounds every command the bed runs (cnitool calls included).
var CommandTimeout = 90 * time.Second

// Options tune a Bed.
type Options struct {
	// NoShim runs the plugins with the normal PATH (no iptables logging shim).
	NoShim bool
	// SharedLock leaves PORTGUARD_LOCK_FILE unset, so portguard uses its host-wide default
	// lock. By default each bed (each "node") gets its own lock file.
	SharedLock bool
}

// Bed is one test bed: node + client namespaces and the per-test CNI directories.
type Bed struct {
	T    testing.TB
	ID   string // short random id used in every name
	Bins *Bins

	Node   string // node netns name (stands in for the host)
	Client string // client netns name

	// Node and client addresses on the client<->node link. NodeIP4Alt/NodeIP6Alt are second
	// addresses of the node on the same link, for hostIP tests.
	NodeIP4, NodeIP4Alt, ClientIP4 net.IP
	NodeIP6, NodeIP6Alt, ClientIP6 net.IP
	NodeLink                       string // node-side interface of the client link

	Dir       string // per-test temporary root
	CNIBinDir string // CNI_PATH: symlinks bridge, host-local, portmap (upstream), portguard
	NetDir    string // NETCONFPATH
	CacheDir  string // cnitool's /var/lib/cni, per test
	IPAMDir   string // host-local dataDir
	ShimDir   string // PATH shim logging iptables invocations ("" with NoShim)
	ShimLog   string
	LockFile  string // PORTGUARD_LOCK_FILE ("" with SharedLock)
	StateDir  string // PORTGUARD_STATE_DIR: portguard's attachment records

	// Env is appended to the environment of every cnitool call (and so of every plugin).
	Env []string

	octet      int
	mu         sync.Mutex
	netCount   int
	podCount   int
	pods       []*Pod
	namespaces []string
	procs      []*exec.Cmd
	realBins   map[string]string
}

var bedCounter atomic.Int64

func randomHex(n int) string {
	b := make([]byte, (n+1)/2)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)[:n]
}

// New builds a bed for t and registers its cleanup. It skips the test when the environment
// cannot run it (see Require).
func New(t testing.TB, opts ...Options) *Bed {
	t.Helper()
	var o Options
	if len(opts) > 0 {
		o = opts[0]
	}
	bins := Binaries(t)
	id := randomHex(6)
	octet := int((int64(os.Getpid())*7 + bedCounter.Add(1)) % 250)
	b := &Bed{
		T:      t,
		ID:     id,
		Bins:   bins,
		Node:   "pge-" + id + "-n",
		Client: "pge-" + id + "-c",
		octet:  octet,

		NodeLink:   "n0",
		NodeIP4:    net.ParseIP(fmt.Sprintf("198.18.%d.1", octet)),
		ClientIP4:  net.ParseIP(fmt.Sprintf("198.18.%d.2", octet)),
		NodeIP4Alt: net.ParseIP(fmt.Sprintf("198.18.%d.3", octet)),
		NodeIP6:    net.ParseIP(fmt.Sprintf("fd00:70:%x::1", octet)),
		ClientIP6:  net.ParseIP(fmt.Sprintf("fd00:70:%x::2", octet)),
		NodeIP6Alt: net.ParseIP(fmt.Sprintf("fd00:70:%x::3", octet)),
		realBins:   map[string]string{},
	}
	b.Dir = t.TempDir()
	b.CNIBinDir = filepath.Join(b.Dir, "cni-bin")
	b.NetDir = filepath.Join(b.Dir, "net.d")
	b.CacheDir = filepath.Join(b.Dir, "cni-cache")
	b.IPAMDir = filepath.Join(b.Dir, "ipam")
	for _, d := range []string{b.CNIBinDir, b.NetDir, b.CacheDir, b.IPAMDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// cnitool always caches under /var/lib/cni; it must exist as a bind-mount target.
	if err := os.MkdirAll("/var/lib/cni", 0o755); err != nil {
		t.Fatal(err)
	}
	b.InstallPlugin("bridge", bins.Bridge)
	b.InstallPlugin("host-local", bins.HostLocal)
	b.InstallPlugin("portmap", bins.Portmap)
	if bins.Portguard != "" && isExecutable(bins.Portguard) {
		b.InstallPlugin("portguard", bins.Portguard)
	}
	// portguard's attachment records and the libcni cache it reads as liveness evidence
	// are the bed's own (cnitool's cache is bind-mounted over /var/lib/cni only in its
	// mount namespace; portguardctl and direct plugin calls read it here).
	b.StateDir = filepath.Join(b.Dir, "portguard-state")
	b.Env = append(b.Env, "PORTGUARD_STATE_DIR="+b.StateDir, "PORTGUARD_CNI_CACHE_DIR="+b.CacheDir)
	if !o.SharedLock {
		b.LockFile = filepath.Join(b.Dir, "portguard.lock")
		b.Env = append(b.Env, "PORTGUARD_LOCK_FILE="+b.LockFile)
	}
	if !o.NoShim {
		b.setupShim()
	}

	// One cleanup, registered before anything is created: on failure it first logs the nat
	// tables and the shim log, then kills responders and deletes every namespace.
	recordOwner(id)
	t.Cleanup(func() {
		if t.Failed() {
			b.dumpState()
		}
		b.cleanup()
		forgetOwner(id)
	})

	b.mustNetns(b.Node)
	b.mustNetns(b.Client)
	// No duplicate address detection anywhere (it delays IPv6 by ~1 s per new interface);
	// the node forwards both families.
	b.must("ip", "netns", "exec", b.Node, "sysctl", "-qw",
		"net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
		"net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
	b.must("ip", "netns", "exec", b.Client, "sysctl", "-qw",
		"net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
	b.must("ip", "-n", b.Client, "link", "add", "c0", "type", "veth", "peer", "name", b.NodeLink, "netns", b.Node)
	for _, c := range [][]string{
		{"-n", b.Client, "addr", "add", b.ClientIP4.String() + "/24", "dev", "c0"},
		{"-n", b.Client, "-6", "addr", "add", b.ClientIP6.String() + "/64", "dev", "c0", "nodad"},
		{"-n", b.Node, "addr", "add", b.NodeIP4.String() + "/24", "dev", b.NodeLink},
		{"-n", b.Node, "addr", "add", b.NodeIP4Alt.String() + "/24", "dev", b.NodeLink},
		{"-n", b.Node, "-6", "addr", "add", b.NodeIP6.String() + "/64", "dev", b.NodeLink, "nodad"},
		{"-n", b.Node, "-6", "addr", "add", b.NodeIP6Alt.String() + "/64", "dev", b.NodeLink, "nodad"},
		{"-n", b.Client, "link", "set", "c0", "up"},
		{"-n", b.Node, "link", "set", b.NodeLink, "up"},
	} {
		b.must(append([]string{"ip"}, c...)...)
	}
	b.waitLinkReady()
	return b
}

// waitLinkReady waits until the client reaches the node on both families: the first IPv6
// packets on a fresh veth are dropped for about a second. It probes a closed port of the
// node until the node answers with a reset.
func (b *Bed) waitLinkReady() {
	b.T.Helper()
	for _, ip := range []net.IP{b.NodeIP4, b.NodeIP6} {
		deadline := time.Now().Add(5 * time.Second)
		for {
			err := inNetns(b.Client, func() error {
				c, err := net.DialTimeout("tcp", net.JoinHostPort(ip.String(), "9"), 150*time.Millisecond)
				if err == nil {
					c.Close()
				}
				return err
			})
			if err == nil || errors.Is(err, syscall.ECONNREFUSED) {
				break
			}
			if time.Now().After(deadline) {
				b.T.Fatalf("client cannot reach node %s: %v", ip, err)
			}
		}
	}
}

// InstallPlugin puts src into the bed's CNI_PATH under the given file name, replacing what was
// there (use it to install portguard as "portmap", or to swap binaries between calls).
//
// Under its own base name the plugin is symlinked. Under another name it is hard-linked (or
// copied), so that even /proc/self/exe shows the installed name, as on a node where the binary
// was copied to /opt/cni/bin/portmap.
func (b *Bed) InstallPlugin(name, src string) {
	b.T.Helper()
	dst := filepath.Join(b.CNIBinDir, name)
	_ = os.Remove(dst)
	if filepath.Base(src) == name {
		if err := os.Symlink(src, dst); err != nil {
			b.T.Fatal(err)
		}
		return
	}
	if real, err := filepath.EvalSymlinks(src); err == nil {
		src = real
	}
	if err := os.Link(src, dst); err == nil {
		return
	}
	data, err := os.ReadFile(src)
	if err != nil {
		b.T.Fatal(err)
	}
	if err := os.WriteFile(dst, data, 0o755); err != nil {
		b.T.Fatal(err)
	}
}

// mustNetns creates a namespace with loopback up, and registers its deletion.
func (b *Bed) mustNetns(name string) {
	b.T.Helper()
	b.must("ip", "netns", "add", name)
	b.mu.Lock()
	b.namespaces = append(b.namespaces, name)
	b.mu.Unlock()
	b.must("ip", "-n", name, "link", "set", "lo", "up")
}

func (b *Bed) must(args ...string) {
	b.T.Helper()
	if err := run(nil, args...); err != nil {
		b.T.Fatal(err)
	}
}

// ExecError is a failed command with its output.
type ExecError struct {
	Args           []string
	Err            error
	Stdout, Stderr string
}

func (e *ExecError) Error() string {
	msg := strings.TrimSpace(e.Stderr)
	if msg == "" {
		msg = strings.TrimSpace(e.Stdout)
	}
	return fmt.Sprintf("%s: %v: %s", strings.Join(e.Args, " "), e.Err, msg)
}

func (e *ExecError) Unwrap() error { return e.Err }

// runOut runs a command with the bed's timeout and returns stdout and stderr.
func runOut(env []string, stdin []byte, args ...string) (string, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), CommandTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	if env != nil {
		cmd.Env = env
	}
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.String(), stderr.String(), &ExecError{Args: args, Err: err, Stdout: stdout.String(), Stderr: stderr.String()}
	}
	return stdout.String(), stderr.String(), nil
}

func run(env []string, args ...string) error {
	_, _, err := runOut(env, nil, args...)
	return err
}

// Exec runs a command inside a namespace created by the bed and returns its stdout.
func (b *Bed) Exec(ns string, args ...string) (string, error) {
	out, _, err := runOut(nil, nil, append([]string{"ip", "netns", "exec", ns}, args...)...)
	return out, err
}

// Ctl runs portguardctl with args inside the node namespace, with the bed's environment
// (its lock file, portguard's records, the libcni cache). A non-zero exit is an error; the
// Result holds the output either way.
func (b *Bed) Ctl(args ...string) (*Result, error) {
	b.T.Helper()
	bin, err := ctlBinary()
	if err != nil {
		b.T.Fatal(err)
	}
	stdout, stderr, err := runOut(append(os.Environ(), b.Env...), nil, append([]string{"ip", "netns", "exec", b.Node, bin}, args...)...)
	return &Result{Stdout: stdout, Stderr: stderr}, err
}

// MustExec is Exec that fails the test on error.
func (b *Bed) MustExec(ns string, args ...string) string {
	b.T.Helper()
	out, err := b.Exec(ns, args...)
	if err != nil {
		b.T.Fatal(err)
	}
	return out
}

// NodeIP returns the node's primary address of a family.
func (b *Bed) NodeIP(f Family) net.IP {
	if f == V6 {
		return b.NodeIP6
	}
	return b.NodeIP4
}

// NodeIPAlt returns the node's second address of a family.
func (b *Bed) NodeIPAlt(f Family) net.IP {
	if f == V6 {
		return b.NodeIP6Alt
	}
	return b.NodeIP4Alt
}

func (b *Bed) cleanup() {
	b.mu.Lock()
	procs := b.procs
	pods := b.pods
	namespaces := b.namespaces
	b.procs, b.pods, b.namespaces = nil, nil, nil
	b.mu.Unlock()
	for _, c := range procs {
		stopProc(c)
	}
	for _, p := range pods {
		_ = run(nil, "ip", "netns", "del", p.NetNS)
	}
	for _, ns := range namespaces {
		_ = run(nil, "ip", "netns", "del", ns)
	}
	// Temp dirs go with t.TempDir (registered earlier, so removed after this).
}

func (b *Bed) dumpState() {
	for _, f := range []Family{V4, V6} {
		if s, err := b.SaveNAT(f); err == nil {
			b.T.Logf("testbed %s: %s nat table at failure:\n%s", b.ID, f, s)
		}
	}
	if b.ShimLog != "" {
		if data, err := os.ReadFile(b.ShimLog); err == nil && len(data) > 0 {
			lines := strings.Split(strings.TrimSpace(string(data)), "\n")
			if len(lines) > 60 {
				lines = append(lines[:60], fmt.Sprintf("... (%d more)", len(lines)-60))
			}
			b.T.Logf("testbed %s: iptables processes started by plugins:\n%s", b.ID, strings.Join(lines, "\n"))
		}
	}
}
