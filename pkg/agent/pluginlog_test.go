package agent

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// The follower counts only lines appended after it started, keeps a half-written line until
// its newline, and follows the log across a rename-and-create rotation (reading the rest of
// the old file first) and a truncation in place.
func TestPluginLogFollowsRotation(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "portguard.log")
	appendTo := func(p, s string) {
		t.Helper()
		f, err := os.OpenFile(p, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteString(s); err != nil {
			t.Fatal(err)
		}
	}
	counts := map[string]int{}
	pl := &PluginLog{Path: path, OnEvent: func(ev string) { counts[ev]++ }, OnError: func(err error) { t.Error(err) }}

	appendTo(path, `{"event":"takeover"}`+"\n")
	pl.Poll() // starts at the end: the line above is history
	appendTo(path, `{"event":"takeover"}`+"\n"+`not json`+"\n"+`{"event":"refu`)
	pl.Poll()
	if counts["takeover"] != 1 || counts["refused"] != 0 {
		t.Fatalf("after the first appends: %v, want one takeover and no refused yet", counts)
	}
	appendTo(path, `sed"}`+"\n")
	pl.Poll()
	if counts["refused"] != 1 {
		t.Fatalf("the completed line was not counted: %v", counts)
	}

	// logrotate's create: the writer appends to the old file once more, then the file is
	// renamed and a new one created.
	appendTo(path, `{"event":"gc"}`+"\n")
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	appendTo(path+".1", `{"event":"gc"}`+"\n")
	appendTo(path, `{"event":"takeover"}`+"\n")
	pl.Poll()
	if counts["gc"] != 2 || counts["takeover"] != 2 {
		t.Fatalf("across a rotation: %v, want 2 gc (old file) and 2 takeover (new file)", counts)
	}

	// copytruncate: the file is truncated in place and written again.
	if err := os.Truncate(path, 0); err != nil {
		t.Fatal(err)
	}
	appendTo(path, `{"event":"x"}`+"\n")
	pl.Poll()
	if counts["x"] != 1 {
		t.Fatalf("after a truncation: %v, want the new line counted", counts)
	}

	// A log that does not exist yet is read from its start once it appears.
	other := &PluginLog{Path: filepath.Join(dir, "later.log"), OnEvent: func(ev string) { counts[ev]++ }}
	other.Poll()
	appendTo(other.Path, `{"event":"late"}`+"\n")
	other.Poll()
	if counts["late"] != 1 {
		t.Fatalf("a log created after the start: %v", counts)
	}
}

// A plugin logFile event name outside the plugin's own is counted as "other": the label set
// stays bounded whatever a line holds.
func TestCountPluginEventBoundsLabels(t *testing.T) {
	m := NewMetrics()
	m.CountPluginEvent("takeover")
	m.CountPluginEvent("x\nanything")
	m.CountPluginEvent("another")
	if v := testutil.ToFloat64(m.PluginEvents.WithLabelValues("takeover")); v != 1 {
		t.Errorf("takeover counted %v, want 1", v)
	}
	if v := testutil.ToFloat64(m.PluginEvents.WithLabelValues("other")); v != 2 {
		t.Errorf("other counted %v, want 2", v)
	}
	if n := testutil.CollectAndCount(m.PluginEvents); n != len(PluginEventNames)+1 {
		t.Errorf("%d label values, want %d", n, len(PluginEventNames)+1)
	}
}
