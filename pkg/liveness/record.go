// Package liveness decides, from evidence on the node, whether the owner of a host-port
// claim is still alive: a claim whose owner is gone may be taken over by a new pod, a claim
// whose owner lives must never be.
//
// An owner (network name, container ID) is alive when a record of its attachment names a
// network namespace that still exists, some process still lives in that namespace, and the
// attachment's interface there still holds the claim's destination address. The records
// are portguard's own (written by ADD under the same lock as its rules, removed by DEL) and,
// for attachments portguard did not install, the runtime's libcni result cache
// (/var/lib/cni/results/<network>-<containerID>-<ifname>), which libcni writes only after
// the whole plugin chain returned.
package liveness

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/portguard/portguard/pkg/cnicache"
	"github.com/portguard/portguard/pkg/hostport"
)

// DefaultStateDir holds portguard's records of the attachments it installed, one file per
// owner under attachments/<network>/<containerID>. It is on tmpfs (/run) on purpose: the
// records live exactly as long as the rules they describe, which a reboot clears too.
// PORTGUARD_STATE_DIR overrides it.
const DefaultStateDir = "/run/portguard"

// StateDir returns the directory of portguard's records.
func StateDir() string {
	if d := os.Getenv("PORTGUARD_STATE_DIR"); d != "" {
		return d
	}
	return DefaultStateDir
}

// Record is what portguard remembers of one attachment it installed: where its sandbox
// lives and which addresses its interface had when the claims were made.
type Record struct {
	Owner hostport.Owner `json:"owner"`
	// Netns is the sandbox's network namespace path (CNI_NETNS), e.g. /var/run/netns/cni-….
	Netns string `json:"netns"`
	// IfName is the sandbox interface (CNI_IFNAME) the pod addresses are on.
	IfName string `json:"ifName"`
	// Addrs are the pod addresses the claims forward to, one per family at most.
	Addrs []netip.Addr `json:"addresses"`
	// Time is when ADD wrote the record (RFC 3339, UTC).
	Time time.Time `json:"time"`
	// NetnsID identifies the namespace Netns named when the record was written (device
	// and inode of its nsfs file), so a path reused for another namespace (a recycled
	// /proc/<pid>/ns/net, a new netns under an old name) is not taken for this one.
	// Zero when unknown.
	NetnsID NetnsID `json:"netnsID,omitzero"`
}

// NetnsID is a network namespace's identity: the device and inode of its nsfs file.
type NetnsID struct {
	Dev uint64 `json:"dev"`
	Ino uint64 `json:"ino"`
}

// IdentifyNetns returns the identity of the namespace at path (zero when it cannot be read).
func IdentifyNetns(path string) NetnsID {
	var st syscall.Stat_t
	if path == "" || syscall.Stat(path, &st) != nil {
		return NetnsID{}
	}
	return NetnsID{uint64(st.Dev), st.Ino}
}

// Store keeps Records as files under Dir/attachments. The zero Store (Dir "") stores
// nothing and finds nothing.
type Store struct {
	Dir string
}

// path is Dir/attachments/<network>/<containerID>. Both names follow the CNI grammar
// ([a-zA-Z0-9][a-zA-Z0-9_.-]*: no '/', never "." or ".."), which Put and Get check, so a
// name can neither leave the directory nor alias another owner's file.
func (s Store) path(o hostport.Owner) (string, error) {
	if !hostport.ValidNetworkName(o.Network) || !hostport.ValidContainerID(o.ContainerID) {
		return "", fmt.Errorf("liveness: owner %q is not a valid network name and container ID", o)
	}
	return filepath.Join(s.Dir, "attachments", o.Network, o.ContainerID), nil
}

// Put writes r atomically (a temporary file renamed over the old record), so a reader never
// sees half a record and a killed ADD leaves either the old or the new one.
func (s Store) Put(r Record) error {
	if s.Dir == "" {
		return nil
	}
	p, err := s.path(r.Owner)
	if err != nil {
		return err
	}
	if r.Time.IsZero() {
		r.Time = time.Now().UTC()
	}
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return fmt.Errorf("liveness: record of %s: %w", r.Owner, err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(p), ".tmp-*")
	if err != nil {
		return fmt.Errorf("liveness: record of %s: %w", r.Owner, err)
	}
	_, werr := tmp.Write(b)
	cerr := tmp.Close()
	if err := errors.Join(werr, cerr); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("liveness: record of %s: %w", r.Owner, err)
	}
	if err := os.Rename(tmp.Name(), p); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("liveness: record of %s: %w", r.Owner, err)
	}
	return nil
}

// Get returns the record of o; ok is false when there is none or it cannot be read.
func (s Store) Get(o hostport.Owner) (Record, bool) {
	if s.Dir == "" {
		return Record{}, false
	}
	p, err := s.path(o)
	if err != nil {
		return Record{}, false
	}
	b, err := cnicache.ReadRegular(p, 1<<16)
	if err != nil {
		return Record{}, false
	}
	var r Record
	if json.Unmarshal(b, &r) != nil || r.Owner != o {
		return Record{}, false
	}
	return r, true
}

// Remove deletes the record of o; a missing record is not an error.
func (s Store) Remove(o hostport.Owner) error {
	if s.Dir == "" {
		return nil
	}
	p, err := s.path(o)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("liveness: record of %s: %w", o, err)
	}
	os.Remove(filepath.Dir(p)) // the network's directory, once empty
	return nil
}

// All returns every record in the store (audit's view of what portguard installed);
// unreadable files are skipped.
func (s Store) All() []Record {
	if s.Dir == "" {
		return nil
	}
	files, _ := filepath.Glob(filepath.Join(s.Dir, "attachments", "*", "*"))
	var out []Record
	for _, f := range files {
		o := hostport.Owner{Network: filepath.Base(filepath.Dir(f)), ContainerID: filepath.Base(f)}
		if r, ok := s.Get(o); ok {
			out = append(out, r)
		}
	}
	return out
}
