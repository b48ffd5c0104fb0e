// Package cnicache lists the attachments a runtime's libcni cache remembers for a network.
// GC uses it to find the chains of attachments that lost every jump: upstream's layout
// records the owner only in the jump comment, so such a chain can only be recognised by
// recomputing its name from a container ID known from elsewhere.
package cnicache

import (
	"encoding/json"
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

// entry is the part of libcni's cached attachment ("cniCacheV1") that names its owner.
type entry struct {
	Kind        string `json:"kind"`
	ContainerID string `json:"containerId"`
	NetworkName string `json:"networkName"`
}

// Owners returns the container IDs the cache holds for network. A missing or unreadable
// cache yields none: it is a hint, never a requirement.
func Owners(dir, network string) []hostport.Owner {
	files, _ := filepath.Glob(filepath.Join(dir, "results", "*"))
	var out []hostport.Owner
	seen := map[string]bool{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil || len(b) > 1<<20 {
			continue
		}
		var e entry
		if json.Unmarshal(b, &e) != nil || e.NetworkName != network || seen[e.ContainerID] ||
			!hostport.ValidContainerID(e.ContainerID) {
			continue
		}
		seen[e.ContainerID] = true
		out = append(out, hostport.Owner{Network: network, ContainerID: e.ContainerID})
	}
	return out
}
