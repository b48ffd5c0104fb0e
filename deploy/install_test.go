// Package deploy holds the node installer (install.sh) and the manifests; this test runs
// install.sh against scratch CNI directories with fake plugin binaries (no root path touched).
package deploy

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/portguard/portguard/pkg/doctor"
)

// shell runs install.sh: the system's sh (dash on Debian, the image's /bin/sh: deploy/Dockerfile
// is FROM debian:bookworm-slim), then (TestMain) busybox's with nothing but busybox applets on
// PATH, so the script keeps to what the smallest POSIX shell and tools offer.
var shell = "sh"

// TestMain runs the tests with sh, then once more under busybox when it is installed (make
// deps installs it; CI requires it through PORTGUARD_E2E_REQUIRED).
func TestMain(m *testing.M) {
	if dir := os.Getenv("PORTGUARD_TEST_BUSYBOX_DIR"); dir != "" {
		shell = filepath.Join(dir, "sh")
		os.Exit(m.Run())
	}
	code := m.Run()
	if code != 0 {
		os.Exit(code)
	}
	os.Exit(underBusybox())
}

// underBusybox re-runs this test binary with PATH holding only busybox applets.
func underBusybox() int {
	bb, err := exec.LookPath("busybox")
	if err != nil {
		if os.Getenv("PORTGUARD_E2E_REQUIRED") == "1" {
			fmt.Fprintln(os.Stderr, "busybox is required to test install.sh as the image runs it (make deps installs it)")
			return 1
		}
		fmt.Fprintln(os.Stderr, "busybox not installed: install.sh tested with sh only")
		return 0
	}
	dir, err := os.MkdirTemp("", "pg-busybox-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	for _, applet := range []string{"sh", "cp", "mv", "rm", "chmod", "cat", "cut", "grep", "head", "tr", "sleep", "sha256sum", "echo"} {
		if err := os.Symlink(bb, filepath.Join(dir, applet)); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	cmd := exec.Command(os.Args[0], os.Args[1:]...)
	cmd.Env = append(os.Environ(), "PORTGUARD_TEST_BUSYBOX_DIR="+dir, "PATH="+dir)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "under busybox:", err)
		return 1
	}
	return 0
}

// fakePlugin writes an executable that prints about like a CNI plugin run without
// CNI_COMMAND; the line is its identity and makes every fake's content distinct.
func fakePlugin(t *testing.T, path, about string) {
	t.Helper()
	s := fmt.Sprintf("#!/bin/sh\necho '%s' >&2\nexit 1\n", about)
	if err := os.WriteFile(path, []byte(s), 0o755); err != nil {
		t.Fatal(err)
	}
}

const (
	upstream   = "CNI portmap plugin v1.10.0"
	upstreamV2 = "CNI portmap plugin v1.11.0"
	guardV1    = "portguard v0.1.0 (commit 0123456789ab, go1.26.8): CNI host ports without stale claims"
	guardV2    = "portguard v0.2.0 (commit ba9876543210, go1.26.8): CNI host ports without stale claims"
)

type bed struct {
	t   *testing.T
	bin string // the scratch CNI binary directory
	src map[string]string
}

// newBed makes a CNI directory holding upstream portmap and bridge, and two portguard builds.
func newBed(t *testing.T) *bed {
	b := &bed{t: t, bin: filepath.Join(t.TempDir(), "cni-bin"), src: map[string]string{}}
	if err := os.Mkdir(b.bin, 0o755); err != nil {
		t.Fatal(err)
	}
	fakePlugin(t, filepath.Join(b.bin, "portmap"), upstream)
	fakePlugin(t, filepath.Join(b.bin, "bridge"), "CNI bridge plugin v1.10.0")
	srcDir := t.TempDir()
	for name, about := range map[string]string{"v1": guardV1, "v2": guardV2} {
		b.src[name] = filepath.Join(srcDir, name)
		fakePlugin(t, b.src[name], about)
	}
	return b
}

// run runs install.sh CMD with env on top of the bed's directory and build v1.
func (b *bed) run(cmd string, env ...string) (string, error) {
	b.t.Helper()
	c := exec.Command(shell, "install.sh", cmd)
	c.Env = append(os.Environ(), "CNI_BIN_DIR="+b.bin, "PORTGUARD_SRC="+b.src["v1"], "PORTGUARD_AS_PORTMAP=false")
	c.Env = append(c.Env, env...)
	out, err := c.CombinedOutput()
	return string(out), err
}

func (b *bed) mustRun(cmd string, env ...string) string {
	b.t.Helper()
	out, err := b.run(cmd, env...)
	if err != nil {
		b.t.Fatalf("install.sh %s %v: %v\n%s", cmd, env, err, out)
	}
	return out
}

// about reads the identity of the directory's file name ("" when absent).
func (b *bed) about(name string) string {
	data, err := os.ReadFile(filepath.Join(b.bin, name))
	if err != nil {
		return ""
	}
	_, rest, _ := strings.Cut(string(data), "echo '")
	line, _, _ := strings.Cut(rest, "'")
	return line
}

// files lists the directory: name -> identity (hidden files included).
func (b *bed) files() map[string]string {
	b.t.Helper()
	ents, err := os.ReadDir(b.bin)
	if err != nil {
		b.t.Fatal(err)
	}
	m := map[string]string{}
	for _, e := range ents {
		m[e.Name()] = b.about(e.Name())
	}
	return m
}

func (b *bed) wantFiles(what string, want map[string]string) {
	b.t.Helper()
	got := b.files()
	if fmt.Sprint(sorted(got)) != fmt.Sprint(sorted(want)) {
		b.t.Fatalf("%s: directory holds\n  %v\nwant\n  %v", what, sorted(got), sorted(want))
	}
}

func sorted(m map[string]string) []string {
	var s []string
	for k, v := range m {
		if strings.HasPrefix(k, ".portguard-as-portmap") {
			v = "(marker)"
		}
		s = append(s, k+"="+v)
	}
	sort.Strings(s)
	return s
}

var original = map[string]string{"portmap": upstream, "bridge": "CNI bridge plugin v1.10.0"}

func with(m map[string]string, kv ...string) map[string]string {
	out := map[string]string{}
	for k, v := range m {
		out[k] = v
	}
	for i := 0; i < len(kv); i += 2 {
		if kv[i+1] == "" {
			delete(out, kv[i])
		} else {
			out[kv[i]] = kv[i+1]
		}
	}
	return out
}

func TestSeparateModeInstallVerifyUninstall(t *testing.T) {
	b := newBed(t)
	out := b.mustRun("install")
	if !strings.Contains(out, guardV1) {
		t.Errorf("install does not say which portguard it installed:\n%s", out)
	}
	b.wantFiles("after install", with(original, "portguard", guardV1))
	if out := b.mustRun("verify"); !strings.Contains(out, "OK: "+guardV1) || !strings.Contains(out, "mode separate") {
		t.Errorf("verify: %s", out)
	}
	b.mustRun("uninstall")
	b.wantFiles("after uninstall", original)
}

// Drop-in: the upstream portmap is saved, portguard takes its name, and uninstall puts the
// saved file back with a rename (same inode: no window where portmap is half written).
func TestDropInUninstallRestoresUpstreamAtomically(t *testing.T) {
	b := newBed(t)
	b.mustRun("install", "PORTGUARD_AS_PORTMAP=true")
	b.wantFiles("after install", with(original, "portguard", guardV1, "portmap", guardV1,
		"portmap.pre-portguard", upstream, ".portguard-as-portmap.sha256", "(marker)"))
	if out := b.mustRun("verify", "PORTGUARD_AS_PORTMAP=true"); !strings.Contains(out, "mode drop-in") {
		t.Errorf("verify: %s", out)
	}
	saved := inode(t, filepath.Join(b.bin, "portmap.pre-portguard"))
	b.mustRun("uninstall")
	b.wantFiles("after uninstall", original)
	if got := inode(t, filepath.Join(b.bin, "portmap")); got != saved {
		t.Errorf("portmap was restored by a copy (inode %d), not by renaming the saved file (inode %d)", got, saved)
	}
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Ino
}

// An upgrade replaces portguard under both names and keeps the upstream binary saved, even
// when the checksum marker was lost (the old drop-in is recognised by what it says it is).
func TestUpgradeKeepsTheUpstreamBackup(t *testing.T) {
	for _, lostMarker := range []bool{false, true} {
		t.Run(fmt.Sprintf("lostMarker=%v", lostMarker), func(t *testing.T) {
			b := newBed(t)
			b.mustRun("install", "PORTGUARD_AS_PORTMAP=true")
			if lostMarker {
				os.Remove(filepath.Join(b.bin, ".portguard-as-portmap.sha256"))
			}
			b.mustRun("install", "PORTGUARD_AS_PORTMAP=true", "PORTGUARD_SRC="+b.src["v2"])
			b.wantFiles("after upgrade", with(original, "portguard", guardV2, "portmap", guardV2,
				"portmap.pre-portguard", upstream, ".portguard-as-portmap.sha256", "(marker)"))
			b.mustRun("uninstall")
			b.wantFiles("after uninstall", original)
		})
	}
}

// Switching the mode back to separate restores upstream portmap and keeps portguard.
func TestRollbackFromDropIn(t *testing.T) {
	b := newBed(t)
	b.mustRun("install", "PORTGUARD_AS_PORTMAP=true")
	b.mustRun("install", "PORTGUARD_AS_PORTMAP=false")
	b.wantFiles("after rollback", with(original, "portguard", guardV1))
}

// A node without portmap before: uninstall removes portguard's portmap instead of restoring.
func TestDropInWithoutUpstream(t *testing.T) {
	b := newBed(t)
	os.Remove(filepath.Join(b.bin, "portmap"))
	b.mustRun("install", "PORTGUARD_AS_PORTMAP=true")
	b.wantFiles("after install", with(original, "portmap", guardV1, "portguard", guardV1, ".portguard-as-portmap.sha256", "(marker)"))
	b.mustRun("uninstall")
	b.wantFiles("after uninstall", with(original, "portmap", ""))
}

// verify fails, naming the file, when another installer overwrote the drop-in.
func TestVerifyReportsOverwrittenDropIn(t *testing.T) {
	b := newBed(t)
	b.mustRun("install", "PORTGUARD_AS_PORTMAP=true")
	fakePlugin(t, filepath.Join(b.bin, "portmap"), upstreamV2)
	out, err := b.run("verify", "PORTGUARD_AS_PORTMAP=true")
	if err == nil || !strings.Contains(out, "NOT OK: "+filepath.Join(b.bin, "portmap")+" is not portguard") {
		t.Fatalf("verify after overwrite: %v\n%s", err, out)
	}
	// Uninstall after such an overwrite leaves the newer upstream and drops the older copy.
	b.mustRun("uninstall")
	b.wantFiles("after uninstall", with(original, "portmap", upstreamV2))
}

// watch puts the drop-in back when a network plugin's installer copies its portmap over it,
// says so, and keeps the replacement as the file uninstall restores.
func TestWatchReassertsTheDropIn(t *testing.T) {
	b := newBed(t)
	c := exec.Command(shell, "install.sh", "watch")
	c.Env = append(os.Environ(), "CNI_BIN_DIR="+b.bin, "PORTGUARD_SRC="+b.src["v1"], "PORTGUARD_AS_PORTMAP=true", "PORTGUARD_WATCH_INTERVAL=1")
	var out syncBuffer
	c.Stdout, c.Stderr = &out, &out
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	defer c.Process.Kill()
	waitFor(t, &out, "watching")
	// What calico's install-cni does: copy its own portmap over the file.
	tmp := filepath.Join(b.bin, ".calico-tmp")
	fakePlugin(t, tmp, upstreamV2)
	if err := os.Rename(tmp, filepath.Join(b.bin, "portmap")); err != nil {
		t.Fatal(err)
	}
	os.Remove(filepath.Join(b.bin, "portguard"))
	waitFor(t, &out, "REASSERTED: "+filepath.Join(b.bin, "portmap"))
	waitFor(t, &out, "REASSERTED: "+filepath.Join(b.bin, "portguard"))
	b.wantFiles("after re-assertion", with(original, "portguard", guardV1, "portmap", guardV1,
		"portmap.pre-portguard", upstreamV2, ".portguard-as-portmap.sha256", "(marker)"))
	c.Process.Signal(syscall.SIGTERM)
	if err := c.Wait(); err != nil || !strings.Contains(out.String(), "stopping") {
		t.Errorf("watch did not stop cleanly on SIGTERM: %v\n%s", err, out.String())
	}
	b.mustRun("uninstall")
	b.wantFiles("after uninstall", with(original, "portmap", upstreamV2))
}

type syncBuffer struct {
	mu  chan struct{}
	buf bytes.Buffer
}

func (s *syncBuffer) lock() {
	if s.mu == nil {
		s.mu = make(chan struct{}, 1)
	}
	s.mu <- struct{}{}
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.lock()
	defer func() { <-s.mu }()
	return s.buf.Write(p)
}

func (s *syncBuffer) String() string {
	s.lock()
	defer func() { <-s.mu }()
	return s.buf.String()
}

func waitFor(t *testing.T, out *syncBuffer, want string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(out.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("no %q in watch's output:\n%s", want, out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A CNI directory that does not exist is refused, not created, and the reason reaches the
// termination log kubectl shows.
func TestRefusesAMissingCNIDirectory(t *testing.T) {
	b := newBed(t)
	missing := filepath.Join(t.TempDir(), "opt", "cni", "bin")
	termlog := filepath.Join(t.TempDir(), "termination-log")
	for _, cmd := range []string{"install", "watch", "uninstall"} {
		out, err := b.run(cmd, "CNI_BIN_DIR="+missing, "PORTGUARD_TERMINATION_LOG="+termlog)
		if err == nil || !strings.Contains(out, missing+" does not exist") {
			t.Errorf("%s into a missing directory: %v\n%s", cmd, err, out)
		}
		if _, err := os.Stat(missing); err == nil {
			t.Fatalf("%s created %s", cmd, missing)
		}
	}
	if data, _ := os.ReadFile(termlog); !strings.Contains(string(data), "does not exist") {
		t.Errorf("termination log: %q", data)
	}
}

// The directory can be given as an argument instead of CNI_BIN_DIR.
func TestDirectoryArgument(t *testing.T) {
	b := newBed(t)
	c := exec.Command(shell, "install.sh", "install", b.bin)
	c.Env = append(os.Environ(), "CNI_BIN_DIR=/nonexistent", "PORTGUARD_SRC="+b.src["v1"], "PORTGUARD_AS_PORTMAP=true")
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	b.wantFiles("after install", with(original, "portguard", guardV1, "portmap", guardV1,
		"portmap.pre-portguard", upstream, ".portguard-as-portmap.sha256", "(marker)"))
	c = exec.Command(shell, "install.sh", "uninstall", b.bin)
	c.Env = append(os.Environ(), "CNI_BIN_DIR=/nonexistent")
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	b.wantFiles("after uninstall", original)
}

func TestBadSettingsAreRefused(t *testing.T) {
	b := newBed(t)
	for _, env := range [][]string{{"PORTGUARD_AS_PORTMAP=maybe"}, {"PORTGUARD_WATCH_INTERVAL=0"}, {"PORTGUARD_WATCH_INTERVAL=5s"}, {"PORTGUARD_SRC=/nonexistent"}} {
		if out, err := b.run("install", env...); err == nil {
			t.Errorf("%v accepted:\n%s", env, out)
		}
		b.wantFiles(fmt.Sprint(env), original)
	}
	if out, err := b.run("frobnicate"); err == nil || !strings.Contains(out, "unknown command") {
		t.Errorf("unknown command: %v %s", err, out)
	}
}

// uninstall refuses while a network config still chains "type": "portguard".
func TestUninstallRefusesWhileAConflistUsesPortguard(t *testing.T) {
	b := newBed(t)
	b.mustRun("install")
	conf := t.TempDir()
	list := filepath.Join(conf, "10-flannel.conflist")
	os.WriteFile(list, []byte(`{"name":"cbr0","plugins":[{"type":"flannel"},{"type": "portguard","capabilities":{"portMappings":true}}]}`), 0o644)
	out, err := b.run("uninstall", "PORTGUARD_CNI_CONF_DIR="+conf)
	if err == nil || !strings.Contains(out, list) {
		t.Fatalf("uninstall with %s using portguard: %v\n%s", list, err, out)
	}
	b.wantFiles("after the refused uninstall", with(original, "portguard", guardV1))
	b.mustRun("uninstall", "PORTGUARD_CNI_CONF_DIR="+conf, "PORTGUARD_FORCE=true")
	b.wantFiles("after the forced uninstall", original)
}

// The manifests keep the settings a large fleet depends on (line checks of the committed
// files; manifest_test.go decodes them into k8s.io/api types and checks the CNI directories'
// hostPath types and what the agent relies on).
func TestManifestsFleetSettings(t *testing.T) {
	for file, want := range map[string][]string{
		"daemonset.yaml": {"type: Directory", "maxUnavailable: 10%", "maxSurge: 0", `args: ["watch"]`,
			`command: ["/install.sh", "verify"]`, "value: /dev/termination-log"},
		"uninstall.yaml": {"type: Directory", `args: ["uninstall"]`, "name: PORTGUARD_CNI_CONF_DIR"},
		// The downgrade runs in the node's network namespace, may change nf_tables, and takes
		// the plugin's lock and records from the host.
		"downgrade-nftables.yaml": {"hostNetwork: true", `add: ["NET_ADMIN"]`, "portguardctl export --to portmap-nftables",
			"value: /host/run/portguard.lock", "value: /host/run/portguard"},
	} {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		s := string(data)
		for _, w := range want {
			if !strings.Contains(s, w) {
				t.Errorf("%s: no %q", file, w)
			}
		}
	}
}

// doctor recognises a drop-in by the files install.sh leaves next to it.
func TestDropInLeavesTheFilesDoctorLooksFor(t *testing.T) {
	b := newBed(t)
	b.mustRun("install", "PORTGUARD_AS_PORTMAP=true")
	for _, name := range []string{doctor.DropInBackup, doctor.DropInMarker} {
		if _, err := os.Stat(filepath.Join(b.bin, name)); err != nil {
			t.Errorf("doctor looks for %s: %v", name, err)
		}
	}
}
