package iptables

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/portguard/portguard/pkg/hostport"
)

// A child that hangs is killed once it had its xtables wait plus processDeadline, and the
// call fails saying so instead of holding the plugin forever.
func TestHungChildIsKilled(t *testing.T) {
	dir := t.TempDir()
	script := "#!/bin/sh\nexec sleep 30\n"
	if err := os.WriteFile(filepath.Join(dir, "iptables-restore"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
	old := processDeadline
	processDeadline = 200 * time.Millisecond
	t.Cleanup(func() { processDeadline = old })

	start := time.Now()
	err := (&Exec{WaitSeconds: 1}).Restore(hostport.V4, "*nat\nCOMMIT\n")
	if took := time.Since(start); took > 10*time.Second {
		t.Fatalf("Restore returned after %s: the hung child was not killed", took)
	}
	if err == nil || !strings.Contains(err.Error(), "did not finish within") {
		t.Fatalf("Restore of a hung child: %v, want an error saying it was killed", err)
	}
}
