// Package config parses and validates the network configuration exactly as upstream
// portmap reads it, plus portguard's own keys. Every error is a CNI error that names the
// offending field, and nothing reaches an iptables payload without passing through here.
package config

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/nftcond"
)

// Conflict policies for a host port already claimed by another owner.
//
//   - takeover (default): take over claims whose owners are stale (pkg/liveness); refuse the
//     ADD, changing nothing, when any conflicting owner is alive or cannot be judged;
//   - force: take over every conflicting claim, even a live owner's (unsafe: that
//     container loses its port);
//   - reject: refuse the ADD on any conflicting claim;
//   - allow: install beside the other claims (the newest first) and remove none.
const (
	PolicyTakeover = "takeover"
	PolicyForce    = "force"
	PolicyReject   = "reject"
	PolicyAllow    = "allow"
)

// Backends, as the backend key spells them.
const (
	BackendIPTables = "iptables"
	BackendNFTables = "nftables"
)

// DefaultBackend picks the backend of a configuration without the backend key (nil:
// BackendIPTables). The plugin sets it to its probe of the node (upstream's rule: nftables
// when iptables is unusable and nf_tables works); it is a hook so this package stays free
// of the node.
var DefaultBackend func() string

const (
	DefaultMarkBit     = 13
	DefaultLockTimeout = 60 * time.Second
)

// PortMapEntry is one entry of runtimeConfig.portMappings (CNI conventions).
type PortMapEntry struct {
	HostPort      int    `json:"hostPort"`
	ContainerPort int    `json:"containerPort"`
	Protocol      string `json:"protocol"`
	HostIP        string `json:"hostIP,omitempty"`
}

// NetConf is the JSON the runtime sends on stdin.
type NetConf struct {
	types.NetConf

	SNAT                 *bool     `json:"snat,omitempty"`
	MasqAll              bool      `json:"masqAll,omitempty"`
	MarkMasqBit          *int      `json:"markMasqBit,omitempty"`
	ExternalSetMarkChain *string   `json:"externalSetMarkChain,omitempty"`
	ConditionsV4         *[]string `json:"conditionsV4,omitempty"`
	ConditionsV6         *[]string `json:"conditionsV6,omitempty"`
	Backend              *string   `json:"backend,omitempty"`
	RuntimeConfig        struct {
		PortMaps []PortMapEntry `json:"portMappings,omitempty"`
	} `json:"runtimeConfig,omitempty"`
	// PortMappingsSent says the runtime passed the portMappings key at all (a list, empty or
	// null), as runtimes do once the conflist declares the capability.
	PortMappingsSent bool `json:"-"`

	ConflictPolicy string `json:"conflictPolicy,omitempty"`
	LogFile        string `json:"logFile,omitempty"`
	LockTimeout    *int   `json:"lockTimeout,omitempty"`
	// CNICacheDir is one more libcni cache directory (holding results/) to read as
	// evidence of live owners, for a runtime whose cache is not in /var/lib/cni.
	CNICacheDir string `json:"cniCacheDir,omitempty"`
}

// Mapping is a validated port mapping.
type Mapping struct {
	Proto         string
	HostPort      int
	ContainerPort int
	HostIP        netip.Addr // invalid: any address
}

// AnyHostIP reports whether the mapping listens on every local address.
func (m Mapping) AnyHostIP() bool { return !m.HostIP.IsValid() || m.HostIP.IsUnspecified() }

// AppliesTo reports whether the mapping is installed for a family: a specific or
// unspecified hostIP pins the family (upstream skips a mismatched one).
func (m Mapping) AppliesTo(f hostport.Family) bool {
	return !m.HostIP.IsValid() || hostport.Of(m.HostIP) == f
}

// Claim is the host port the mapping claims in family f (which it must apply to): the
// protocol, the port, and the host IP unless it listens on every address.
func (m Mapping) Claim(f hostport.Family) hostport.Claim {
	c := hostport.Claim{Family: f, Proto: m.Proto, HostPort: m.HostPort}
	if !m.AnyHostIP() {
		c.HostIP = m.HostIP
	}
	return c
}

// Claims lists, in mapping order, the claims of the mappings that apply to family f.
func (c *Config) Claims(f hostport.Family) []hostport.Claim {
	var out []hostport.Claim
	for _, m := range c.Mappings {
		if m.AppliesTo(f) {
			out = append(out, m.Claim(f))
		}
	}
	return out
}

// Config is the validated configuration of one call.
type Config struct {
	Raw                  *NetConf
	Network              string
	CNIVersion           string
	SNAT                 bool
	MasqAll              bool
	MarkBit              int
	ExternalSetMarkChain string
	// Backend is BackendIPTables or BackendNFTables.
	Backend string
	// Conditions are the iptables backend's conditionsV4/V6: iptables match arguments.
	Conditions map[hostport.Family][]string
	// NFTConditions are the nftables backend's conditionsV4/V6, parsed from nft syntax
	// (pkg/nftcond); a family without conditions has no entry.
	NFTConditions map[hostport.Family]nftcond.Conditions
	Mappings      []Mapping
	Policy        string
	LogFile       string
	LockTimeout   time.Duration
	CNICacheDir   string // "" or an absolute path
	PrevResult    *current.Result
	// PodIPs is the container address per family, taken from prevResult as upstream does.
	PodIPs map[hostport.Family]netip.Prefix
}

func invalid(field, format string, a ...any) *types.Error {
	return types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("%s: %s", field, fmt.Sprintf(format, a...)), "")
}

// ValidateContainerID checks CNI_CONTAINERID against the spec's grammar.
func ValidateContainerID(id string) error {
	if !hostport.ValidContainerID(id) {
		return types.NewError(types.ErrInvalidEnvironmentVariables,
			fmt.Sprintf("CNI_CONTAINERID: %q is not a valid container ID (letters, digits, '_', '.', '-'; starting with a letter or digit)", truncate(id)), "")
	}
	return nil
}

func truncate(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// Parse reads stdin for ADD, CHECK, GC and STATUS. ifName is CNI_IFNAME: the pod
// addresses are the ones prevResult reports on that sandbox interface. When a port
// mapping applies to a family, the address it would be forwarded to must be one a host
// port can reach (see podAddrProblem); otherwise the error is a CNI error (code 7,
// ErrInvalidNetworkConfig) naming prevResult.ips[i].
func Parse(stdin []byte, ifName string) (*Config, error) { return parseConf(stdin, ifName, true) }

// ParseDel reads stdin for DEL: as Parse, but the pod addresses Parse refuses are read as
// they always were, and conditions Parse refuses are dropped (Config.Conditions has none for
// that family). DEL must remove whatever an ADD installed, also one by upstream portmap or
// an earlier portguard that accepted such an address or condition (e.g. a host name in
// "-d"); refusing it would leave those rules behind and fail the pod's teardown on every
// retry. Without the conditions DEL cannot spell the jump rules, so it finds them by the
// chain they enter; nothing of a dropped condition reaches the kernel.
func ParseDel(stdin []byte, ifName string) (*Config, error) { return parseConf(stdin, ifName, false) }

func parseConf(stdin []byte, ifName string, strict bool) (*Config, error) {
	raw := &NetConf{}
	if err := json.Unmarshal(stdin, raw); err != nil {
		return nil, decodeError(err)
	}
	var sent struct {
		RuntimeConfig map[string]json.RawMessage `json:"runtimeConfig"`
	}
	if json.Unmarshal(stdin, &sent) == nil {
		_, raw.PortMappingsSent = sent.RuntimeConfig["portMappings"]
	}
	c := &Config{Raw: raw, Network: raw.Name, CNIVersion: raw.CNIVersion, MasqAll: raw.MasqAll,
		Backend: BackendIPTables, Conditions: map[hostport.Family][]string{},
		NFTConditions: map[hostport.Family]nftcond.Conditions{}, PodIPs: map[hostport.Family]netip.Prefix{}}

	if !hostport.ValidNetworkName(raw.Name) {
		return nil, invalid("name", "%q is not a valid network name (letters, digits, '_', '.', '-'; starting with a letter or digit)", truncate(raw.Name))
	}

	c.SNAT = raw.SNAT == nil || *raw.SNAT

	if raw.MarkMasqBit != nil && raw.ExternalSetMarkChain != nil {
		return nil, invalid("markMasqBit", "cannot be set together with externalSetMarkChain")
	}
	c.MarkBit = DefaultMarkBit
	if raw.MarkMasqBit != nil {
		if *raw.MarkMasqBit < 0 || *raw.MarkMasqBit > 31 {
			return nil, invalid("markMasqBit", "%d is outside 0-31", *raw.MarkMasqBit)
		}
		c.MarkBit = *raw.MarkMasqBit
	}
	if raw.ExternalSetMarkChain != nil {
		if !validChain(*raw.ExternalSetMarkChain) {
			return nil, invalid("externalSetMarkChain", "%q is not a valid iptables chain name", truncate(*raw.ExternalSetMarkChain))
		}
		c.ExternalSetMarkChain = *raw.ExternalSetMarkChain
	}

	if raw.Backend != nil {
		switch *raw.Backend {
		case BackendIPTables, BackendNFTables:
			c.Backend = *raw.Backend
		default:
			return nil, invalid("backend", "unknown backend %q (want \"iptables\" or \"nftables\")", truncate(*raw.Backend))
		}
	} else if DefaultBackend != nil {
		c.Backend = DefaultBackend()
	}
	if c.Backend == BackendNFTables {
		// The iptables backend's mark options have no meaning in the nftables table (it
		// masquerades by conntrack state, not by a mark), and conflictPolicy allow asks
		// for duplicate claims, which its maps cannot hold.
		if raw.MarkMasqBit != nil {
			return nil, invalid("markMasqBit", "is an option of the iptables backend; the nftables backend does not use a mark")
		}
		if raw.ExternalSetMarkChain != nil {
			return nil, invalid("externalSetMarkChain", "is an option of the iptables backend; the nftables backend does not use a mark")
		}
		if raw.ConflictPolicy == PolicyAllow {
			return nil, invalid("conflictPolicy", "allow (duplicate claims) is not possible with the nftables backend: a host port has one claim")
		}
	}

	for _, cond := range []struct {
		field string
		f     hostport.Family
		v     *[]string
	}{{"conditionsV4", hostport.V4, raw.ConditionsV4}, {"conditionsV6", hostport.V6, raw.ConditionsV6}} {
		if cond.v == nil {
			continue
		}
		if c.Backend == BackendNFTables {
			nc, err := nftConditions(cond.field, cond.f, *cond.v)
			if err != nil && strict {
				return nil, err
			}
			if err == nil && !nc.Empty() {
				c.NFTConditions[cond.f] = nc
			}
			continue
		}
		args, err := validConditions(cond.field, cond.f, *cond.v)
		if err != nil && strict {
			return nil, err
		}
		if err == nil {
			c.Conditions[cond.f] = args
		}
	}

	switch raw.ConflictPolicy {
	case "", PolicyTakeover:
		c.Policy = PolicyTakeover
	case PolicyForce, PolicyReject, PolicyAllow:
		c.Policy = raw.ConflictPolicy
	default:
		return nil, invalid("conflictPolicy", "unknown policy %q (want takeover, force, reject or allow)", truncate(raw.ConflictPolicy))
	}
	c.CNICacheDir = raw.CNICacheDir
	if c.CNICacheDir != "" && (!strings.HasPrefix(c.CNICacheDir, "/") || iptables.CheckArg(c.CNICacheDir) != nil) {
		return nil, invalid("cniCacheDir", "%q must be an absolute path without control characters", truncate(c.CNICacheDir))
	}
	c.LogFile = raw.LogFile
	if c.LogFile != "" && !strings.HasPrefix(c.LogFile, "/") {
		return nil, invalid("logFile", "%q must be an absolute path", truncate(c.LogFile))
	}
	c.LockTimeout = DefaultLockTimeout
	if raw.LockTimeout != nil {
		if *raw.LockTimeout < 1 || *raw.LockTimeout > 3600 {
			return nil, invalid("lockTimeout", "%d seconds is outside 1-3600", *raw.LockTimeout)
		}
		c.LockTimeout = time.Duration(*raw.LockTimeout) * time.Second
	}

	maps, err := validMappings(raw.RuntimeConfig.PortMaps)
	if err != nil {
		return nil, err
	}
	c.Mappings = maps

	if raw.RawPrevResult != nil {
		if err := version.ParsePrevResult(&raw.NetConf); err != nil {
			return nil, invalid("prevResult", "%v", err)
		}
		res, err := current.NewResultFromResult(raw.PrevResult)
		if err != nil {
			return nil, invalid("prevResult", "cannot convert to the current result version: %v", err)
		}
		c.PrevResult = res
		var used map[hostport.Family]bool
		if strict {
			used = map[hostport.Family]bool{}
			for _, f := range hostport.Families {
				for _, m := range c.Mappings {
					used[f] = used[f] || m.AppliesTo(f)
				}
			}
		}
		if c.PodIPs, err = podIPs(res, ifName, used); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// decodeError turns encoding/json's message into a CNI error naming the field.
func decodeError(err error) error {
	var te *json.UnmarshalTypeError
	var se *json.SyntaxError
	switch {
	case asErr(err, &te):
		field := te.Field
		if field == "" {
			field = "(top level)"
		}
		return invalid(field, "expected %s, got JSON %s", te.Type, te.Value)
	case asErr(err, &se):
		return invalid("(config)", "malformed JSON at byte %d: %v", se.Offset, se)
	}
	return invalid("(config)", "cannot parse network configuration: %v", err)
}

func validChain(name string) bool {
	if name == "" || len(name) > 28 {
		return false
	}
	for _, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return false
		}
	}
	return true
}

// Limits on conditions: iptables-restore reads a line in 10 KiB pieces and would run the
// rest of an overlong line as a command of its own.
const (
	maxConditions   = 32
	maxConditionLen = 256
)

// commandOptions are iptables' command and global options. getopt accepts any unambiguous
// prefix of a long option and glued short options, so a condition must not start any of
// them in any spelling.
var commandOptions = []string{"append", "insert", "delete", "replace", "check", "list", "list-rules",
	"flush", "zero", "new-chain", "delete-chain", "policy", "rename-chain", "table", "jump", "goto",
	"help", "version", "wait", "wait-interval", "line-numbers", "modprobe", "exact", "numeric", "verbose"}

// validConditions accepts iptables match arguments only: no command, jump or table option
// in any spelling, no byte that could end the restore line, a bounded size, and address
// options whose kernel rules can be known (validAddresses).
func validConditions(field string, f hostport.Family, conds []string) ([]string, error) {
	if len(conds) == 0 || (len(conds) == 1 && conds[0] == "") {
		return nil, nil
	}
	if c := conds[0]; c == "" || (c[0] != '-' && c[0] != '!') {
		return nil, invalid(field, "%q looks like an nftables condition; the iptables backend needs iptables arguments (e.g. \"-d\", \"192.0.2.1\")", truncate(c))
	}
	if len(conds) > maxConditions {
		return nil, invalid(field, "%d arguments; at most %d", len(conds), maxConditions)
	}
	var out []string
	for i, a := range conds {
		item := fmt.Sprintf("%s[%d]", field, i)
		if err := iptables.CheckArg(a); err != nil || a == "" || len(a) > maxConditionLen {
			return nil, invalid(item, "empty, longer than %d bytes, or contains a control character", maxConditionLen)
		}
		if isCommandOption(a) {
			return nil, invalid(item, "%q is not a match condition", truncate(a))
		}
		out = append(out, a)
	}
	if err := validAddresses(field, f, out); err != nil {
		return nil, err
	}
	return out, nil
}

// nftConditions parses one family's conditions for the nftables backend (pkg/nftcond
// documents the accepted subset), refusing iptables arguments as upstream does.
func nftConditions(field string, f hostport.Family, conds []string) (nftcond.Conditions, error) {
	if len(conds) > 0 && conds[0] != "" && (conds[0][0] == '-' || conds[0][0] == '!') {
		return nftcond.Conditions{}, invalid(field, "%q looks like an iptables argument; the nftables backend needs nft matches (e.g. \"ip saddr 192.0.2.1\")", truncate(conds[0]))
	}
	nc, err := nftcond.Parse(field, f, conds)
	if e, ok := err.(*nftcond.Error); ok {
		return nc, invalid(e.Field, "%s", e.Msg)
	}
	return nc, err
}

func isCommandOption(a string) bool {
	if name, ok := strings.CutPrefix(a, "--"); ok {
		name, _, _ = strings.Cut(name, "=")
		for _, c := range commandOptions {
			if name != "" && strings.HasPrefix(c, name) {
				return true
			}
		}
		return false
	}
	if len(a) < 2 || a[0] != '-' || (a[1] >= '0' && a[1] <= '9') {
		return false
	}
	// A short option, possibly with others or its value glued on: its first letter decides.
	return strings.IndexByte("AIDRNXFLSZPECjgtwWhVv", a[1]) >= 0
}

type claimKey struct {
	proto string
	ip    netip.Addr
	port  int
}

func validMappings(entries []PortMapEntry) ([]Mapping, error) {
	var out []Mapping
	seen := map[claimKey]int{}
	for i, e := range entries {
		field := fmt.Sprintf("runtimeConfig.portMappings[%d]", i)
		if e.HostPort < 1 || e.HostPort > 65535 {
			return nil, invalid(field+".hostPort", "%d is outside 1-65535", e.HostPort)
		}
		if e.ContainerPort < 1 || e.ContainerPort > 65535 {
			return nil, invalid(field+".containerPort", "%d is outside 1-65535", e.ContainerPort)
		}
		proto := strings.ToLower(e.Protocol)
		if proto == "" {
			proto = "tcp"
		}
		if !hostport.Protocols[proto] {
			return nil, invalid(field+".protocol", "%q is not tcp, udp or sctp", truncate(e.Protocol))
		}
		m := Mapping{Proto: proto, HostPort: e.HostPort, ContainerPort: e.ContainerPort}
		if e.HostIP != "" {
			ip, err := netip.ParseAddr(e.HostIP)
			if err != nil || ip.Zone() != "" {
				return nil, invalid(field+".hostIP", "%q is not an IP address", truncate(e.HostIP))
			}
			m.HostIP = ip.Unmap()
		}
		k := claimKey{proto, m.HostIP, m.HostPort}
		if j, dup := seen[k]; dup {
			if out[j].ContainerPort == m.ContainerPort {
				continue // an exact repeat changes nothing
			}
			return nil, invalid(field, "host port %s/%d is already mapped by entry %d to another container port", proto, m.HostPort, j)
		}
		seen[k] = len(out)
		out = append(out, m)
	}
	return out, nil
}

// podIPs picks, per family, the first address prevResult puts on the sandbox interface
// ifName (addresses without an interface index count, as upstream counts them). The one
// picked for a family in check must pass podAddrProblem, or podIPs returns a CNI error
// naming prevResult.ips[i]; in other families an impossible prefix is skipped and any
// other address kept, as before the check existed.
func podIPs(res *current.Result, ifName string, check map[hostport.Family]bool) (map[hostport.Family]netip.Prefix, error) {
	out := map[hostport.Family]netip.Prefix{}
	for i, ip := range res.IPs {
		if ip.Interface != nil {
			k := *ip.Interface
			if k >= 0 && k < len(res.Interfaces) && (res.Interfaces[k].Name != ifName || res.Interfaces[k].Sandbox == "") {
				continue
			}
		}
		raw, ok := netip.AddrFromSlice(ip.Address.IP)
		if !ok {
			continue
		}
		ones, bits := ip.Address.Mask.Size()
		if raw.Is4In6() && bits == 128 {
			ones, bits = ones-96, 32 // "::ffff:10.0.0.5/120": the prefix counts IPv6 bits
		}
		addr := raw.Unmap()
		p := netip.PrefixFrom(addr, ones)
		f := hostport.Of(addr)
		if _, have := out[f]; have {
			continue
		}
		if bits != addr.BitLen() {
			p = netip.Prefix{} // a mask of another family, or no mask
		}
		if check[f] {
			if why := podAddrProblem(p, addr); why != "" {
				return nil, invalid(fmt.Sprintf("prevResult.ips[%d]", i), "pod address %s is %s; host ports cannot be forwarded to it", ip.Address.String(), why)
			}
		}
		if !p.IsValid() {
			continue
		}
		out[f] = p
	}
	return out, nil
}

// podAddrProblem says why a pod address (p, or addr when p is invalid) cannot be a DNAT
// destination, or "". IPv4 link-local unicast (169.254/16) passes: Linux forwards it like
// any other address, Kubernetes accepts it as a pod IP (it refuses link-local only for
// Service endpoints), and upstream portmap installs it; some CNIs hand pods such addresses
// (the AWS VPC CNI's IPv4 egress in IPv6 clusters). IPv6 link-local unicast (fe80::/10) is
// refused: a packet is never forwarded to it from another link (RFC 4291 2.5.6), and every
// interface of the node routes fe80::/64, so a DNAT to it could not reach the pod.
func podAddrProblem(p netip.Prefix, addr netip.Addr) string {
	switch {
	case !p.IsValid():
		return "an impossible prefix (its length does not fit the address)"
	case addr.IsUnspecified():
		return "the unspecified address"
	case addr.IsLoopback():
		return "a loopback address"
	case addr.IsLinkLocalMulticast():
		return "a link-local multicast address"
	case addr.IsMulticast():
		return "a multicast address"
	case addr == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return "the limited broadcast address"
	case addr.Is6() && addr.IsLinkLocalUnicast():
		return "an IPv6 link-local address (never forwarded from another link)"
	case addr.Is4() && p.Bits() < 31 && addr == lastAddr(p):
		return "the broadcast address of " + p.Masked().String()
	}
	return ""
}

// lastAddr is the highest address of an IPv4 prefix (its subnet broadcast address).
func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().As4()
	host := ^uint32(0) >> p.Bits()
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3]) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}
