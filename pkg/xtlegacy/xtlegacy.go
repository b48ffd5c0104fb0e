// Package xtlegacy reads host-port claims from the legacy (x_tables) nat table, the one
// iptables-legacy writes: the jumps of CNI-HOSTPORT-DNAT into CNI-DN chains, as upstream
// portmap and portguard's iptables backend write them. The nftables backend cannot delete
// legacy rules (netlink reaches nf_tables only) but must see them: iptables-legacy's nat
// hooks at priority -100, before portguard's table, so a legacy claim on a port gets the
// port's packets.
//
// It reads in-process, through the getsockopt interface iptables-legacy itself uses
// (IPT_SO_GET_INFO/IPT_SO_GET_ENTRIES and the ip6 ones), and only when the calling
// thread's network namespace has a legacy nat table (Present): asking for the table
// where it does not exist would make the kernel create it. Nothing here writes.
package xtlegacy

import (
	"errors"
	"io"
	"os"
	"slices"
	"strings"

	"github.com/portguard/portguard/pkg/hostport"
)

// Jump is one rule of the legacy CNI-HOSTPORT-DNAT that enters a per-attachment chain.
type Jump struct {
	Family hostport.Family
	Chain  string         // the CNI-DN chain it enters
	Owner  hostport.Owner // from the rule's comment; zero when it has none of the CNI form
	Proto  string         // "tcp", "udp", "sctp" ("" for another protocol or none)
	Ports  []int          // the multiport match's destination ports (ranges expanded)
}

// HasPort reports whether the jump matches proto/port.
func (j Jump) HasPort(proto string, port int) bool {
	return j.Proto == proto && slices.Contains(j.Ports, port)
}

// ErrUnsupported: this build cannot read the legacy table (a 32-bit platform, whose
// structure layout differs).
var ErrUnsupported = errors.New("reading the legacy nat table is not supported on this platform")

// Reader reads the legacy nat tables of the network namespace it was opened in: it holds
// the namespace's table list and a socket per family, so its reads stay there whatever
// thread calls it later (a table list opened in /proc, like a socket, stays bound to the
// namespace of the thread that opened it).
type Reader struct {
	names map[hostport.Family]*os.File // nil: the kernel has no x_tables of the family
	socks map[hostport.Family]int
	// sockErr is why a family's socket could not be opened (e.g. IPv6 disabled); it is
	// only an error when that family has a legacy nat table to read.
	sockErr map[hostport.Family]error
}

// Open opens a Reader in the calling thread's network namespace. A family whose socket
// cannot be opened (IPv6 disabled) fails only the reads of a legacy table it has.
func Open() (*Reader, error) {
	r := &Reader{names: map[hostport.Family]*os.File{}, socks: map[hostport.Family]int{}, sockErr: map[hostport.Family]error{}}
	dir := "/proc/thread-self/net"
	if _, err := os.Stat(dir); err != nil {
		dir = "/proc/net" // kernels before 3.17; a plugin's threads share one namespace
	}
	for _, f := range hostport.Families {
		name := dir + "/ip_tables_names"
		if f == hostport.V6 {
			name = dir + "/ip6_tables_names"
		}
		file, err := os.Open(name)
		if os.IsNotExist(err) {
			continue
		}
		if err != nil {
			r.Close()
			return nil, err
		}
		r.names[f] = file
		fd, err := socket(f)
		if err != nil {
			r.sockErr[f] = err
			continue
		}
		r.socks[f] = fd
	}
	return r, nil
}

// Close releases the files and sockets (a nil Reader has none).
func (r *Reader) Close() {
	if r == nil {
		return
	}
	for _, file := range r.names {
		file.Close()
	}
	for _, fd := range r.socks {
		closeSocket(fd)
	}
}

// Present reports whether family f has a legacy nat table (a nil Reader sees none).
func (r *Reader) Present(f hostport.Family) (bool, error) {
	if r == nil {
		return false, nil
	}
	file := r.names[f]
	if file == nil {
		return false, nil
	}
	b, err := io.ReadAll(io.NewSectionReader(file, 0, 1<<20))
	if err != nil {
		return false, err
	}
	return slices.Contains(strings.Fields(string(b)), "nat"), nil
}

// Jumps reads family f's legacy nat table, if there is one (Present), and returns the
// jumps of its CNI-HOSTPORT-DNAT into CNI-DN chains, in order; none when the table or the
// chain does not exist.
func (r *Reader) Jumps(f hostport.Family) ([]Jump, error) {
	ok, err := r.Present(f)
	if err != nil || !ok {
		return nil, err
	}
	if err := r.sockErr[f]; err != nil {
		return nil, err
	}
	blob, err := entries(r.socks[f], f)
	if err != nil {
		return nil, err
	}
	return parse(f, blob)
}
