// Package cri asks a container runtime which pod sandboxes exist, over the Kubernetes CRI
// (k8s.io/cri-api v1 RuntimeService.ListPodSandbox, gRPC on a unix socket), as kubelet does.
// The node agent uses it to tell a claim whose pod is gone from one whose pod the runtime
// still knows. The CNI container ID of a pod's network attachment is its sandbox ID.
package cri

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// DefaultEndpoints are the standard sockets of containerd and CRI-O, in the order the
// default endpoint is chosen.
var DefaultEndpoints = []string{
	"unix:///run/containerd/containerd.sock",
	"unix:///var/run/crio/crio.sock",
}

// maxMsgSize is kubelet's limit for CRI responses (16 MiB): a node with many sandboxes
// answers ListPodSandbox with more than gRPC's 4 MiB default.
const maxMsgSize = 16 << 20

// DefaultEndpoint returns the first of DefaultEndpoints whose socket exists, or the first
// of them when none does (the agent then reports the runtime unavailable each pass and
// removes nothing, until the runtime starts).
func DefaultEndpoint() string {
	for _, e := range DefaultEndpoints {
		if _, err := os.Stat(socketPath(e)); err == nil {
			return e
		}
	}
	return DefaultEndpoints[0]
}

func socketPath(endpoint string) string { return strings.TrimPrefix(endpoint, "unix://") }

// ValidEndpoint checks an endpoint's form: unix:// and an absolute path.
func ValidEndpoint(endpoint string) error {
	if !strings.HasPrefix(endpoint, "unix:///") {
		return fmt.Errorf("runtime endpoint %q: want unix:///path/to/socket", endpoint)
	}
	return nil
}

// Client is a connection to one runtime. gRPC connects lazily and reconnects by itself,
// so one Client serves the agent's whole life, across runtime restarts.
type Client struct {
	Endpoint string
	conn     *grpc.ClientConn
	rt       runtimeapi.RuntimeServiceClient
}

// Dial returns a client of the runtime at endpoint (unix:///path). It does not connect:
// the first call does, and fails if the runtime is not there.
func Dial(endpoint string) (*Client, error) {
	if err := ValidEndpoint(endpoint); err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient(endpoint,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMsgSize)))
	if err != nil {
		return nil, fmt.Errorf("runtime endpoint %s: %w", endpoint, err)
	}
	return &Client{Endpoint: endpoint, conn: conn, rt: runtimeapi.NewRuntimeServiceClient(conn)}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// ErrEmptyID: the runtime listed a sandbox without an ID, which no runtime does; the answer
// is not trusted.
var ErrEmptyID = errors.New("the runtime listed a pod sandbox without an ID")

// Sandboxes returns the IDs of every pod sandbox the runtime knows, in every state (a
// NOTREADY sandbox still exists: its network may yet be torn down by the runtime through
// CNI DEL). An error means the runtime did not answer (socket missing, runtime down,
// timeout from ctx, an answer it could not give): the caller must then decide nothing.
func (c *Client) Sandboxes(ctx context.Context) (map[string]bool, error) {
	// No filter: every state. A filter on state would hide NOTREADY sandboxes.
	resp, err := c.rt.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{})
	if err != nil {
		return nil, fmt.Errorf("ListPodSandbox on %s: %w", c.Endpoint, err)
	}
	ids := make(map[string]bool, len(resp.GetItems()))
	for _, s := range resp.GetItems() {
		if s.GetId() == "" {
			return nil, ErrEmptyID
		}
		ids[s.GetId()] = true
	}
	return ids, nil
}

// Auto is a client of the default runtime: when the runtime it asked does not answer and
// another of DefaultEndpoints has appeared since (a CRI-O node whose socket did not exist
// yet when the agent started), it switches to that one.
type Auto struct {
	c *Client
}

// DialDefault returns a client of DefaultEndpoint(), re-chosen whenever a call fails.
func DialDefault() (*Auto, error) {
	c, err := Dial(DefaultEndpoint())
	if err != nil {
		return nil, err
	}
	return &Auto{c: c}, nil
}

// Endpoint is the endpoint in use.
func (a *Auto) Endpoint() string { return a.c.Endpoint }

// Sandboxes is Client.Sandboxes on the endpoint in use, retried once on a newly chosen
// default endpoint when it fails.
func (a *Auto) Sandboxes(ctx context.Context) (map[string]bool, error) {
	ids, err := a.c.Sandboxes(ctx)
	if err == nil {
		return ids, nil
	}
	e := DefaultEndpoint()
	if e == a.c.Endpoint {
		return nil, err
	}
	c, derr := Dial(e)
	if derr != nil {
		return nil, err
	}
	a.c.Close()
	a.c = c
	return a.c.Sandboxes(ctx)
}

// Close closes the connection.
func (a *Auto) Close() error { return a.c.Close() }
