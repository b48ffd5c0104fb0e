package testbed

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

// AgentBinary returns portguard-agent: $PORTGUARD_BIN_DIR's, else one built from the tree
// once per test process.
func AgentBinary(t testing.TB) string {
	t.Helper()
	agentOnce.Do(func() {
		if d := os.Getenv("PORTGUARD_BIN_DIR"); d != "" && isExecutable(filepath.Join(d, "portguard-agent")) {
			agentPath = filepath.Join(d, "portguard-agent")
			return
		}
		agentPath, agentErr = buildTree("./cmd/portguard-agent", "portguard-agent")
	})
	if agentErr != nil {
		t.Fatalf("portguard-agent binary unavailable: %v", agentErr)
	}
	return agentPath
}

var (
	agentOnce sync.Once
	agentPath string
	agentErr  error
)

// AgentEvent is one JSON line of the agent's log, with every key kept in Fields.
type AgentEvent struct {
	Event  string
	Fields map[string]json.RawMessage
}

// Str returns a string field ("" when absent or not a string).
func (e AgentEvent) Str(key string) string {
	var s string
	_ = json.Unmarshal(e.Fields[key], &s)
	return s
}

// Agent is a portguard-agent running in the bed's node namespace with the bed's environment
// (lock file, portguard's records, the libcni cache); it is stopped by the bed's cleanup.
type Agent struct {
	Bed    *Bed
	Cmd    *exec.Cmd
	Events chan AgentEvent // every log line, in order (buffered; lines beyond it are dropped)
	Listen string          // the --listen address inside the node namespace

	mu    sync.Mutex
	lines []string
	done  chan struct{}
}

// StartAgent starts portguard-agent in the node namespace with args (add --listen to choose
// the address; default 127.0.0.1:9617) and env appended to the bed's environment.
func (b *Bed) StartAgent(env []string, args ...string) *Agent {
	b.T.Helper()
	return b.StartAgentIn([]string{"ip", "netns", "exec", b.Node}, env, args...)
}

// StartAgentIn is StartAgent with another command prefix that runs the agent inside the
// node namespace, e.g. nsenter into a container runtime's mount namespace as well (test/cri),
// so the agent sees the pods' network namespaces the runtime mounted there.
func (b *Bed) StartAgentIn(prefix, env []string, args ...string) *Agent {
	b.T.Helper()
	a := &Agent{Bed: b, Events: make(chan AgentEvent, 4096), Listen: "127.0.0.1:9617", done: make(chan struct{})}
	hasListen := false
	for i, arg := range args {
		if arg == "--listen" && i+1 < len(args) {
			a.Listen, hasListen = args[i+1], true
		}
	}
	if !hasListen {
		args = append(args, "--listen", a.Listen)
	}
	cmd := exec.Command(prefix[0], append(append(prefix[1:len(prefix):len(prefix)], AgentBinary(b.T)), args...)...)
	cmd.Env = append(append(os.Environ(), b.Env...), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		b.T.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.T.Fatal(err)
	}
	a.Cmd = cmd
	b.mu.Lock()
	b.procs = append(b.procs, cmd)
	b.mu.Unlock()
	go func() {
		defer close(a.done)
		defer close(a.Events)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			l := sc.Text()
			a.mu.Lock()
			a.lines = append(a.lines, l)
			a.mu.Unlock()
			var f map[string]json.RawMessage
			if json.Unmarshal([]byte(l), &f) != nil {
				continue
			}
			ev := AgentEvent{Fields: f}
			_ = json.Unmarshal(f["event"], &ev.Event)
			select {
			case a.Events <- ev:
			default:
			}
		}
	}()
	b.T.Cleanup(func() {
		a.Stop()
		if b.T.Failed() {
			b.T.Logf("portguard-agent log:\n%s", a.Log())
		}
	})
	return a
}

// Log returns every line the agent wrote so far.
func (a *Agent) Log() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := ""
	for _, l := range a.lines {
		out += l + "\n"
	}
	return out
}

// Stop sends SIGTERM and waits for the agent to exit (its exit status is returned; -1 when
// it had to be killed).
func (a *Agent) Stop() int {
	if a.Cmd.ProcessState != nil {
		return a.Cmd.ProcessState.ExitCode()
	}
	_ = a.Cmd.Process.Signal(syscall.SIGTERM)
	exited := make(chan struct{})
	go func() { _ = a.Cmd.Wait(); close(exited) }()
	select {
	case <-exited:
	case <-time.After(15 * time.Second):
		_ = syscall.Kill(-a.Cmd.Process.Pid, syscall.SIGKILL)
		<-exited
		return -1
	}
	return a.Cmd.ProcessState.ExitCode()
}

// Wait waits up to timeout for the agent to exit by itself and returns its exit status
// (-1 when it did not exit: it is then killed).
func (a *Agent) Wait(timeout time.Duration) int {
	exited := make(chan struct{})
	go func() { _ = a.Cmd.Wait(); close(exited) }()
	select {
	case <-exited:
		return a.Cmd.ProcessState.ExitCode()
	case <-time.After(timeout):
		_ = syscall.Kill(-a.Cmd.Process.Pid, syscall.SIGKILL)
		<-exited
		return -1
	}
}

// Next returns the next event named one of names, failing the test after timeout.
func (a *Agent) Next(timeout time.Duration, names ...string) AgentEvent {
	a.Bed.T.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case ev, ok := <-a.Events:
			if !ok {
				a.Bed.T.Fatalf("portguard-agent exited while waiting for %v", names)
			}
			for _, n := range names {
				if ev.Event == n {
					return ev
				}
			}
		case <-deadline:
			a.Bed.T.Fatalf("no %v event from portguard-agent within %v", names, timeout)
		}
	}
}

// Get fetches path (/metrics, /healthz) from the agent inside the node namespace: the
// connection is made in that namespace, the request written on it by hand (net/http's
// transport would dial from another thread, outside the namespace).
func (a *Agent) Get(path string) (int, string, error) {
	var conn net.Conn
	err := inNetns(a.Bed.Node, func() error {
		var err error
		conn, err = net.DialTimeout("tcp", a.Listen, Timeout)
		return err
	})
	if err != nil {
		return 0, "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	req, err := http.NewRequest("GET", "http://"+a.Listen+path, nil)
	if err != nil {
		return 0, "", err
	}
	req.Close = true
	if err := req.Write(conn); err != nil {
		return 0, "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, "", fmt.Errorf("read %s: %w", path, err)
	}
	return resp.StatusCode, string(body), nil
}
