package buildinfo

import (
	"runtime/debug"
	"strings"
	"testing"
)

func withBuild(t *testing.T, version, commit string, bi *debug.BuildInfo) {
	t.Helper()
	oldV, oldC, oldR := Version, Commit, readBuildInfo
	t.Cleanup(func() { Version, Commit, readBuildInfo = oldV, oldC, oldR })
	Version, Commit = version, commit
	readBuildInfo = func() (*debug.BuildInfo, bool) { return bi, bi != nil }
}

func goBuild(mainVersion, revision, modified string) *debug.BuildInfo {
	bi := &debug.BuildInfo{Main: debug.Module{Path: "github.com/portguard/portguard", Version: mainVersion}}
	if revision != "" {
		bi.Settings = append(bi.Settings, debug.BuildSetting{Key: "vcs.revision", Value: revision},
			debug.BuildSetting{Key: "vcs.modified", Value: modified})
	}
	return bi
}

const rev = "0123456789abcdef0123456789abcdef01234567"

func TestLdflagsWin(t *testing.T) {
	withBuild(t, "v1.2.3", rev, goBuild("v9.9.9", "ffffffffffffffffffffffffffffffffffffffff", "true"))
	i := Get()
	if i.Version != "v1.2.3" || i.Commit != rev || i.Modified {
		t.Fatalf("%+v", i)
	}
	if s := i.String(); !strings.HasPrefix(s, "v1.2.3 (commit 0123456789ab, go") {
		t.Fatalf("String() = %q", s)
	}
}

func TestFallbackToGoBuildInfo(t *testing.T) {
	withBuild(t, "", "", goBuild("(devel)", rev, "true"))
	i := Get()
	if i.Version != "dev" || i.Commit != rev || !i.Modified {
		t.Fatalf("%+v", i)
	}
	if s := i.String(); !strings.Contains(s, "commit 0123456789ab, modified, go") {
		t.Fatalf("String() = %q", s)
	}
	// go install github.com/portguard/portguard/plugins/portguard@v0.2.0: module version, no vcs.
	withBuild(t, "", "", goBuild("v0.2.0", "", ""))
	if i := Get(); i.Version != "v0.2.0" || i.Commit != "unknown" {
		t.Fatalf("%+v", i)
	}
}

func TestNothingKnown(t *testing.T) {
	withBuild(t, "", "", nil)
	if i := Get(); i.Version != "dev" || i.Commit != "unknown" || i.GoVersion == "" {
		t.Fatalf("%+v", i)
	}
}

func TestAboutRoundTrip(t *testing.T) {
	withBuild(t, "v0.3.0-2-gabcdef0-dirty", rev, nil)
	v, c, ok := ParseAbout(About() + "\n")
	if !ok || v != "v0.3.0-2-gabcdef0-dirty" || c != rev[:12] {
		t.Fatalf("ParseAbout(%q) = %q %q %v", About(), v, c, ok)
	}
	for _, other := range []string{"CNI portmap plugin v1.10.0", "CNI portmap plugin version unknown", "portguard", "portguard dev", ""} {
		if _, _, ok := ParseAbout(other); ok {
			t.Errorf("ParseAbout(%q) accepted a line About never writes", other)
		}
	}
}
