// Package cnicache reads the attachments a runtime's libcni result cache remembers
// (/var/lib/cni/results/<network>-<containerID>-<ifname>, written by libcni after a whole
// chain's ADD and removed after its DEL; kept by containerd's go-cni, CRI-O, podman and
// cnitool). GC uses it to find the chains of attachments that lost every jump (upstream's
// layout records the owner only in the jump comment), and pkg/liveness uses it as evidence
// of where an attachment's sandbox lives.
package cnicache

import (
	"encoding/json"
	"net"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/portguard/portguard/pkg/hostport"
)

// DefaultDir is libcni's default cache directory; PORTGUARD_CNI_CACHE_DIR overrides it.
const DefaultDir = "/var/lib/cni"

// Dir returns the cache directory to read.
func Dir() string {
	if d := os.Getenv("PORTGUARD_CNI_CACHE_DIR"); d != "" {
		return d
	}
	return DefaultDir
}

// Entry is one cached attachment ("cniCacheV1"): its owner, sandbox and addresses.
type Entry struct {
	Owner  hostport.Owner
	IfName string
	Netns  string       // CNI_NETNS of the ADD
	Addrs  []netip.Addr // the result's "ips", in order
	Path   string       // the cache file
}

// file is the part of libcni's cache file portguard reads.
type file struct {
	Kind        string `json:"kind"`
	ContainerID string `json:"containerId"`
	NetworkName string `json:"networkName"`
	IfName      string `json:"ifName"`
	Netns       string `json:"netns"`
	Result      struct {
		IPs []struct {
			Address string `json:"address"`
		} `json:"ips"`
	} `json:"result"`
}

// read parses one cache file; ok is false for unreadable, oversized or foreign files and
// for names outside the CNI grammar (they never reach a rule or a message).
func read(path string) (Entry, bool) {
	b, err := os.ReadFile(path)
	if err != nil || len(b) > 1<<20 {
		return Entry{}, false
	}
	var f file
	if json.Unmarshal(b, &f) != nil || !hostport.ValidNetworkName(f.NetworkName) || !hostport.ValidContainerID(f.ContainerID) {
		return Entry{}, false
	}
	e := Entry{Owner: hostport.Owner{Network: f.NetworkName, ContainerID: f.ContainerID}, IfName: f.IfName, Netns: f.Netns, Path: path}
	for _, ip := range f.Result.IPs {
		if a, _, err := net.ParseCIDR(ip.Address); err == nil {
			if addr, ok := netip.AddrFromSlice(a); ok {
				e.Addrs = append(e.Addrs, addr.Unmap())
			}
		}
	}
	return e, true
}

// Entries returns every attachment cached in dir, optionally only those of network (""
// for all). A missing or unreadable cache yields none: it is a hint, never a requirement.
func Entries(dir, network string) []Entry {
	pattern := "*"
	if network != "" {
		pattern = network + "-*"
	}
	files, _ := filepath.Glob(filepath.Join(dir, "results", pattern))
	var out []Entry
	for _, f := range files {
		if e, ok := read(f); ok && (network == "" || e.Owner.Network == network) {
			out = append(out, e)
		}
	}
	return out
}

// Lookup returns the cached attachments of o (one per interface). An owner without a
// network (upstream's nftables rules name only the container ID) matches the container's
// attachments in every network: any of them alive keeps its claim.
func Lookup(dir string, o hostport.Owner) []Entry {
	var out []Entry
	for _, e := range Entries(dir, o.Network) {
		if e.Owner == o || (o.Network == "" && e.Owner.ContainerID == o.ContainerID) {
			out = append(out, e)
		}
	}
	return out
}

// Owners returns the container IDs the cache holds for network, each once.
func Owners(dir, network string) []hostport.Owner {
	var out []hostport.Owner
	seen := map[string]bool{}
	for _, e := range Entries(dir, network) {
		if !seen[e.Owner.ContainerID] {
			seen[e.Owner.ContainerID] = true
			out = append(out, e.Owner)
		}
	}
	return out
}
