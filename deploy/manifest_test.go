package deploy

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"

	"github.com/portguard/portguard/pkg/cnicache"
	"github.com/portguard/portguard/pkg/cri"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/lock"
	"github.com/portguard/portguard/test/testbed"
)

// AgentCapabilities is what the agent container keeps, each one shown necessary by
// test/cri's TestAgentCapabilities (which runs the agent with the manifest's list).
var AgentCapabilities = []string{"NET_ADMIN", "NET_RAW", "SYS_PTRACE", "SYS_ADMIN"}

// agentBinary is where deploy/Dockerfile puts portguard-agent.
const agentBinary = "/opt/portguard/bin/portguard-agent"

// manifests decodes every document of every deploy/*.yaml into k8s.io/api types, strictly
// (an unknown or misspelt field fails), keyed by file name.
func manifests(t *testing.T) map[string][]*appsv1.DaemonSet {
	t.Helper()
	files, err := filepath.Glob("*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in deploy/: %v", err)
	}
	out := map[string][]*appsv1.DaemonSet{}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(data), -1) {
			if strings.TrimSpace(stripComments(doc)) == "" {
				continue
			}
			var head struct{ APIVersion, Kind string }
			if err := yaml.Unmarshal([]byte(doc), &head); err != nil {
				t.Fatalf("%s document %d: %v", f, i, err)
			}
			if head.APIVersion != "apps/v1" || head.Kind != "DaemonSet" {
				t.Fatalf("%s document %d: %s %s: this test knows only apps/v1 DaemonSet; teach it the new kind", f, i, head.APIVersion, head.Kind)
			}
			ds := &appsv1.DaemonSet{}
			if err := yaml.UnmarshalStrict([]byte(doc), ds); err != nil {
				t.Fatalf("%s document %d does not decode into apps/v1 DaemonSet: %v", f, i, err)
			}
			out[f] = append(out[f], ds)
		}
	}
	return out
}

func stripComments(doc string) string {
	var b strings.Builder
	for _, l := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

func daemonSet(t *testing.T, file string) *appsv1.DaemonSet {
	t.Helper()
	ds := manifests(t)[file]
	if len(ds) != 1 {
		t.Fatalf("%s: %d DaemonSets, want 1", file, len(ds))
	}
	return ds[0]
}

func container(t *testing.T, spec *corev1.PodSpec, name string) *corev1.Container {
	t.Helper()
	for i := range spec.Containers {
		if spec.Containers[i].Name == name {
			return &spec.Containers[i]
		}
	}
	t.Fatalf("no container %q", name)
	return nil
}

// Every manifest decodes; the CNI directories are mounted with type Directory (a node where
// they are elsewhere fails the pod instead of getting a directory nothing reads); the pod
// selector matches the template.
func TestManifestsDecode(t *testing.T) {
	for file, list := range manifests(t) {
		for _, ds := range list {
			for k, v := range ds.Spec.Selector.MatchLabels {
				if ds.Spec.Template.Labels[k] != v {
					t.Errorf("%s: selector %s=%s does not match the template's labels", file, k, v)
				}
			}
			for _, v := range ds.Spec.Template.Spec.Volumes {
				if v.HostPath == nil || !strings.HasPrefix(v.Name, "cni-") || v.Name == "cni-cache" {
					continue
				}
				if v.HostPath.Type == nil || *v.HostPath.Type != corev1.HostPathDirectory {
					t.Errorf("%s: volume %s (%s): type %v, want Directory", file, v.Name, v.HostPath.Path, v.HostPath.Type)
				}
			}
		}
	}
}

// The DaemonSet runs portguard-agent next to the installer: host network and PID namespace,
// the mounts the agent reads and writes at the paths the plugin uses on the host, probes on
// the port it listens on, the scrape annotations, the capabilities test/cri shows it needs,
// resources, and arguments the agent's own flag parser accepts.
func TestDaemonSetRunsTheAgent(t *testing.T) {
	if os.Getenv("PORTGUARD_TEST_BUSYBOX_DIR") != "" {
		t.Skip("the busybox run is for install.sh; the manifests were checked in the main run")
	}
	ds := daemonSet(t, "daemonset.yaml")
	spec := &ds.Spec.Template.Spec
	if !spec.HostNetwork || !spec.HostPID {
		t.Errorf("hostNetwork %v, hostPID %v: the agent audits the node's nat table and scans the node's processes", spec.HostNetwork, spec.HostPID)
	}
	if c := container(t, spec, "portguard"); !slices.Equal(c.Args, []string{"watch"}) {
		t.Errorf("installer args %v, want [watch]", c.Args)
	}
	for _, c := range spec.Containers {
		if strings.Contains(c.Image, "pause") {
			t.Errorf("container %s still runs %s", c.Name, c.Image)
		}
	}
	a := container(t, spec, "agent")
	if !slices.Equal(a.Command, []string{agentBinary}) {
		t.Errorf("agent command %v, want [%s]", a.Command, agentBinary)
	}
	if inst := container(t, spec, "portguard"); a.Image != inst.Image {
		t.Errorf("agent image %s, installer image %s: the agent ships in the plugin's image", a.Image, inst.Image)
	}

	// The agent's own parser accepts the arguments (--version after them: parse, then exit 0).
	out, err := exec.Command(testbed.AgentBinary(t), append(append([]string{}, a.Args...), "--version")...).CombinedOutput()
	if err != nil {
		t.Errorf("portguard-agent refuses the manifest's args %v: %v\n%s", a.Args, err, out)
	}
	port := listenPort(t, a.Args)
	if !slices.ContainsFunc(a.Ports, func(p corev1.ContainerPort) bool { return int(p.ContainerPort) == port }) {
		t.Errorf("container ports %v do not declare the listen port %d", a.Ports, port)
	}
	for name, p := range map[string]*corev1.Probe{"liveness": a.LivenessProbe, "readiness": a.ReadinessProbe} {
		if p == nil || p.HTTPGet == nil {
			t.Errorf("%s probe: %v, want httpGet /healthz", name, p)
			continue
		}
		if p.HTTPGet.Path != "/healthz" || probePort(a, p.HTTPGet.Port) != port {
			t.Errorf("%s probe: GET %s on %v, want /healthz on %d", name, p.HTTPGet.Path, p.HTTPGet.Port.String(), port)
		}
	}
	ann := ds.Spec.Template.Annotations
	if ann["prometheus.io/scrape"] != "true" || ann["prometheus.io/port"] != strconv.Itoa(port) || ann["prometheus.io/path"] != "/metrics" {
		t.Errorf("scrape annotations %v, want scrape true, port %d, path /metrics", ann, port)
	}

	// Mounts: the host's own paths (portguard's records and the libcni cache name host
	// paths, e.g. of network namespaces), the agent's defaults.
	type want struct {
		rw, propagate bool
	}
	wants := map[string]want{
		liveness.DefaultStateDir: {rw: true},        // records the GC forgets
		lock.DefaultPath:         {rw: true},        // the plugin's host-wide lock, the same inode
		cnicache.DefaultDir:      {},                // libcni cache: each attachment's netns
		"/run/netns":             {propagate: true}, // containerd's and CRI-O's pod netns
		"/run/xtables.lock":      {rw: true},        // iptables-legacy's lock
	}
	for _, e := range cri.DefaultEndpoints {
		wants[filepath.Dir(strings.TrimPrefix(e, "unix://"))] = want{propagate: true}
	}
	volumes := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		volumes[v.Name] = v
	}
	mounted := map[string]bool{}
	for _, m := range a.VolumeMounts {
		w, ok := wants[m.MountPath]
		if !ok {
			t.Errorf("agent mounts %s, which it does not use", m.MountPath)
			continue
		}
		mounted[m.MountPath] = true
		v := volumes[m.Name]
		if v.HostPath == nil || v.HostPath.Path != m.MountPath {
			t.Errorf("agent mount %s: volume %s is not the host's %s: %+v", m.MountPath, m.Name, m.MountPath, v.VolumeSource)
		}
		if m.ReadOnly == w.rw {
			t.Errorf("agent mount %s: readOnly %v, the agent %s", m.MountPath, m.ReadOnly, map[bool]string{true: "writes there", false: "only reads there"}[w.rw])
		}
		prop := corev1.MountPropagationNone
		if m.MountPropagation != nil {
			prop = *m.MountPropagation
		}
		if w.propagate && prop != corev1.MountPropagationHostToContainer {
			t.Errorf("agent mount %s: mountPropagation %s, want HostToContainer (netns and sockets mounted after the agent started must show)", m.MountPath, prop)
		}
	}
	for p := range wants {
		if !mounted[p] {
			t.Errorf("agent does not mount %s", p)
		}
	}
	for _, e := range a.Env {
		switch e.Name {
		case "PORTGUARD_STATE_DIR", "PORTGUARD_LOCK_FILE", "PORTGUARD_CNI_CACHE_DIR":
			t.Errorf("agent env %s=%s: the plugin on the host uses the default, so must the agent", e.Name, e.Value)
		case "PATH":
			first := strings.Split(e.Value, ":")[0]
			if first != "/opt/portguard/iptables-nft" && first != "/opt/portguard/iptables-legacy" {
				t.Errorf("agent PATH %s: want one of the image's iptables mode directories first", e.Value)
			}
		}
	}

	sc := a.SecurityContext
	if sc == nil || sc.Capabilities == nil {
		t.Fatal("agent has no securityContext capabilities")
	}
	if !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("agent drops %v, want [ALL]", sc.Capabilities.Drop)
	}
	var add []string
	for _, c := range sc.Capabilities.Add {
		add = append(add, string(c))
	}
	if !slices.Equal(add, AgentCapabilities) {
		t.Errorf("agent adds %v, want %v (test/cri TestAgentCapabilities)", add, AgentCapabilities)
	}
	// API validation: allowPrivilegeEscalation false is refused together with SYS_ADMIN.
	if sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation && slices.Contains(add, "SYS_ADMIN") {
		t.Error("allowPrivilegeEscalation false with SYS_ADMIN: the API server refuses the pod")
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Error("agent root filesystem is writable")
	}
	if a.Resources.Requests.Cpu().IsZero() || a.Resources.Requests.Memory().IsZero() || a.Resources.Limits.Memory().IsZero() {
		t.Errorf("agent resources %v: want cpu and memory requests and a memory limit", a.Resources)
	}

	// The image ships the agent where the command says, and the iptables directories.
	df, err := os.ReadFile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []string{"cmd/portguard-agent", "/out/portguard-agent", "/opt/portguard/bin/", "/opt/portguard/iptables-$mode"} {
		if !bytes.Contains(df, []byte(w)) {
			t.Errorf("deploy/Dockerfile: no %q", w)
		}
	}
}

// listenPort is the port of the agent's --listen argument.
func listenPort(t *testing.T, args []string) int {
	t.Helper()
	for i, a := range args {
		v, ok := strings.CutPrefix(a, "--listen=")
		if !ok && a == "--listen" && i+1 < len(args) {
			v, ok = args[i+1], true
		}
		if ok {
			_, p, _ := strings.Cut(v, ":")
			port, err := strconv.Atoi(p)
			if err != nil {
				t.Fatalf("--listen %q: no port", v)
			}
			return port
		}
	}
	return 9617 // the agent's default
}

func probePort(c *corev1.Container, p intstr.IntOrString) int {
	if p.Type == intstr.Int {
		return p.IntValue()
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return int(cp.ContainerPort)
		}
	}
	return -1
}
