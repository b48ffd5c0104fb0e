package main

// The iptables PATH shim. The shim directory holds symlinks named iptables,
// iptables-restore, ip6tables, ... pointing at this very binary. When started under
// such a name with PGB_SHIM_LOG set, the binary runs the real command (found on PATH
// after the shim directory) as a child, waits for it, appends one JSON line to the log
// (name, args, duration, child's peak RSS, exit code) and exits with the child's status.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

const (
	envShimLog = "PGB_SHIM_LOG"
	envShimDir = "PGB_SHIM_DIR"
)

var shimNames = []string{
	"iptables", "iptables-save", "iptables-restore", "iptables-legacy", "iptables-nft",
	"iptables-nft-save", "iptables-nft-restore", "iptables-legacy-save", "iptables-legacy-restore",
	"ip6tables", "ip6tables-save", "ip6tables-restore", "ip6tables-legacy", "ip6tables-nft",
	"ip6tables-nft-save", "ip6tables-nft-restore", "ip6tables-legacy-save", "ip6tables-legacy-restore",
	"nft", // upstream's nftables backend (knftables runs the nft binary)
}

// shimRecord is one line of the shim log.
type shimRecord struct {
	Name   string   `json:"name"`
	Args   []string `json:"args"`
	Ms     float64  `json:"ms"`
	RSSKiB int64    `json:"rss_kib"`
	RC     int      `json:"rc"`
	Stdin  string   `json:"stdin,omitempty"` // restore payloads, truncated
}

func isShimName(base string) bool {
	return strings.HasPrefix(base, "iptables") || strings.HasPrefix(base, "ip6tables") || base == "nft"
}

// makeShimDir fills dir with symlinks to self for every iptables* / ip6tables* name.
func makeShimDir(dir, self string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, n := range shimNames {
		if err := os.Symlink(self, filepath.Join(dir, n)); err != nil && !errors.Is(err, os.ErrExist) {
			return err
		}
	}
	return nil
}

// findReal looks name up on PATH, skipping the shim directory.
func findReal(name, shimDir string) (string, error) {
	shimDir = filepath.Clean(shimDir)
	for _, d := range filepath.SplitList(os.Getenv("PATH")) {
		if d == "" || filepath.Clean(d) == shimDir {
			continue
		}
		p := filepath.Join(d, name)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: not found on PATH outside %s", name, shimDir)
}

// shimMain runs as the shim; it never returns.
func shimMain() {
	name := filepath.Base(os.Args[0])
	real, err := findReal(name, os.Getenv(envShimDir))
	if err != nil {
		fmt.Fprintln(os.Stderr, "pgb shim:", err)
		os.Exit(127)
	}
	cmd := &exec.Cmd{Path: real, Args: os.Args, Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}
	var payload []byte
	if strings.Contains(name, "restore") || name == "nft" && slices.Contains(os.Args[1:], "-") {
		// Keep the payload for the report; read it before the clock starts.
		payload, _ = io.ReadAll(os.Stdin)
		cmd.Stdin = bytes.NewReader(payload)
	}
	start := time.Now()
	err = cmd.Run()
	rec := shimRecord{Name: name, Args: os.Args[1:], Ms: ms(time.Since(start))}
	if len(payload) > 4000 {
		payload = append(payload[:4000:4000], "…"...)
	}
	rec.Stdin = string(payload)
	if cmd.ProcessState != nil {
		if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
			rec.RSSKiB = ru.Maxrss
		}
		rec.RC = cmd.ProcessState.ExitCode()
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			rec.RC = 128 + int(ws.Signal())
		}
	} else if err != nil {
		rec.RC = 127
	}
	if line, jerr := json.Marshal(rec); jerr == nil {
		// One write with O_APPEND: lines from parallel shims never interleave.
		if f, ferr := os.OpenFile(os.Getenv(envShimLog), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644); ferr == nil {
			f.Write(append(line, '\n'))
			f.Close()
		}
	}
	os.Exit(rec.RC)
}

// readShimLog parses a shim log; a missing file means no process was started.
func readShimLog(path string) ([]shimRecord, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var recs []shimRecord
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var r shimRecord
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			return nil, fmt.Errorf("%s: %v", path, err)
		}
		recs = append(recs, r)
	}
	return recs, sc.Err()
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
