// Package hostport is the vocabulary shared by every verb: address families, protocols,
// owners of attachments, host-port claims and the rule that decides when two claims conflict.
package hostport

import (
	"crypto/sha512"
	"fmt"
	"net/netip"
	"regexp"
	"strings"
)

// Family is an IP address family; each family has its own nat table (iptables / ip6tables).
type Family int

const (
	V4 Family = 4
	V6 Family = 6
)

// Families lists the families in the order every verb visits them.
var Families = []Family{V4, V6}

func (f Family) String() string {
	if f == V6 {
		return "ipv6"
	}
	return "ipv4"
}

// MarshalText writes "ipv4" or "ipv6" in JSON reports.
func (f Family) MarshalText() ([]byte, error) { return []byte(f.String()), nil }

// UnmarshalText reads "ipv4"/"ipv6" (or "4"/"6").
func (f *Family) UnmarshalText(b []byte) error {
	switch string(b) {
	case "ipv4", "4":
		*f = V4
	case "ipv6", "6":
		*f = V6
	default:
		return fmt.Errorf("unknown family %q", b)
	}
	return nil
}

// Of returns the family of an address (IPv4-mapped IPv6 counts as IPv4, as iptables sees it).
func Of(a netip.Addr) Family {
	if a.Unmap().Is4() {
		return V4
	}
	return V6
}

// Protocols that a port mapping may name; iptables spells them in lower case.
var Protocols = map[string]bool{"tcp": true, "udp": true, "sctp": true}

// Owner identifies one CNI attachment the way upstream portmap records it in the jump
// rule's comment: the network name and the container ID.
type Owner struct {
	Network     string `json:"network"`
	ContainerID string `json:"containerID"`
}

func (o Owner) String() string { return o.Network + "/" + o.ContainerID }

// IsZero reports whether nothing identifies the owner (a jump without a parsable comment).
func (o Owner) IsZero() bool { return o.Network == "" && o.ContainerID == "" }

// The CNI spec's grammar for container IDs and network names. Only these characters can
// reach a rule comment, so no input can close the quoted comment and add arguments.
var (
	containerIDPattern = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`)
	networkPattern     = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`)
)

// ValidContainerID reports whether id follows the CNI spec's grammar.
func ValidContainerID(id string) bool { return containerIDPattern.MatchString(id) }

// ValidNetworkName reports whether name follows the CNI spec's grammar.
func ValidNetworkName(name string) bool { return networkPattern.MatchString(name) }

// ChainPrefix starts the name of every per-attachment DNAT chain.
const ChainPrefix = "CNI-DN-"

// The shared chains and comments of upstream portmap's iptables layout; they must never
// change, or nodes could not switch between portmap and portguard.
const (
	DNATChain    = "CNI-HOSTPORT-DNAT"
	SetMarkChain = "CNI-HOSTPORT-SETMARK"
	MasqChain    = "CNI-HOSTPORT-MASQ"

	MasqJumpComment = "CNI portfwd requiring masquerade"
	SetMarkComment  = "CNI portfwd masquerade mark"
)

// ChainName is the per-attachment chain upstream portmap uses: "CNI-DN-" followed by the
// first 21 hex digits of sha512(network name + container ID). Keeping it lets portguard
// take over chains that upstream created, and upstream DEL remove portguard's.
func ChainName(o Owner) string {
	sum := sha512.Sum512([]byte(o.Network + o.ContainerID))
	return ChainPrefix + fmt.Sprintf("%x", sum)[:21]
}

// Comment is the owner's rule comment, in upstream's exact words, trimmed to the
// 255-character limit of the comment match. (Upstream trims to 256, which iptables then
// refuses; portguard keeps the comment valid.)
func Comment(o Owner) string {
	c := fmt.Sprintf(`dnat name: "%s" id: "%s"`, o.Network, o.ContainerID)
	if len(c) > 255 {
		c = c[:252] + "..."
	}
	return c
}

// ParseComment recovers the owner from a jump comment; ok is false for foreign comments and
// for comments that upstream trimmed (the container ID is then incomplete). It runs for
// every jump read, so it slices instead of matching a regular expression.
func ParseComment(c string) (Owner, bool) {
	const pre, mid, post = `dnat name: "`, `" id: "`, `"`
	rest, ok := strings.CutPrefix(c, pre)
	if !ok {
		return Owner{}, false
	}
	rest, ok = strings.CutSuffix(rest, post)
	if !ok {
		return Owner{}, false
	}
	name, id, ok := strings.Cut(rest, mid)
	if !ok || strings.Contains(name, `"`) || strings.Contains(id, `"`) {
		return Owner{}, false
	}
	return Owner{Network: name, ContainerID: id}, true
}

// Claim is one host port as the kernel sees it: traffic to (hostIP, hostPort) over proto in
// one family. An invalid or unspecified HostIP means every local address.
type Claim struct {
	Family   Family     `json:"family"`
	Proto    string     `json:"protocol"`
	HostIP   netip.Addr `json:"hostIP"`
	HostPort int        `json:"hostPort"`
}

// AnyHostIP reports whether the claim covers every local address.
func (c Claim) AnyHostIP() bool { return !c.HostIP.IsValid() || c.HostIP.IsUnspecified() }

func (c Claim) String() string {
	ip := "*"
	if !c.AnyHostIP() {
		ip = c.HostIP.String()
	}
	return fmt.Sprintf("%s/%s %s:%d", c.Family, c.Proto, ip, c.HostPort)
}

// Conflicts is the Kubernetes scheduler's host-port rule: same family, protocol and port,
// and host IPs that overlap (equal, or either one unspecified).
func (c Claim) Conflicts(o Claim) bool {
	if c.Family != o.Family || c.Proto != o.Proto || c.HostPort != o.HostPort {
		return false
	}
	return c.AnyHostIP() || o.AnyHostIP() || c.HostIP.Unmap() == o.HostIP.Unmap()
}
