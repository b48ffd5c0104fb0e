package main

// The launcher. Go's os/exec starts children with CLONE_VM, and the kernel carries the
// parent's RSS high-water mark into the child's ru_maxrss at execve. Started directly
// from the bench (tens of MiB of nat dumps), every plugin would "use" that much. So
// each plugin is started by a fresh copy of this binary in launcher mode: it runs the
// plugin, times it from start to exit, and writes the plugin's wait4 rusage to the file
// named by PGB_LAUNCH. The plugin's ru_maxrss then has the launcher's few MiB as floor.

import (
	"encoding/json"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const (
	envLaunch      = "PGB_LAUNCH"
	envLaunchNetns = "PGB_LAUNCH_NETNS" // the node namespace to run the plugin in, if not the launcher's
)

var launchSeq atomic.Int64

type launchResult struct {
	Ms     float64 `json:"ms"`
	RSSKiB int64   `json:"rss_kib"`
	RC     int     `json:"rc"`
	Err    string  `json:"err,omitempty"`
}

// launchMain runs os.Args[1] as the plugin; it never returns.
func launchMain(resFile string) {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, envLaunch+"=") && !strings.HasPrefix(kv, envLaunchNetns+"=") {
			env = append(env, kv)
		}
	}
	if p := os.Getenv(envLaunchNetns); p != "" {
		// The child is forked from this (locked) thread and so starts in its namespace;
		// entering it here keeps `ip netns exec` (and its mounts) out of the timed call.
		runtime.LockOSThread()
		fd, err := unix.Open(p, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err == nil {
			err = unix.Setns(fd, unix.CLONE_NEWNET)
		}
		if err != nil {
			b, _ := json.Marshal(launchResult{RC: 127, Err: "enter " + p + ": " + err.Error()})
			os.WriteFile(resFile, b, 0o644)
			os.Exit(0)
		}
	}
	cmd := &exec.Cmd{Path: os.Args[1], Args: os.Args[1:], Env: env, Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}
	start := time.Now()
	err := cmd.Run()
	r := launchResult{Ms: ms(time.Since(start))}
	if cmd.ProcessState != nil {
		r.RC = cmd.ProcessState.ExitCode()
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			r.RC = 128 + int(ws.Signal())
		}
		if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
			r.RSSKiB = ru.Maxrss
		}
	} else {
		r.RC, r.Err = 127, err.Error()
	}
	b, _ := json.Marshal(r)
	if err := os.WriteFile(resFile, b, 0o644); err != nil {
		os.Exit(125)
	}
	os.Exit(0)
}

func readLaunchResult(path string) (launchResult, error) {
	var r launchResult
	b, err := os.ReadFile(path)
	if err != nil {
		return r, err
	}
	return r, json.Unmarshal(b, &r)
}
