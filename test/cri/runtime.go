// Package cri runs a real containerd (Debian's containerd and runc packages) for one test,
// inside namespaces the test owns, and creates pods through CRI as kubelet does.
//
//	r := cri.Start(t)                                  // bed + containerd in the bed's node netns
//	p := r.RunPod("web", cri.HostPort(8080, 80))       // RunPodSandbox: CNI ADD bridge+host-local+portguard
//	ans, _ := testbed.ConnectTCP(r.Bed.Client, r.Bed.NodeIP4.String(), 8080) // "web"
//	p.Stop(); p.Remove()                               // StopPodSandbox/RemovePodSandbox: CNI DEL
//	r.Crash(true)                                      // containerd and its pods killed, its state wiped
//	r.Restart()
//
// Isolation: containerd runs in the bed's node network namespace (so the bridge plugin's and
// portguard's rules land there, never in the machine's) and in a private mount namespace held
// by a keeper process: /run/containerd (shim sockets, runc state) is a tmpfs there, libcni's
// hard-coded cache /var/lib/cni is the bed's CacheDir bind-mounted, and the pods' network
// namespaces are mounted under containerd's own state dir (netns_mounts_under_state_dir).
// Root, state, socket and config are in a per-test directory; pods' cgroups under a per-test
// parent. t.Cleanup kills containerd, the shims and pods (every process of the mount
// namespace), then the keeper, which drops every mount the test made, and removes the
// cgroups and directories.
package cri

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/portguard/portguard/test/testbed"
)

// ImageName is the sandbox image the tests build and import (never pulled).
const ImageName = "docker.io/portguard/pause:test"

// PodNamespace is the Kubernetes namespace in the metadata of every test pod.
const PodNamespace = "portguard-test"

// Tools the harness runs besides the test bed's.
var tools = []string{"containerd", "containerd-shim-runc-v2", "ctr", "runc", "nsenter", "unshare", "setpriv", "umount"}

// Require skips the test when containerd cannot run here (not root, tools missing), or fails
// it when PORTGUARD_E2E_REQUIRED=1 (CI installs containerd and runc through `make deps`).
func Require(t testing.TB) {
	t.Helper()
	testbed.Require(t)
	var missing []string
	for _, c := range tools {
		if _, err := exec.LookPath(c); err != nil {
			missing = append(missing, c)
		}
	}
	if len(missing) > 0 {
		reason := "containerd tests need these tools on PATH (run `make deps`: apt packages containerd, runc): " + strings.Join(missing, ", ")
		if os.Getenv("PORTGUARD_E2E_REQUIRED") == "1" {
			t.Fatal(reason)
		}
		t.Skip(reason)
	}
}

// Runtime is one containerd started for one test.
type Runtime struct {
	T   testing.TB
	Bed *testbed.Bed
	// Net is the CNI network containerd uses: bridge + host-local + portguard, cniVersion
	// 1.0.0 (containerd 1.6 cannot run a 1.1.0 conflist), in Bed.NetDir.
	Net *testbed.Network
	// Dir holds containerd's root, state, config, socket and log. It is short (unix socket
	// paths are limited to 108 bytes).
	Dir      string
	Root     string
	State    string
	Config   string
	Socket   string
	Endpoint string // "unix://" + Socket, for --runtime-endpoint
	Log      string // containerd's stdout and stderr
	// Env is what containerd, and so the plugins it runs, and Command get on top of the
	// machine's environment: the bed's private lock file, portguard records and libcni cache.
	Env []string
	// RS is a CRI runtime service client on Socket.
	RS runtimeapi.RuntimeServiceClient

	cgroupParent string
	archive      string
	keeper       *exec.Cmd
	mntNS        nsID
	mu           sync.Mutex
	ctrd         *exec.Cmd
	ctrdDone     chan struct{}
	conn         *grpc.ClientConn
}

type nsID struct{ dev, ino uint64 }

// Timeout bounds every wait of the harness (containerd start, a CRI call, processes dying).
var Timeout = 30 * time.Second

// Start builds a test bed, the sandbox image and a containerd for t, and registers the cleanup.
func Start(t testing.TB) *Runtime {
	t.Helper()
	Require(t)
	b := testbed.New(t, testbed.Options{NoShim: true})
	// containerd's CRI sets up every pod's loopback through the "loopback" plugin.
	b.InstallExtraPlugins("loopback")
	n := b.Network(testbed.NetConfig{PortPlugin: "portguard", CNIVersion: "1.0.0"})

	// Named after the bed, so a later test process can remove it (sweepPods).
	dir, err := os.MkdirTemp("", "pgcri-"+b.ID+"-")
	if err != nil {
		t.Fatal(err)
	}
	r := &Runtime{
		T: t, Bed: b, Net: n, Dir: dir,
		Root:         filepath.Join(dir, "root"),
		State:        filepath.Join(dir, "state"),
		Config:       filepath.Join(dir, "config.toml"),
		Socket:       filepath.Join(dir, "containerd.sock"),
		Log:          filepath.Join(dir, "containerd.log"),
		Env:          append([]string(nil), b.Env...),
		cgroupParent: "/portguard-test-" + b.ID,
	}
	r.Endpoint = "unix://" + r.Socket
	t.Cleanup(r.cleanup)

	r.archive, err = image()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(r.Config, []byte(r.config()), 0o644); err != nil {
		t.Fatal(err)
	}
	r.startKeeper()
	r.Restart()
	return r
}

var (
	imageOnce    sync.Once
	imageDir     string
	imageArchive string
	imageErr     error
)

// image builds the sandbox image archive once per test process, in a directory Main removes.
func image() (string, error) {
	imageOnce.Do(func() {
		// Named after this process, so a later one can remove it if this one is killed.
		imageDir, imageErr = os.MkdirTemp("", fmt.Sprintf("pgcri-image-%d-", os.Getpid()))
		if imageErr == nil {
			imageArchive, imageErr = BuildImage(imageDir, ImageName)
		}
	})
	return imageArchive, imageErr
}

// Main is testbed.Main that also removes the sandbox image built for the tests:
//
//	func TestMain(m *testing.M) { os.Exit(cri.Main(m)) }
func Main(m *testing.M) int {
	if os.Geteuid() == 0 {
		sweepPods()
	}
	code := testbed.Main(m)
	if imageDir != "" {
		os.RemoveAll(imageDir)
	}
	return code
}

// config renders containerd's config: CRI with the bed's CNI dirs and the test's image,
// pod netns under the state dir, and none of the plugins that touch host paths (opt) or
// need host storage drivers.
func (r *Runtime) config() string {
	q := strconv.Quote
	return `version = 2
root = ` + q(r.Root) + `
state = ` + q(r.State) + `
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = ` + q(r.Socket) + `

[ttrpc]
  address = ` + q(r.Socket+".ttrpc") + `

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = ` + q(ImageName) + `
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  # A sandbox's oom_score_adj is -998; lowering it needs CAP_SYS_RESOURCE, which a CI
  # container may lack: keep it no lower than containerd's own.
  restrict_oom_score_adj = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = ` + q(r.Bed.CNIBinDir) + `
    conf_dir = ` + q(r.Bed.NetDir) + `
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
`
}

// startKeeper creates the private mount namespace (inside the bed's node netns) and keeps it
// alive with a sleeping process, so containerd can be stopped and started again in it.
func (r *Runtime) startKeeper() {
	t := r.T
	for _, d := range []string{"/run/containerd", "/var/lib/cni"} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	script := `set -e
mount -t tmpfs pgcri /run/containerd
mount --bind "$1" /var/lib/cni
echo ready
exec sleep infinity`
	c := exec.Command("nsenter", "--net=/var/run/netns/"+r.Bed.Node,
		"unshare", "--mount", "--propagation", "private", "sh", "-c", script, "keeper", r.Bed.CacheDir)
	// The keeper dies with the test process (exec keeps the parent-death signal).
	c.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := c.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	c.Stderr = &stderr
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	r.keeper = c
	line, _ := bufio.NewReader(out).ReadString('\n')
	if strings.TrimSpace(line) != "ready" {
		t.Fatalf("mount namespace for containerd: %q %s", line, stderr.String())
	}
	id, err := mountNS(c.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	r.mntNS = id
}

func mountNS(pid int) (nsID, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(fmt.Sprintf("/proc/%d/ns/mnt", pid), &st); err != nil {
		return nsID{}, err
	}
	return nsID{uint64(st.Dev), st.Ino}, nil
}

// Command returns a command that runs in containerd's network and mount namespaces (the
// node as the runtime sees it: its pods' network namespaces, its libcni cache), with Env.
func (r *Runtime) Command(name string, args ...string) *exec.Cmd {
	c := exec.Command("nsenter", append([]string{"--target", strconv.Itoa(r.keeper.Process.Pid), "--mount", "--net", "--", name}, args...)...)
	c.Env = append(os.Environ(), r.Env...)
	c.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return c
}

// StartAgent starts portguard-agent in containerd's network and mount namespaces, with the
// bed's environment and --runtime-endpoint Endpoint before args (testbed.Bed.StartAgent).
func (r *Runtime) StartAgent(args ...string) *testbed.Agent {
	r.T.Helper()
	return r.StartAgentWithCaps(nil, args...)
}

// StartAgentWithCaps is StartAgent with the agent's capabilities limited to caps (names as
// in a pod's securityContext, e.g. "NET_ADMIN"), as a container running as root with
// `capabilities: {drop: [ALL], add: caps}` and allowPrivilegeEscalation false gets them:
// bounding set = permitted = effective = caps, no new privileges. nil caps: unlimited.
func (r *Runtime) StartAgentWithCaps(caps []string, args ...string) *testbed.Agent {
	r.T.Helper()
	prefix := []string{"nsenter", "--target", strconv.Itoa(r.keeper.Process.Pid), "--mount", "--net", "--"}
	if caps != nil {
		set := "-all"
		for _, c := range caps {
			set += ",+" + strings.ToLower(c)
		}
		prefix = append(prefix, "setpriv", "--bounding-set", set, "--inh-caps", "-all", "--no-new-privs", "--")
	}
	return r.Bed.StartAgentIn(prefix, nil, append([]string{"--runtime-endpoint", r.Endpoint}, args...)...)
}

// Restart starts containerd (again) on the same config, waits until CRI answers and its
// network is ready, and imports the sandbox image when containerd does not have it.
func (r *Runtime) Restart() {
	t := r.T
	t.Helper()
	r.mu.Lock()
	if r.ctrd != nil {
		r.mu.Unlock()
		t.Fatal("cri: containerd is already running")
	}
	logf, err := os.OpenFile(r.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		r.mu.Unlock()
		t.Fatal(err)
	}
	c := r.Command("containerd", "--config", r.Config, "--log-level", "info")
	c.Stdout, c.Stderr = logf, logf
	if err := c.Start(); err != nil {
		r.mu.Unlock()
		t.Fatal(err)
	}
	logf.Close()
	done := make(chan struct{})
	go func() { _ = c.Wait(); close(done) }()
	r.ctrd, r.ctrdDone = c, done
	r.mu.Unlock()

	if r.conn == nil {
		conn, err := grpc.NewClient("unix://"+r.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		r.conn = conn
		r.RS = runtimeapi.NewRuntimeServiceClient(conn)
	}
	deadline := time.Now().Add(Timeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := r.RS.Version(ctx, &runtimeapi.VersionRequest{})
		cancel()
		if err == nil {
			break
		}
		select {
		case <-done:
			t.Fatalf("containerd exited: %s", r.tail())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd did not answer CRI within %v: %v\n%s", Timeout, err, r.tail())
		}
		time.Sleep(100 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	is := runtimeapi.NewImageServiceClient(r.conn)
	if st, err := is.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ImageName}}); err != nil || st.Image == nil {
		if out, err := r.Command("ctr", "--address", r.Socket, "--namespace", "k8s.io", "images", "import", r.archive).CombinedOutput(); err != nil {
			t.Fatalf("ctr images import: %v\n%s", err, out)
		}
	}
	// CRI learns of the imported image from an event, and of the CNI config by watching the
	// directory: wait for both before the first RunPodSandbox.
	for {
		st, err := r.RS.Status(ctx, &runtimeapi.StatusRequest{})
		img, ierr := is.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ImageName}})
		if err == nil && ierr == nil && img.Image != nil && networkReady(st) {
			return
		}
		if ctx.Err() != nil {
			t.Fatalf("containerd not ready (status %v, %v; image %v, %v)\n%s", st, err, img, ierr, r.tail())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func networkReady(st *runtimeapi.StatusResponse) bool {
	for _, c := range st.GetStatus().GetConditions() {
		if c.Type == runtimeapi.NetworkReady {
			return c.Status
		}
	}
	return false
}

// tail returns the end of containerd's log, for failure messages.
func (r *Runtime) tail() string {
	data, _ := os.ReadFile(r.Log)
	if len(data) > 4000 {
		data = data[len(data)-4000:]
	}
	return "containerd log (end):\n" + string(data)
}

// Stop stops containerd cleanly (SIGTERM) and leaves its pods running, as a runtime restart
// on a node does. The CRI socket stops answering.
func (r *Runtime) Stop() {
	r.T.Helper()
	r.stopContainerd(syscall.SIGTERM)
}

func (r *Runtime) stopContainerd(sig syscall.Signal) {
	r.mu.Lock()
	c, done := r.ctrd, r.ctrdDone
	r.ctrd = nil
	r.mu.Unlock()
	if c == nil {
		return
	}
	_ = c.Process.Signal(sig)
	select {
	case <-done:
	case <-time.After(Timeout):
		_ = c.Process.Kill()
		<-done
	}
}

// Crash kills containerd and every process it started (shims, pods) with SIGKILL: no CNI
// DEL is sent. With wipe, containerd's root and state are deleted too (its metadata, CRI's
// sandbox store, the pods' netns mounts): what a node whose runtime lost its records after a
// crash looks like. The bridge's and portguard's rules, portguard's records and the libcni
// cache stay. Restart brings containerd back without any sandbox.
func (r *Runtime) Crash(wipe bool) {
	t := r.T
	t.Helper()
	r.stopContainerd(syscall.SIGKILL)
	if err := r.killNamespace(); err != nil {
		t.Fatal(err)
	}
	if !wipe {
		return
	}
	// Unmount what containerd mounted under its dirs (pods' netns, rootfs) before deleting.
	mounts, err := r.mountsUnder(r.Dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(mounts) > 0 {
		args := append([]string{"sh", "-c", `for m; do umount -l "$m" || exit 1; done`, "umount"}, mounts...)
		if out, err := r.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("unmount %v: %v\n%s", mounts, err, out)
		}
	}
	for _, d := range []string{r.Root, r.State} {
		if err := os.RemoveAll(d); err != nil {
			t.Fatal(err)
		}
	}
}

// mountsUnder lists the mount points below dir in containerd's mount namespace, deepest first.
func (r *Runtime) mountsUnder(dir string) ([]string, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/mountinfo", r.keeper.Process.Pid))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && strings.HasPrefix(fields[4], dir+"/") {
			out = append(out, fields[4])
		}
	}
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out, sc.Err()
}

// killNamespace SIGKILLs every process of containerd's mount namespace but the keeper (the
// shims: they daemonize, so they are not the test's children) and of the pods' cgroups, and
// waits until they are gone.
func (r *Runtime) killNamespace() error {
	deadline := time.Now().Add(Timeout)
	for {
		pids := r.namespacePIDs()
		if len(pids) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes %v of containerd's mount namespace survive SIGKILL", pids)
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// namespacePIDs lists the processes of containerd's mount namespace (shims, runc) and of the
// pods' cgroups (a pod has a mount namespace of its own).
func (r *Runtime) namespacePIDs() []int {
	entries, _ := os.ReadDir("/proc")
	pids := r.podPIDs()
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == r.keeper.Process.Pid {
			continue
		}
		if id, err := mountNS(pid); err == nil && id == r.mntNS && !zombie(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// podPIDs lists the live processes in the pods' cgroups.
func (r *Runtime) podPIDs() []int {
	var pids []int
	procs, _ := filepath.Glob("/sys/fs/cgroup/pids" + r.cgroupParent + "/*/cgroup.procs")
	for _, f := range procs {
		data, _ := os.ReadFile(f)
		for _, s := range strings.Fields(string(data)) {
			if pid, err := strconv.Atoi(s); err == nil && !zombie(pid) {
				pids = append(pids, pid)
			}
		}
	}
	return pids
}

// zombie: an exited process not yet reaped (killing it again changes nothing).
func zombie(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	i := strings.LastIndexByte(string(stat), ')')
	return i > 0 && strings.HasPrefix(string(stat[i+1:]), " Z")
}

func (r *Runtime) cleanup() {
	if r.T.Failed() {
		r.T.Log(r.tail())
	}
	if r.conn != nil {
		r.conn.Close()
	}
	r.stopContainerd(syscall.SIGKILL)
	if r.keeper != nil {
		if err := r.killNamespace(); err != nil {
			r.T.Error(err)
		}
		_ = r.keeper.Process.Kill()
		_ = r.keeper.Wait()
	}
	if err := r.removeCgroups(); err != nil {
		r.T.Error(err)
	}
	_ = os.RemoveAll(r.Dir)
}

// sweepPods kills the pods a killed test process left (testbed.Main sweeps its namespaces,
// containerd and the shims with them, but a pod has a network namespace of its own) and
// removes their cgroups and containerd's directory: those of beds whose owner process is gone
// (testbed records each bed's owner in $TMPDIR/pge-owners/<bed id> before the runtime
// creates anything).
func sweepPods() {
	dirs, _ := filepath.Glob("/sys/fs/cgroup/pids/portguard-test-*")
	for _, d := range dirs {
		id := strings.TrimPrefix(filepath.Base(d), "portguard-test-")
		if bedAlive(id) {
			continue
		}
		r := &Runtime{cgroupParent: "/portguard-test-" + id}
		for _, pid := range r.podPIDs() {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		_ = r.removeCgroups()
	}
	// containerd's directories of dead beds (pgcri-<bed id>-*; its mounts died with the
	// keeper's mount namespace) and the sandbox images of dead processes (pgcri-image-<pid>-*).
	tmp, _ := filepath.Glob(filepath.Join(os.TempDir(), "pgcri-*-*"))
	for _, d := range tmp {
		f := strings.SplitN(filepath.Base(d), "-", 4)
		switch {
		case len(f) == 4 && f[1] == "image":
			if pid, err := strconv.Atoi(f[2]); err == nil && syscall.Kill(pid, 0) != nil {
				_ = os.RemoveAll(d)
			}
		case len(f) >= 3 && f[1] != "image" && !bedAlive(f[1]):
			_ = os.RemoveAll(d)
		}
	}
}

// bedAlive: the test process that owns bed id (testbed's owner record) still runs.
func bedAlive(id string) bool {
	data, err := os.ReadFile(filepath.Join(os.TempDir(), "pge-owners", id))
	if err != nil {
		return false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	return err == nil && syscall.Kill(pid, 0) == nil
}

// removeCgroups removes the pods' cgroups (runc removes them when it deletes a container;
// after a crash they stay), deepest first. A killed pod stays in its cgroup until its parent
// reaps it (the machine's init, after the shim died), so rmdir is retried until Timeout.
func (r *Runtime) removeCgroups() error {
	deadline := time.Now().Add(Timeout)
	for {
		roots, _ := filepath.Glob("/sys/fs/cgroup/*" + r.cgroupParent)
		if u, err := os.Stat("/sys/fs/cgroup" + r.cgroupParent); err == nil && u.IsDir() {
			roots = append(roots, "/sys/fs/cgroup"+r.cgroupParent)
		}
		var lastErr error
		for _, root := range roots {
			var dirs []string
			_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
				if err == nil && d.IsDir() {
					dirs = append(dirs, p)
				}
				return nil
			})
			for i := len(dirs) - 1; i >= 0; i-- {
				if err := syscall.Rmdir(dirs[i]); err != nil && !errors.Is(err, syscall.ENOENT) {
					lastErr = fmt.Errorf("remove cgroup %s: %w", dirs[i], err)
				}
			}
		}
		if lastErr == nil || time.Now().After(deadline) {
			return lastErr
		}
		time.Sleep(100 * time.Millisecond)
	}
}
