package cri

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/portguard/portguard/test/testbed"
)

// Pod is a pod sandbox created through CRI.
type Pod struct {
	R    *Runtime
	Name string // metadata name and hostname: what the pod answers on its port 80
	// ID is the sandbox ID, which is the CNI container ID of the pod's attachment.
	ID     string
	IP     string // the pod's IPv4 address (CRI status)
	Config *runtimeapi.PodSandboxConfig
}

// HostPort is a TCP port mapping as kubelet sends it for a container's hostPort.
func HostPort(hostPort, containerPort int32) *runtimeapi.PortMapping {
	return &runtimeapi.PortMapping{Protocol: runtimeapi.Protocol_TCP, HostPort: hostPort, ContainerPort: containerPort}
}

// RunPod runs a pod sandbox with the given port mappings (RunPodSandbox, as kubelet does:
// containerd creates the netns, runs the CNI ADD with the mappings as the portMappings
// capability, then starts the sandbox image, which answers Name on TCP port 80). It fails
// the test when the runtime refuses.
func (r *Runtime) RunPod(name string, ports ...*runtimeapi.PortMapping) *Pod {
	r.T.Helper()
	p, err := r.TryRunPod(name, ports...)
	if err != nil {
		r.T.Fatalf("RunPodSandbox %s: %v\n%s", name, err, r.tail())
	}
	return p
}

// TryRunPod is RunPod returning the runtime's error.
func (r *Runtime) TryRunPod(name string, ports ...*runtimeapi.PortMapping) (*Pod, error) {
	uid := make([]byte, 8)
	_, _ = rand.Read(uid)
	cfg := &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: name, Namespace: PodNamespace, Uid: hex.EncodeToString(uid)},
		Hostname:     name,
		PortMappings: ports,
		Labels:       map[string]string{"portguard.test/bed": r.Bed.ID},
		Linux: &runtimeapi.LinuxPodSandboxConfig{
			CgroupParent: r.cgroupParent,
			SecurityContext: &runtimeapi.LinuxSandboxSecurityContext{
				NamespaceOptions: &runtimeapi.NamespaceOption{Network: runtimeapi.NamespaceMode_POD,
					Pid: runtimeapi.NamespaceMode_POD, Ipc: runtimeapi.NamespaceMode_POD},
			},
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	resp, err := r.RS.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: cfg})
	if err != nil {
		return nil, err
	}
	p := &Pod{R: r, Name: name, ID: resp.PodSandboxId, Config: cfg}
	// The sandbox process is started when RunPodSandbox returns, but may not listen yet.
	st, err := p.Status()
	if err != nil {
		return p, err
	}
	p.IP = st.GetNetwork().GetIp()
	for deadline := time.Now().Add(Timeout); ; time.Sleep(20 * time.Millisecond) {
		ans, err := testbed.ConnectTCP(r.Bed.Node, p.IP, 80)
		if err == nil && ans == name {
			return p, nil
		}
		if time.Now().After(deadline) {
			return p, fmt.Errorf("pod %s (%s) does not answer on port 80: %q, %v", name, p.IP, ans, err)
		}
	}
}

// Stop stops the sandbox (StopPodSandbox: the pod's processes are killed, CNI DEL runs).
func (p *Pod) Stop() error {
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	_, err := p.R.RS.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: p.ID})
	return err
}

// Remove removes the sandbox (RemovePodSandbox: CNI DEL again, then the records go).
func (p *Pod) Remove() error {
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	_, err := p.R.RS.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: p.ID})
	return err
}

// Status returns the sandbox's CRI status (state, network address, netns).
func (p *Pod) Status() (*runtimeapi.PodSandboxStatus, error) {
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	resp, err := p.R.RS.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: p.ID})
	if err != nil {
		return nil, err
	}
	return resp.Status, nil
}

// Chain is the CNI-DN chain portguard (like portmap) names after the pod's attachment.
func (p *Pod) Chain() string { return testbed.ChainName(p.R.Net.Name, p.ID) }

// Sandboxes lists the IDs of every sandbox the runtime knows, in any state.
func (r *Runtime) Sandboxes() ([]string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	resp, err := r.RS.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{})
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, s := range resp.Items {
		ids = append(ids, s.Id)
	}
	return ids, nil
}
