// Package cnicache reads the attachments a runtime's libcni result cache remembers
// (/var/lib/cni/results/<network>-<containerID>-<ifname>, written by libcni after a whole
// chain's ADD and removed after its DEL; kept by containerd's go-cni, CRI-O, podman and
// cnitool). GC uses it to find the chains of attachments that lost every jump (upstream's
// layout records the owner only in the jump comment), and pkg/liveness uses it as evidence
// of where an attachment's sandbox lives.
package cnicache

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"

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

// maxFile bounds what is read of one cache file (libcni's hold a result and a config).
const maxFile = 1 << 20

// ReadRegular reads a regular file of at most max bytes. It follows no symbolic link and
// never blocks on a FIFO or device, so a hostile file in a directory portguard reads can
// neither hang nor exhaust it.
func ReadRegular(path string, max int64) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() || st.Size() > max {
		return nil, fmt.Errorf("%s: not a regular file of at most %d bytes", path, max)
	}
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err == nil && int64(len(b)) > max {
		err = fmt.Errorf("%s: larger than %d bytes", path, max)
	}
	return b, err
}

// read parses one cache file; ok is false for unreadable, oversized, non-regular or foreign
// files and for names outside the CNI grammar (they never reach a rule or a message).
func read(path string) (Entry, bool) {
	b, err := ReadRegular(path, maxFile)
	if err != nil {
		return Entry{}, false
	}
	var f file
	if json.Unmarshal(b, &f) != nil || (f.Kind != "" && f.Kind != "cniCacheV1") ||
		!hostport.ValidNetworkName(f.NetworkName) || !hostport.ValidContainerID(f.ContainerID) {
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

// Lookup returns the cached attachments of o (one per interface): only the files named
// <network>-<containerID>-*, so judging one owner costs its own files, not the network's.
// An owner without a network (upstream's nftables rules name only the container ID)
// matches the container's attachments in every network: any of them alive keeps its claim.
// An owner outside the CNI grammar has none (its names never become a pattern).
func Lookup(dir string, o hostport.Owner) []Entry {
	if !hostport.ValidContainerID(o.ContainerID) || (o.Network != "" && !hostport.ValidNetworkName(o.Network)) {
		return nil
	}
	network := o.Network
	if network == "" {
		network = "*"
	}
	files, _ := filepath.Glob(filepath.Join(dir, "results", network+"-"+o.ContainerID+"-*"))
	var out []Entry
	for _, f := range files {
		if e, ok := read(f); ok && (e.Owner == o || (o.Network == "" && e.Owner.ContainerID == o.ContainerID)) {
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
