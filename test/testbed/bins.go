package testbed

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// Bins are the executables a test bed uses. Paths are absolute.
type Bins struct {
	Portguard string // the plugin under test ($PORTGUARD_BIN_DIR/portguard)
	Ctl       string // portguardctl ($PORTGUARD_BIN_DIR/portguardctl), built on first use otherwise
	Portmap   string // upstream portmap v1.10.0
	Bridge    string // upstream bridge
	HostLocal string // upstream host-local
	Cnitool   string // cnitool v1.3.0
}

var (
	binsMu        sync.Mutex
	bins          *Bins
	portguardErr  error // why the portguard binary is unusable (build failure), if it is
	buildTempDirs []string
)

// RepoRoot returns the root of the portguard module (the directory holding go.mod).
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil &&
			strings.Contains(string(b), "module github.com/portguard/portguard") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("testbed: cannot find the portguard module root (go.mod) above the working directory")
		}
		dir = parent
	}
}

func upstreamDir() string {
	if d := os.Getenv("PORTGUARD_UPSTREAM_DIR"); d != "" {
		return d
	}
	if out, err := exec.Command("go", "env", "GOPATH").Output(); err == nil {
		if gp := strings.TrimSpace(string(out)); gp != "" {
			return filepath.Join(filepath.SplitList(gp)[0], "bin")
		}
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, "go", "bin")
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

// locate finds the binaries. The portguard binary comes from $PORTGUARD_BIN_DIR (the Makefile
// exports it after `make build`); when that is unset or holds no binary, it is built from the
// working tree into a temporary directory (once per test process), so `go test ./test/...`
// never runs a stale bin/portguard.
func locate() (*Bins, error) {
	binsMu.Lock()
	defer binsMu.Unlock()
	if bins != nil {
		return bins, nil
	}
	up := upstreamDir()
	b := &Bins{
		Portmap:   filepath.Join(up, "portmap"),
		Bridge:    filepath.Join(up, "bridge"),
		HostLocal: filepath.Join(up, "host-local"),
		Cnitool:   filepath.Join(up, "cnitool"),
	}
	var missing []string
	for _, p := range []string{b.Portmap, b.Bridge, b.HostLocal, b.Cnitool} {
		if !isExecutable(p) {
			missing = append(missing, p)
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("upstream CNI tools missing (run `make deps`; PORTGUARD_UPSTREAM_DIR=%s): %s",
			up, strings.Join(missing, ", "))
	}
	if d := os.Getenv("PORTGUARD_BIN_DIR"); d != "" && isExecutable(filepath.Join(d, "portguard")) {
		b.Portguard = filepath.Join(d, "portguard")
	} else {
		p, err := BuildPortguard()
		if err != nil {
			portguardErr = err
		}
		b.Portguard = p
	}
	bins = b
	return bins, nil
}

// BuildPortguard builds ./plugins/portguard from the working tree into a fresh temporary
// directory and returns the binary's path.
func BuildPortguard() (string, error) { return buildTree("./plugins/portguard", "portguard") }

// ctlBinary returns portguardctl: $PORTGUARD_BIN_DIR's, else one built from the tree once
// per test process.
func ctlBinary() (string, error) {
	ctlOnce.Do(func() {
		if d := os.Getenv("PORTGUARD_BIN_DIR"); d != "" && isExecutable(filepath.Join(d, "portguardctl")) {
			ctlPath = filepath.Join(d, "portguardctl")
			return
		}
		ctlPath, ctlErr = buildTree("./cmd/portguardctl", "portguardctl")
	})
	return ctlPath, ctlErr
}

var (
	ctlOnce sync.Once
	ctlPath string
	ctlErr  error
)

// buildTree builds pkg from the working tree into a fresh temporary directory.
func buildTree(pkg, name string) (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp("", "pge-bin-")
	if err != nil {
		return "", err
	}
	buildTempDirs = append(buildTempDirs, dir)
	out := filepath.Join(dir, name)
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Dir = root
	if msg, err := cmd.CombinedOutput(); err != nil {
		return out, fmt.Errorf("building %s failed: %v\n%s", pkg, err, msg)
	}
	return out, nil
}

// Binaries returns the located binaries, skipping the test when the environment cannot run
// the test bed (see Require).
func Binaries(t testing.TB) *Bins {
	t.Helper()
	Require(t)
	b, err := locate()
	if err != nil {
		skipOrFail(t, err.Error())
	}
	return b
}

// PortguardBinary returns the plugin under test and fails the test when it could not be built.
func PortguardBinary(t testing.TB) string {
	t.Helper()
	b := Binaries(t)
	binsMu.Lock()
	err := portguardErr
	binsMu.Unlock()
	if err != nil {
		t.Fatalf("portguard binary unavailable: %v", err)
	}
	return b.Portguard
}

var requiredTools = []string{"ip", "iptables", "ip6tables", "iptables-save", "ip6tables-save",
	"iptables-restore", "ip6tables-restore", "socat", "sh", "mount"}

// Require skips the test when it cannot run here: not root, or system tools missing. With
// PORTGUARD_E2E_REQUIRED=1 in the environment, those conditions fail the test instead, so CI
// cannot silently skip the kernel tests.
func Require(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		skipOrFail(t, "test bed needs root (network namespaces, iptables)")
	}
	var missing []string
	for _, c := range requiredTools {
		if _, err := exec.LookPath(c); err != nil {
			missing = append(missing, c)
		}
	}
	if len(missing) > 0 {
		skipOrFail(t, "test bed needs these tools on PATH (run `make deps`): "+strings.Join(missing, ", "))
	}
}

func skipOrFail(t testing.TB, reason string) {
	t.Helper()
	if os.Getenv("PORTGUARD_E2E_REQUIRED") == "1" {
		t.Fatal(reason)
	}
	t.Skip(reason)
}

// Main is a TestMain helper: it raises -test.parallel to 4 unless the caller set it (the test
// bed waits on processes more than it computes), runs the tests and removes build leftovers.
//
//	func TestMain(m *testing.M) { os.Exit(testbed.Main(m)) }
func Main(m *testing.M) int {
	flag.Parse()
	set := false
	flag.Visit(func(f *flag.Flag) {
		if f.Name == "test.parallel" {
			set = true
		}
	})
	if !set {
		_ = flag.Set("test.parallel", "4")
	}
	if os.Geteuid() == 0 {
		SweepStale()
	}
	code := m.Run()
	binsMu.Lock()
	for _, d := range buildTempDirs {
		os.RemoveAll(d)
	}
	binsMu.Unlock()
	return code
}

var (
	extraMu   sync.Mutex
	extraBins = map[string]string{}
	extraDir  string
)

// ExtraPluginVersion is the containernetworking/plugins version go-installed for plugins that
// are not in PORTGUARD_UPSTREAM_DIR.
const ExtraPluginVersion = "v1.10.0"

var extraPkgs = map[string]string{
	"firewall":  "meta/firewall",
	"tuning":    "meta/tuning",
	"bandwidth": "meta/bandwidth",
	"sbr":       "meta/sbr",
	"loopback":  "main/loopback",
	"ptp":       "main/ptp",
	"macvlan":   "main/macvlan",
	"static":    "ipam/static",
	"dhcp":      "ipam/dhcp",
}

// ExtraPlugin returns the path of another upstream plugin (firewall, tuning, bandwidth, ...):
// from PORTGUARD_UPSTREAM_DIR when it is there, else `go install`ed (containernetworking/
// plugins ExtraPluginVersion) into a temporary directory once per test process.
func ExtraPlugin(t testing.TB, name string) string {
	t.Helper()
	if p := filepath.Join(upstreamDir(), name); isExecutable(p) {
		return p
	}
	extraMu.Lock()
	defer extraMu.Unlock()
	if p, ok := extraBins[name]; ok {
		return p
	}
	pkg, ok := extraPkgs[name]
	if !ok {
		t.Fatalf("testbed: unknown upstream plugin %q", name)
	}
	if extraDir == "" {
		d, err := os.MkdirTemp("", "pge-extra-")
		if err != nil {
			t.Fatal(err)
		}
		extraDir = d
		binsMu.Lock()
		buildTempDirs = append(buildTempDirs, d)
		binsMu.Unlock()
	}
	cmd := exec.Command("go", "install", "github.com/containernetworking/plugins/plugins/"+pkg+"@"+ExtraPluginVersion)
	cmd.Dir = extraDir // outside any module
	cmd.Env = append(os.Environ(), "GOBIN="+extraDir, "GOFLAGS=")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("testbed: plugin %s is not in %s and `go install` failed: %v\n%s", name, upstreamDir(), err, out)
	}
	p := filepath.Join(extraDir, name)
	extraBins[name] = p
	return p
}

// InstallExtraPlugins puts upstream plugins (see ExtraPlugin) into the bed's CNI_PATH.
func (b *Bed) InstallExtraPlugins(names ...string) {
	b.T.Helper()
	for _, n := range names {
		b.InstallPlugin(n, ExtraPlugin(b.T, n))
	}
}
