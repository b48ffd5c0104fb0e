// Package critest is an in-process CRI runtime for tests: a gRPC server on a unix socket
// that implements RuntimeService.ListPodSandbox from a set of sandboxes the test controls
// (every other method answers Unimplemented, as a runtime without them would). It stands in
// for containerd in the agent's unit and kernel tests; the real runtime is tested by the
// containerd harness.
package critest

import (
	"context"
	"net"
	"path/filepath"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Runtime is the fake runtime.
type Runtime struct {
	runtimeapi.UnimplementedRuntimeServiceServer
	// Endpoint is the socket, unix:///path.
	Endpoint string
	Socket   string

	mu        sync.Mutex
	sandboxes map[string]runtimeapi.PodSandboxState
	failing   bool
	calls     int
	srv       *grpc.Server
}

// Start serves a fake runtime on a socket in a test's temporary directory until the test
// ends.
func Start(t testing.TB) *Runtime {
	t.Helper()
	r := &Runtime{Socket: filepath.Join(t.TempDir(), "cri.sock"), sandboxes: map[string]runtimeapi.PodSandboxState{}}
	r.Endpoint = "unix://" + r.Socket
	if err := r.listen(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Stop)
	return r
}

func (r *Runtime) listen() error {
	ln, err := net.Listen("unix", r.Socket)
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	runtimeapi.RegisterRuntimeServiceServer(srv, r)
	r.mu.Lock()
	r.srv = srv
	r.mu.Unlock()
	go srv.Serve(ln)
	return nil
}

// Stop stops serving and removes the socket: the runtime is down.
func (r *Runtime) Stop() {
	r.mu.Lock()
	srv := r.srv
	r.srv = nil
	r.mu.Unlock()
	if srv != nil {
		srv.Stop()
	}
}

// Restart serves again on the same socket.
func (r *Runtime) Restart(t testing.TB) {
	t.Helper()
	if err := r.listen(); err != nil {
		t.Fatal(err)
	}
}

// Set makes the runtime know exactly these sandboxes, READY.
func (r *Runtime) Set(ids ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.sandboxes = map[string]runtimeapi.PodSandboxState{}
	for _, id := range ids {
		r.sandboxes[id] = runtimeapi.PodSandboxState_SANDBOX_READY
	}
}

// NotReady marks a known sandbox NOTREADY (stopped, not yet removed).
func (r *Runtime) NotReady(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.sandboxes[id] = runtimeapi.PodSandboxState_SANDBOX_NOTREADY
}

// Fail makes ListPodSandbox answer with an error (true) or normally (false).
func (r *Runtime) Fail(on bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.failing = on
}

// Calls counts ListPodSandbox calls served.
func (r *Runtime) Calls() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.calls
}

// ListPodSandbox implements the CRI method. A filter on state is honoured, as a runtime
// would, so a client that filtered would miss NOTREADY sandboxes here too.
func (r *Runtime) ListPodSandbox(_ context.Context, req *runtimeapi.ListPodSandboxRequest) (*runtimeapi.ListPodSandboxResponse, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls++
	if r.failing {
		return nil, status.Error(codes.Internal, "critest: failing on purpose")
	}
	resp := &runtimeapi.ListPodSandboxResponse{}
	for id, st := range r.sandboxes {
		if f := req.GetFilter(); f != nil && f.GetState() != nil && f.GetState().GetState() != st {
			continue
		}
		resp.Items = append(resp.Items, &runtimeapi.PodSandbox{Id: id, State: st, CreatedAt: 1,
			Metadata: &runtimeapi.PodSandboxMetadata{Name: id, Namespace: "default", Uid: id}})
	}
	return resp, nil
}
