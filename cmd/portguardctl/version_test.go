package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/buildinfo"
)

const testCommit = "0123456789abcdef0123456789abcdef01234567"

func TestVersionNamesVersionAndCommit(t *testing.T) {
	oldV, oldC := buildinfo.Version, buildinfo.Commit
	t.Cleanup(func() { buildinfo.Version, buildinfo.Commit = oldV, oldC })
	buildinfo.Version, buildinfo.Commit = "v1.2.3", testCommit
	for _, args := range [][]string{{"version"}, {"--version"}, {"version", "-o", "text"}} {
		out, errs, code := runCLI(args...)
		if code != 0 || errs != "" || !strings.HasPrefix(out, "portguardctl v1.2.3 (commit 0123456789ab, go") {
			t.Errorf("%v: exit %d stderr %q stdout %q", args, code, errs, out)
		}
	}
	out, _, code := runCLI("version", "-o", "json")
	var info buildinfo.Info
	if code != 0 || json.Unmarshal([]byte(out), &info) != nil || info.Version != "v1.2.3" || info.Commit != testCommit || info.GoVersion == "" {
		t.Errorf("version -o json: exit %d %q", code, out)
	}
	// --help is the help, not the version.
	out, _, code = runCLI("version", "--help")
	if code != 0 || strings.Contains(out, "v1.2.3") || !strings.HasPrefix(out, "Usage: portguardctl version") {
		t.Errorf("version --help: exit %d %q", code, out)
	}
}

// The Makefile's linker flags reach pkg/buildinfo in both binaries: -X on a symbol that does
// not exist is silently ignored by the linker, so a renamed variable would only show here.
func TestStampedBuildsReportVersionAndCommit(t *testing.T) {
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	ld, err := exec.Command("make", "-s", "-C", root, "ldflags", "VERSION=v9.8.7", "COMMIT="+testCommit).Output()
	if err != nil {
		t.Fatalf("make ldflags: %v", err)
	}
	dir := t.TempDir()
	for _, pkg := range []string{"./cmd/portguardctl", "./plugins/portguard"} {
		b := exec.Command("go", "build", "-ldflags", strings.TrimSpace(string(ld)), "-o", dir, pkg)
		b.Dir = root
		b.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := b.CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", pkg, err, out)
		}
	}
	out, err := exec.Command(filepath.Join(dir, "portguardctl"), "version").Output()
	if err != nil || !strings.HasPrefix(string(out), "portguardctl v9.8.7 (commit 0123456789ab, go") {
		t.Errorf("portguardctl version: %v %q", err, out)
	}
	// The plugin, run without CNI_COMMAND, prints its about line on stderr (what doctor and
	// deploy/install.sh read).
	plugin := exec.Command(filepath.Join(dir, "portguard"))
	plugin.Env = []string{"PATH=/usr/bin:/bin"}
	stderr, _ := plugin.CombinedOutput()
	first, _, _ := strings.Cut(string(stderr), "\n")
	if v, c, ok := buildinfo.ParseAbout(first); !ok || v != "v9.8.7" || c != testCommit[:12] {
		t.Errorf("plugin about line %q: %q %q %v", first, v, c, ok)
	}
}
