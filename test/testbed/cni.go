package testbed

import (
	"crypto/sha512"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
)

// DefaultCNIVersion is the conflist version used unless NetConfig says otherwise (1.1.0 so
// GC and STATUS can be exercised).
const DefaultCNIVersion = "1.1.0"

// NetConfig describes a bridge + host-local network with an optional port-mapping plugin.
type NetConfig struct {
	// Name of the network; default "pge-<bed id>-<k>".
	Name string
	// CNIVersion of the conflist; default DefaultCNIVersion.
	CNIVersion string
	// PortPlugin is the "type" of the port-mapping plugin in the chain: "portguard",
	// "portmap" (whatever is installed under that name, upstream by default) or "" for none.
	PortPlugin string
	// PortConf holds extra keys for the port-mapping plugin (snat, conflictPolicy, ...).
	PortConf map[string]any
	// IPv4Only drops the IPv6 range (default: dual-stack).
	IPv4Only bool
	// Bridge name in the node; default "cni0".
	Bridge string
	// Subnet4/Subnet6 override the pod subnets (default: allocated per network in the bed).
	// Two networks may share a bridge and subnets (e.g. a "renamed" network).
	Subnet4, Subnet6 string
	// Extra plugins appended after the port-mapping plugin.
	Extra []map[string]any
}

// Network is a conflist installed in the bed's NETCONFPATH.
type Network struct {
	Bed      *Bed
	Name     string
	Path     string // conflist file
	Conflist []byte
	Subnet4  *net.IPNet // nil when unknown (raw conflists)
	Subnet6  *net.IPNet
}

func mustCIDR(s string) *net.IPNet {
	_, n, err := net.ParseCIDR(s)
	if err != nil {
		panic(err)
	}
	return n
}

// PodSubnets returns the default pod subnets of the k-th network of the bed.
func (b *Bed) PodSubnets(k int) (string, string) {
	return fmt.Sprintf("198.19.%d.%d/26", b.octet, (k%4)*64), fmt.Sprintf("fd00:71:%x:%x::/64", b.octet, k)
}

// Network writes a bridge + host-local (+ port plugin) conflist and returns it.
func (b *Bed) Network(c NetConfig) *Network {
	b.T.Helper()
	b.mu.Lock()
	k := b.netCount
	b.netCount++
	b.mu.Unlock()
	if c.PortPlugin == "portguard" {
		PortguardBinary(b.T) // fails the test with the build error when there is no plugin
	}
	if c.Name == "" {
		c.Name = fmt.Sprintf("pge-%s-%d", b.ID, k)
	}
	if c.CNIVersion == "" {
		c.CNIVersion = DefaultCNIVersion
	}
	if c.Bridge == "" {
		c.Bridge = "cni0"
	}
	s4, s6 := b.PodSubnets(k)
	if c.Subnet4 == "" {
		c.Subnet4 = s4
	}
	if c.Subnet6 == "" {
		c.Subnet6 = s6
	}
	ranges := []any{[]any{map[string]any{"subnet": c.Subnet4}}}
	routes := []any{map[string]any{"dst": "0.0.0.0/0"}}
	if !c.IPv4Only {
		ranges = append(ranges, []any{map[string]any{"subnet": c.Subnet6}})
		routes = append(routes, map[string]any{"dst": "::/0"})
	}
	plugins := []any{b.BridgePlugin(c.Bridge, ranges, routes)}
	if c.PortPlugin != "" {
		pp := map[string]any{"type": c.PortPlugin, "capabilities": map[string]any{"portMappings": true}}
		for k, v := range c.PortConf {
			pp[k] = v
		}
		plugins = append(plugins, pp)
	}
	for _, e := range c.Extra {
		plugins = append(plugins, e)
	}
	raw, err := json.MarshalIndent(map[string]any{
		"cniVersion": c.CNIVersion,
		"name":       c.Name,
		"plugins":    plugins,
	}, "", "  ")
	if err != nil {
		b.T.Fatal(err)
	}
	b.ensureBridge(c.Bridge)
	n := b.Conflist(raw)
	n.Subnet4 = mustCIDR(c.Subnet4)
	if !c.IPv4Only {
		n.Subnet6 = mustCIDR(c.Subnet6)
	}
	return n
}

// ensureBridge creates the bridge in the node before the first ADD and pins its MAC address.
// Otherwise the kernel changes the bridge's MAC as the first ports join, so parallel ADDs
// cache different MACs for it and the bridge plugin's CHECK fails ("Mac doesn't match").
func (b *Bed) ensureBridge(name string) {
	b.T.Helper()
	if _, err := b.Exec(b.Node, "ip", "link", "show", name); err == nil {
		return
	}
	b.must("ip", "-n", b.Node, "link", "add", name, "type", "bridge")
	out := b.MustExec(b.Node, "ip", "-br", "link", "show", name)
	f := strings.Fields(out)
	if len(f) < 3 {
		b.T.Fatalf("cannot read the MAC of %s: %q", name, out)
	}
	b.must("ip", "-n", b.Node, "link", "set", name, "address", f[2], "up")
}

// BridgePlugin returns a bridge plugin config (gateway, hairpin, host-local with the bed's
// per-test dataDir) for the given host-local ranges and routes. The "ips" capability lets a
// call request addresses through CallOptions.IPs.
func (b *Bed) BridgePlugin(bridge string, ranges, routes []any) map[string]any {
	ipam := map[string]any{
		"type":    "host-local",
		"dataDir": b.IPAMDir,
		"ranges":  ranges,
	}
	if len(routes) > 0 {
		ipam["routes"] = routes
	}
	return map[string]any{
		"type":         "bridge",
		"bridge":       bridge,
		"isGateway":    true,
		"ipMasq":       false,
		"hairpinMode":  true,
		"capabilities": map[string]any{"ips": true},
		"ipam":         ipam,
	}
}

// Conflist installs a conflist as given (its "name" names the network) and returns it.
func (b *Bed) Conflist(raw []byte) *Network {
	b.T.Helper()
	var head struct {
		Name string `json:"name"`
	}
	if err := json.Unmarshal(raw, &head); err != nil || head.Name == "" {
		b.T.Fatalf("conflist without a name: %v\n%s", err, raw)
	}
	path := filepath.Join(b.NetDir, head.Name+".conflist")
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		b.T.Fatal(err)
	}
	return &Network{Bed: b, Name: head.Name, Path: path, Conflist: raw}
}

// Remove deletes the conflist file (the network's kernel state stays).
func (n *Network) Remove() { _ = os.Remove(n.Path) }

// PortMapping is one entry of runtimeConfig.portMappings.
type PortMapping struct {
	HostPort      int    `json:"hostPort"`
	ContainerPort int    `json:"containerPort"`
	Protocol      string `json:"protocol,omitempty"`
	HostIP        string `json:"hostIP,omitempty"`
}

// TCP and UDP build mappings of hostPort to containerPort.
func TCP(hostPort, containerPort int) PortMapping {
	return PortMapping{HostPort: hostPort, ContainerPort: containerPort, Protocol: "tcp"}
}

func UDP(hostPort, containerPort int) PortMapping {
	return PortMapping{HostPort: hostPort, ContainerPort: containerPort, Protocol: "udp"}
}

// On returns the mapping restricted to a host IP.
func (m PortMapping) On(hostIP string) PortMapping { m.HostIP = hostIP; return m }

// Pod is a network namespace standing for a pod sandbox.
type Pod struct {
	Bed         *Bed
	Name        string // what its responders answer
	NetNS       string // netns name
	Path        string // /var/run/netns/<NetNS>, the CNI_NETNS cnitool gets
	ContainerID string // the ID cnitool derives from Path
	IP4, IP6    net.IP // from the last successful ADD
	mappings    map[string][]PortMapping
	procs       []*podProc
}

var podNameRe = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,64}$`)

// NewPod creates a pod namespace. name is what the pod answers (default "p<k>").
func (b *Bed) NewPod(name string) *Pod {
	b.T.Helper()
	b.mu.Lock()
	k := b.podCount
	b.podCount++
	b.mu.Unlock()
	if name == "" {
		name = fmt.Sprintf("p%d", k)
	}
	if !podNameRe.MatchString(name) {
		b.T.Fatalf("testbed: pod name %q: use letters, digits, '.', '_', '-'", name)
	}
	ns := fmt.Sprintf("pge-%s-%d", b.ID, k)
	path := "/var/run/netns/" + ns
	sum := sha512.Sum512([]byte(path))
	p := &Pod{Bed: b, Name: name, NetNS: ns, Path: path,
		ContainerID: fmt.Sprintf("cnitool-%x", sum[:10]), mappings: map[string][]PortMapping{}}
	b.mu.Lock()
	b.pods = append(b.pods, p)
	b.mu.Unlock()
	if err := p.createNetns(); err != nil {
		b.T.Fatal(err)
	}
	return p
}

func (p *Pod) createNetns() error {
	if err := run(nil, "ip", "netns", "add", p.NetNS); err != nil {
		return err
	}
	if err := run(nil, "ip", "-n", p.NetNS, "link", "set", "lo", "up"); err != nil {
		return err
	}
	return run(nil, "ip", "netns", "exec", p.NetNS, "sysctl", "-qw",
		"net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
}

// Kill simulates a crashed sandbox: responders stop and the namespace is deleted, with no
// CNI DEL, so the plugins' state (iptables, IPAM, cnitool cache) goes stale.
func (p *Pod) Kill() {
	p.Bed.T.Helper()
	p.StopServing()
	if err := run(nil, "ip", "netns", "del", p.NetNS); err != nil {
		p.Bed.T.Fatal(err)
	}
}

// Revive recreates a killed pod's namespace under the same name, so the next ADD is for the
// same container ID (cnitool derives it from the namespace path).
func (p *Pod) Revive() {
	p.Bed.T.Helper()
	if err := p.createNetns(); err != nil {
		p.Bed.T.Fatal(err)
	}
}

// IP returns the pod's address of a family (from the last ADD).
func (p *Pod) IP(f Family) net.IP {
	if f == V6 {
		return p.IP6
	}
	return p.IP4
}

// Chain returns the CNI-DN chain name of this pod on network n.
func (p *Pod) Chain(n *Network) string { return ChainName(n.Name, p.ContainerID) }

// CallOptions tune one cnitool call.
type CallOptions struct {
	// Mappings for CAP_ARGS portMappings. For Del and Check, nil means "the mappings of the
	// last ADD on this network" (what a runtime passes). add, del and check always send the
	// portMappings capability, as CRI runtimes do ("portMappings": [] when there are none),
	// unless NoMappings is set: then CAP_ARGS has no portMappings key at all and libcni
	// injects no runtimeConfig.portMappings.
	Mappings   []PortMapping
	NoMappings bool
	// IPs requests addresses from host-local (capability "ips"), e.g. "198.19.1.50/26".
	IPs []string
	// CapArgs are extra capability args merged into CAP_ARGS.
	CapArgs map[string]any
	// CNIArgs is CNI_ARGS verbatim.
	CNIArgs string
	// IfName is CNI_IFNAME (default eth0).
	IfName string
	// Env is appended to the call's environment.
	Env []string
}

// Result of a cnitool call.
type Result struct {
	Stdout, Stderr string
	IPs            []net.IP
}

// Add runs `cnitool add` for the pod with the given port mappings.
func (n *Network) Add(p *Pod, mappings ...PortMapping) (*Result, error) {
	return n.Call("add", p, CallOptions{Mappings: mappings})
}

// Del runs `cnitool del` for the pod, with the mappings of its last ADD.
func (n *Network) Del(p *Pod) error {
	_, err := n.Call("del", p, CallOptions{})
	return err
}

// Check runs `cnitool check` for the pod, with the mappings of its last ADD.
func (n *Network) Check(p *Pod) error {
	_, err := n.Call("check", p, CallOptions{})
	return err
}

// GC runs `cnitool gc`: it DELs every attachment cnitool cached for this network, then sends
// GC (without a valid-attachments list) to each plugin when cniVersion >= 1.1.0.
func (n *Network) GC() (*Result, error) { return n.Call("gc", nil, CallOptions{}) }

// Status runs `cnitool status` for the network.
func (n *Network) Status() (*Result, error) { return n.Call("status", nil, CallOptions{}) }

// Call runs cnitool <verb> inside the node namespace. verb is add, del, check, gc or status;
// p may be nil for gc and status.
func (n *Network) Call(verb string, p *Pod, o CallOptions) (*Result, error) {
	b := n.Bed
	nsPath := "/dev/null" // gc and status need a netns argument cnitool ignores
	if p != nil {
		nsPath = p.Path
	}
	mappings := o.Mappings
	if p != nil && mappings == nil && !o.NoMappings && (verb == "del" || verb == "check") {
		b.mu.Lock()
		mappings = p.mappings[n.Name]
		b.mu.Unlock()
	}
	capArgs := map[string]any{}
	if p != nil && !o.NoMappings && (verb == "add" || verb == "del" || verb == "check") {
		if mappings == nil {
			mappings = []PortMapping{}
		}
		capArgs["portMappings"] = mappings
	}
	if len(o.IPs) > 0 {
		capArgs["ips"] = o.IPs
	}
	for k, v := range o.CapArgs {
		capArgs[k] = v
	}
	env := append(os.Environ(), b.Env...)
	env = append(env, "CNI_PATH="+b.CNIBinDir, "NETCONFPATH="+b.NetDir)
	if len(capArgs) > 0 {
		raw, err := json.Marshal(capArgs)
		if err != nil {
			return nil, err
		}
		env = append(env, "CAP_ARGS="+string(raw))
	}
	if o.CNIArgs != "" {
		env = append(env, "CNI_ARGS="+o.CNIArgs)
	}
	if o.IfName != "" {
		env = append(env, "CNI_IFNAME="+o.IfName)
	}
	env = append(env, o.Env...)
	// ip netns exec runs the command in a private (slave) mount namespace: bind-mount the
	// per-test cache over /var/lib/cni there, so cnitool's result cache stays per test.
	args := []string{"ip", "netns", "exec", b.Node, "sh", "-c",
		`mount --bind "$0" /var/lib/cni && exec "$@"`, b.CacheDir,
		b.Bins.Cnitool, verb, n.Name, nsPath}
	stdout, stderr, err := runOut(env, nil, args...)
	res := &Result{Stdout: stdout, Stderr: stderr}
	if err != nil {
		if ee, ok := err.(*ExecError); ok {
			msg := strings.TrimSpace(ee.Stderr)
			if msg == "" {
				msg = strings.TrimSpace(ee.Stdout)
			}
			return res, fmt.Errorf("cnitool %s %s (pod %s): %v: %s", verb, n.Name, podName(p), ee.Err, msg)
		}
		return res, fmt.Errorf("cnitool %s %s (pod %s): %w", verb, n.Name, podName(p), err)
	}
	if verb == "add" && p != nil {
		var r struct {
			IPs []struct {
				Address string `json:"address"`
			} `json:"ips"`
		}
		if json.Unmarshal([]byte(stdout), &r) == nil {
			for _, a := range r.IPs {
				if ip, _, err := net.ParseCIDR(a.Address); err == nil {
					res.IPs = append(res.IPs, ip)
				}
			}
		}
		b.mu.Lock()
		p.mappings[n.Name] = append([]PortMapping(nil), mappings...)
		p.IP4, p.IP6 = nil, nil
		for _, ip := range res.IPs {
			if ip.To4() != nil {
				p.IP4 = ip
			} else {
				p.IP6 = ip
			}
		}
		b.mu.Unlock()
	}
	return res, nil
}

func podName(p *Pod) string {
	if p == nil {
		return "-"
	}
	return p.Name
}

// MustAdd is Add that fails the test on error.
func (n *Network) MustAdd(p *Pod, mappings ...PortMapping) *Result {
	n.Bed.T.Helper()
	r, err := n.Add(p, mappings...)
	if err != nil {
		n.Bed.T.Fatal(err)
	}
	return r
}

// MustDel is Del that fails the test on error.
func (n *Network) MustDel(p *Pod) {
	n.Bed.T.Helper()
	if err := n.Del(p); err != nil {
		n.Bed.T.Fatal(err)
	}
}

// PluginCall runs one plugin binary from the bed's CNI_PATH directly inside the node
// namespace, with CNI_COMMAND=command and the given network config on stdin (for calls
// cnitool cannot make, e.g. GC with a valid-attachments list). env adds/overrides variables
// such as CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS.
func (b *Bed) PluginCall(plugin, command string, stdin []byte, env ...string) (*Result, error) {
	e := append(os.Environ(), b.Env...)
	e = append(e, "CNI_COMMAND="+command, "CNI_PATH="+b.CNIBinDir)
	defaults := map[string]string{"CNI_CONTAINERID": "", "CNI_NETNS": "", "CNI_IFNAME": "eth0"}
	for _, kv := range env {
		delete(defaults, strings.SplitN(kv, "=", 2)[0])
	}
	for k, v := range defaults {
		e = append(e, k+"="+v)
	}
	e = append(e, env...)
	stdout, stderr, err := runOut(e, stdin, "ip", "netns", "exec", b.Node, filepath.Join(b.CNIBinDir, plugin))
	res := &Result{Stdout: stdout, Stderr: stderr}
	if err != nil {
		return res, fmt.Errorf("plugin %s %s: %w", plugin, command, err)
	}
	return res, nil
}

// NthIP returns the k-th address of a subnet (k=1 is the first host address) in CIDR
// notation with the subnet's prefix length, as host-local's "ips" capability wants it.
func NthIP(subnet *net.IPNet, k int) string {
	ip := make(net.IP, len(subnet.IP))
	copy(ip, subnet.IP)
	carry := k
	for i := len(ip) - 1; i >= 0 && carry > 0; i-- {
		sum := int(ip[i]) + carry
		ip[i] = byte(sum & 0xff)
		carry = sum >> 8
	}
	ones, _ := subnet.Mask.Size()
	return fmt.Sprintf("%s/%d", ip, ones)
}
