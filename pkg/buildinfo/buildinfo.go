// Package buildinfo says which version and commit a binary was built from. The Makefile and
// deploy/Dockerfile stamp both in with
//
//	-ldflags "-X github.com/portguard/portguard/pkg/buildinfo.Version=v0.1.0
//	          -X github.com/portguard/portguard/pkg/buildinfo.Commit=<40 hex digits>"
//
// A binary built without them (go build, go install) falls back to what the Go toolchain
// records on its own (runtime/debug.ReadBuildInfo): the module version for `go install
// ...@v0.1.0`, and vcs.revision / vcs.modified for a build inside a git checkout.
package buildinfo

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"strings"
)

// Version and Commit are set at link time; empty means "ask the Go build info".
var (
	Version = ""
	Commit  = ""
)

// Info is what a binary knows about its own build.
type Info struct {
	// Version is a semver tag ("v0.1.0"), `git describe` output between tags
	// ("v0.1.0-3-gabcdef0", "-dirty" when built from a modified tree), or "dev".
	Version string `json:"version"`
	// Commit is the full git commit hash, "unknown" when neither ldflags nor the Go build
	// info carry one.
	Commit string `json:"commit"`
	// Modified: the Go build info says the tree had uncommitted changes (only known when the
	// commit came from the build info).
	Modified bool `json:"modified,omitempty"`
	// GoVersion is the toolchain that built the binary ("go1.26.8").
	GoVersion string `json:"goVersion"`
}

// readBuildInfo is debug.ReadBuildInfo; tests replace it.
var readBuildInfo = debug.ReadBuildInfo

// Get returns the build's version and commit: the ldflags values where set, else the Go
// build info's, else "dev" / "unknown".
func Get() Info {
	i := Info{Version: Version, Commit: Commit, GoVersion: runtime.Version()}
	if bi, ok := readBuildInfo(); ok {
		if i.Version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			i.Version = bi.Main.Version
		}
		if i.Commit == "" {
			for _, s := range bi.Settings {
				switch s.Key {
				case "vcs.revision":
					i.Commit = s.Value
				case "vcs.modified":
					i.Modified = s.Value == "true"
				}
			}
		}
	}
	if i.Version == "" {
		i.Version = "dev"
	}
	if i.Commit == "" {
		i.Commit = "unknown"
		i.Modified = false
	}
	return i
}

// String is one line: "v0.1.0 (commit 0123456789ab, go1.26.8)", with ", modified" after
// the commit when the Go build info says the tree was dirty.
func (i Info) String() string {
	c := i.Commit
	if len(c) > 12 && !strings.Contains(c, " ") {
		c = c[:12]
	}
	mod := ""
	if i.Modified {
		mod = ", modified"
	}
	return fmt.Sprintf("%s (commit %s%s, %s)", i.Version, c, mod, i.GoVersion)
}

// aboutTail follows the version in the plugin's about line.
const aboutTail = ": CNI host ports without stale claims"

// About is the line the portguard plugin prints on stderr when run without CNI_COMMAND (as
// every containernetworking plugin prints its own, e.g. "CNI portmap plugin v1.10.0"):
// "portguard v0.1.0 (commit 0123456789ab, go1.26.8): CNI host ports without stale claims".
// ParseAbout reads it back.
func About() string { return "portguard " + Get().String() + aboutTail }

// ParseAbout reads the version and (short) commit out of a line About wrote; ok is false for
// any other line (upstream portmap's, or a foreign binary's).
func ParseAbout(line string) (version, commit string, ok bool) {
	rest, found := strings.CutPrefix(strings.TrimSpace(line), "portguard ")
	if !found {
		return "", "", false
	}
	version, rest, found = strings.Cut(rest, " (commit ")
	if !found || version == "" || strings.ContainsAny(version, " \t") {
		return "", "", false
	}
	commit, _, found = strings.Cut(rest, ",")
	if !found || commit == "" {
		return "", "", false
	}
	return version, commit, true
}
