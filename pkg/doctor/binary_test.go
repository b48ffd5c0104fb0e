package doctor

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func binaryFindings(rep Report) map[string]Finding {
	m := map[string]Finding{}
	for _, f := range rep.Findings {
		if f.Binary != nil {
			m[f.Binary.Type] = f
		}
	}
	return m
}

// Every plugin of the chain is named by what it says it is; portguard with version and commit.
func TestIdentifiesEveryPluginOfTheChain(t *testing.T) {
	f := newFake()
	f.conf("10-flannel.conflist", goodList)
	f.bin("flannel", "portmap")
	rep := Run(f.env())
	got := binaryFindings(rep)
	pm, fl := got["portmap"], got["flannel"]
	if pm.Binary == nil || pm.Binary.Kind != KindPortguard || pm.Binary.Version != "v0.1.0" || pm.Binary.Commit != "0123456789ab" ||
		pm.Severity != OK || !strings.Contains(pm.What, "/opt/cni/bin/portmap is portguard v0.1.0 (commit 0123456789ab) (installed as portmap: drop-in)") {
		t.Errorf("portmap: %+v %+v", pm, pm.Binary)
	}
	if fl.Binary == nil || fl.Binary.Kind != KindOther || fl.Severity != OK || !strings.Contains(fl.What, `"CNI flannel plugin v1.10.0"`) {
		t.Errorf("flannel: %+v %+v", fl, fl.Binary)
	}
}

// Builds from before the commit was stamped still count as portguard.
func TestOlderPortguardAboutLine(t *testing.T) {
	b := Identify("portmap", "/opt/cni/bin/portmap", "portguard 55c7c42 (CNI host ports without stale claims)")
	if b.Kind != KindPortguard || b.Version != "55c7c42" || b.Commit != "unknown" {
		t.Fatalf("%+v", b)
	}
	for _, about := range []string{"portguard ", "portguard", "portguard x", "portguard is great"} {
		if b := Identify("portmap", "/p", about); b.Kind != KindUnknown {
			t.Errorf("%q: %+v", about, b)
		}
	}
}

// A drop-in that a network plugin's installer overwrote with upstream portmap is an error
// whose fix puts portguard back and names the installer setting.
func TestOverwrittenDropIn(t *testing.T) {
	for _, leftover := range []string{DropInBackup, DropInMarker} {
		t.Run(leftover, func(t *testing.T) {
			f := newFake()
			f.conf("10-flannel.conflist", goodList)
			f.bin("flannel")
			f.aboutBin("portmap", "CNI portmap plugin v1.10.0")
			f.aboutBin(leftover, "x")
			only(t, Run(f.env()), "binary", "error", "/opt/cni/bin/portmap is upstream portmap", "something overwrote it",
				"make install AS_PORTMAP=1 CNI_BIN=/opt/cni/bin", "SKIP_CNI_BINARIES=portmap")
		})
	}
}

// Upstream portmap where portguard was never installed is a warning (host ports work).
func TestUpstreamPortmap(t *testing.T) {
	f := newFake()
	f.conf("10-flannel.conflist", goodList)
	f.bin("flannel")
	f.aboutBin("portmap", "CNI portmap plugin v1.10.0")
	rep := Run(f.env())
	only(t, rep, "binary", "warning", "upstream portmap", "make install AS_PORTMAP=1")
	if why := binaryFindings(rep)["portmap"].Why; !strings.Contains(why, "never removes a stale claim") {
		t.Errorf("why: %q", why)
	}
	if !rep.Healthy() {
		t.Error("upstream portmap made the report unhealthy")
	}
}

// A "portguard" that is not portguard, or a port plugin that says nothing recognisable.
func TestImpostors(t *testing.T) {
	list := strings.Replace(goodList, `"type": "portmap"`, `"type": "portguard"`, 1)
	for _, c := range []struct{ typ, list, about, sev, want string }{
		{"portguard", list, "CNI portmap plugin v1.10.0", "error", "/opt/cni/bin/portguard is upstream portmap"},
		{"portguard", list, "", "error", "/opt/cni/bin/portguard is unidentified"},
		{"portmap", goodList, "hello", "warning", `unidentified (it printed "hello")`},
	} {
		f := newFake()
		f.conf("10-flannel.conflist", c.list)
		f.bin("flannel")
		f.aboutBin(c.typ, c.about)
		only(t, Run(f.env()), "binary", c.sev, c.want)
	}
}

// RunAbout runs real binaries: without CNI_COMMAND (even when doctor's own environment has
// one), taking the first line, and killing one that does not exit.
func TestRunAboutWithFakeBinaries(t *testing.T) {
	dir := t.TempDir()
	script := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	t.Setenv("CNI_COMMAND", "ADD")
	old := aboutTimeout
	aboutTimeout = 500 * time.Millisecond
	t.Cleanup(func() { aboutTimeout = old })
	for _, c := range []struct{ name, body, want, err string }{
		{"portguard", `echo "portguard v0.2.0 (commit abcdefabcdef, go1.26.8): CNI host ports without stale claims" >&2; echo "CNI protocol versions supported: 1.1.0" >&2; exit 1`,
			"portguard v0.2.0 (commit abcdefabcdef, go1.26.8): CNI host ports without stale claims", ""},
		{"portmap", `echo; echo "CNI portmap plugin v1.10.0" >&2; exit 1`, "CNI portmap plugin v1.10.0", ""},
		{"env", `echo "CNI_COMMAND=[$CNI_COMMAND]"`, "CNI_COMMAND=[]", ""},
		{"silent", `exit 0`, "", "printed nothing"},
		{"hangs", `exec sleep 30`, "", "did not exit within"},
	} {
		start := time.Now()
		got, err := RunAbout(script(c.name, c.body))
		if got != c.want || (c.err == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), c.err)) {
			t.Errorf("%s: %q, %v; want %q, error %q", c.name, got, err, c.want, c.err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("%s: took %s", c.name, d)
		}
	}
	if _, err := RunAbout(filepath.Join(dir, "missing")); err == nil {
		t.Error("a missing binary ran")
	}
}

// doctor end to end over a real directory of fake binaries: the drop-in overwritten.
func TestDoctorOverRealBinaries(t *testing.T) {
	dir := t.TempDir()
	for name, about := range map[string]string{"flannel": "CNI flannel plugin v1.6.2", "portmap": "CNI portmap plugin v1.10.0", DropInBackup: "CNI portmap plugin v1.9.0"} {
		s := fmt.Sprintf("#!/bin/sh\necho '%s' >&2\nexit 1\n", about)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(s), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	f := newFake()
	f.conf("10-flannel.conflist", goodList)
	env := f.env()
	env.BinDirs, env.Stat, env.About = []string{dir}, os.Stat, RunAbout
	rep := Run(env)
	only(t, rep, "binary", "error", filepath.Join(dir, "portmap")+` is upstream portmap ("CNI portmap plugin v1.10.0")`, "drop-in")
	if fl := binaryFindings(rep)["flannel"]; fl.Binary == nil || fl.Binary.About != "CNI flannel plugin v1.6.2" {
		t.Errorf("flannel: %+v", fl)
	}
}
