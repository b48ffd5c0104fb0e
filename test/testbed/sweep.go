package testbed

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// Every bed records its owner process in ownerDir/<bed id>, so a later test process can remove
// what a killed one (e.g. by `go test -timeout`) left behind: namespaces named pge-<id>-* and
// the processes running in them.
var ownerDir = filepath.Join(os.TempDir(), "pge-owners")

func recordOwner(id string) {
	_ = os.MkdirAll(ownerDir, 0o755)
	_ = os.WriteFile(filepath.Join(ownerDir, id), []byte(strconv.Itoa(os.Getpid())), 0o644)
}

func forgetOwner(id string) { _ = os.Remove(filepath.Join(ownerDir, id)) }

// SweepStale deletes the namespaces (and kills their processes) of beds whose owner process
// is gone. Beds of live test processes, including other packages running in parallel, are
// left alone. Main calls it before running the tests.
func SweepStale() {
	entries, err := os.ReadDir(ownerDir)
	if err != nil {
		return
	}
	nsEntries, _ := os.ReadDir("/var/run/netns")
	for _, e := range entries {
		id := e.Name()
		data, err := os.ReadFile(filepath.Join(ownerDir, id))
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
		if err == nil && pid > 0 && syscall.Kill(pid, 0) == nil {
			continue // owner alive (a pid reused by another process keeps the bed: harmless)
		}
		for _, ns := range nsEntries {
			if !strings.HasPrefix(ns.Name(), "pge-"+id+"-") {
				continue
			}
			if out, err := exec0("ip", "netns", "pids", ns.Name()); err == nil {
				for _, f := range strings.Fields(out) {
					if p, err := strconv.Atoi(f); err == nil && p > 1 {
						_ = syscall.Kill(p, syscall.SIGKILL)
					}
				}
			}
			_ = run(nil, "ip", "netns", "del", ns.Name())
		}
		forgetOwner(id)
	}
}

func exec0(args ...string) (string, error) {
	out, _, err := runOut(nil, nil, args...)
	return out, err
}
