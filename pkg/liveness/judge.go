package liveness

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/portguard/portguard/pkg/cnicache"
	"github.com/portguard/portguard/pkg/hostport"
)

// State is the verdict on an owner.
type State string

const (
	// Alive: a record names a network namespace that exists, a process lives in it, and
	// the attachment's interface there holds the claim's destination address.
	Alive State = "alive"
	// Stale: no record of the owner, or its namespace is gone, empty, or no longer holds
	// the address. A stale claim forwards to nothing that belongs to its owner.
	Stale State = "stale"
	// Unknown: the evidence could not be read (e.g. a namespace that cannot be entered).
	// Takeover treats it as alive: a live container must never lose its port on a guess.
	Unknown State = "unknown"
)

// Evidence is the verdict on one owner and what it rests on. It is logged with every
// takeover and GC, shown by audit, and named in the error of a refused ADD.
type Evidence struct {
	State State `json:"state"`
	// Source is the record consulted: "portguard" (portguard's own record) or the path of
	// the libcni cache file; "" when there was none.
	Source string `json:"source,omitempty"`
	Netns  string `json:"netns,omitempty"`
	IfName string `json:"ifName,omitempty"`
	// PID is a process living in Netns (alive only).
	PID int `json:"pid,omitempty"`
	// Reason says in words why the owner is judged so.
	Reason string `json:"reason"`
}

func (e Evidence) String() string { return string(e.State) + ": " + e.Reason }

// Judge gathers evidence. It caches the process table and each verdict, so one Judge
// serves one call (one ADD, one audit); make a new one for the next.
type Judge struct {
	// Records are portguard's own records, consulted first: libcni caches an attachment
	// only after the whole chain's ADD returned, so a claim made a moment ago is known
	// only there.
	Records Store
	// CacheDirs are libcni cache directories (each holding results/), in order.
	CacheDirs []string
	// Proc is the procfs mount to scan for processes ("" = /proc).
	Proc string

	nsPIDs  map[nsID]int // namespace -> one process in it; nil until first needed
	procErr error
	// hidden counts processes whose namespace could not be read (not because they had
	// exited), e.g. a process an LSM or a container runtime hides. They are named in the
	// verdict, not counted as alive: some hosts always have one (a sandbox's pid 1), and
	// treating them as "may be in any namespace" would make every empty namespace unknown.
	hidden  int
	verdict map[verdictKey]Evidence
	holders map[netip.Addr][]hostport.Owner // nil until Holders is first called
}

type nsID struct{ dev, ino uint64 }

type verdictKey struct {
	o    hostport.Owner
	dest netip.Addr
}

// New returns a judge over portguard's records in StateDir and the libcni cache dirs
// (cnicache.Dir() first, then extra, e.g. the conflist's cniCacheDir).
func New(extra ...string) *Judge {
	dirs := []string{cnicache.Dir()}
	for _, d := range extra {
		if d != "" && d != dirs[0] {
			dirs = append(dirs, d)
		}
	}
	return &Judge{Records: Store{Dir: StateDir()}, CacheDirs: dirs}
}

// KnownOwners lists every owner the evidence names: portguard's records, then the owners of
// every libcni cache entry (in CacheDirs order; an owner may appear more than once). It is
// what an nftables element comment that is a hash (owners over 128 bytes) can be matched
// against.
func (j *Judge) KnownOwners() []hostport.Owner {
	var known []hostport.Owner
	for _, r := range j.Records.All() {
		known = append(known, r.Owner)
	}
	for _, d := range j.CacheDirs {
		known = append(known, cnicache.Owners(d, "")...)
	}
	return known
}

// sandbox is one record of where an attachment lives.
type sandbox struct {
	source, netns, ifName string
	addrs                 []netip.Addr
	id                    NetnsID // zero when the record does not say
}

// sandboxes lists o's records: portguard's own, then every libcni cache entry.
func (j *Judge) sandboxes(o hostport.Owner) []sandbox {
	var out []sandbox
	if r, ok := j.Records.Get(o); ok {
		out = append(out, sandbox{"portguard", r.Netns, r.IfName, r.Addrs, r.NetnsID})
	}
	for _, d := range j.CacheDirs {
		for _, e := range cnicache.Lookup(d, o) {
			out = append(out, sandbox{source: e.Path, netns: e.Netns, ifName: e.IfName, addrs: e.Addrs})
		}
	}
	return out
}

// Owner judges o as the owner of a claim forwarding to dest (the DNAT destination
// address; the zero Addr when unknown, then any address of the record counts). The
// owner is alive when any of its records shows it alive.
func (j *Judge) Owner(o hostport.Owner, dest netip.Addr) Evidence {
	dest = dest.Unmap()
	k := verdictKey{o, dest}
	if ev, ok := j.verdict[k]; ok {
		return ev
	}
	ev := j.judge(o, dest)
	if j.verdict == nil {
		j.verdict = map[verdictKey]Evidence{}
	}
	j.verdict[k] = ev
	return ev
}

func (j *Judge) judge(o hostport.Owner, dest netip.Addr) Evidence {
	if o.IsZero() {
		return Evidence{State: Stale, Reason: "the claim names no owner (its jump has no upstream comment)"}
	}
	if !hostport.ValidContainerID(o.ContainerID) || (o.Network != "" && !hostport.ValidNetworkName(o.Network)) {
		// Only CNI-grammar names ever reach a path; such an owner has no record.
		return Evidence{State: Stale, Reason: "the claim's owner is outside the CNI grammar, so nothing records it"}
	}
	boxes := j.sandboxes(o)
	if len(boxes) == 0 {
		where := append([]string{"portguard's records (" + j.Records.Dir + ")"}, j.CacheDirs...)
		return Evidence{State: Stale, Reason: "no record of the attachment in " + strings.Join(where, " or ")}
	}
	var best Evidence
	for i, b := range boxes {
		ev := j.inspect(b, dest)
		if ev.State == Alive {
			return ev
		}
		// Report the most telling verdict: unknown beats stale (it may be alive).
		if i == 0 || (ev.State == Unknown && best.State != Unknown) {
			best = ev
		}
	}
	return best
}

// inspect judges one record.
func (j *Judge) inspect(b sandbox, dest netip.Addr) Evidence {
	ev := Evidence{Source: b.source, Netns: b.netns, IfName: b.ifName}
	verdict := func(s State, format string, a ...any) Evidence {
		ev.State, ev.Reason = s, fmt.Sprintf(format, a...)
		return ev
	}
	if b.netns == "" {
		return verdict(Stale, "the record names no network namespace")
	}
	var st syscall.Stat_t
	if err := syscall.Stat(b.netns, &st); err != nil {
		if errors.Is(err, syscall.ENOENT) {
			return verdict(Stale, "network namespace %s is gone", b.netns)
		}
		return verdict(Unknown, "network namespace %s: %v", b.netns, err)
	}
	var fs syscall.Statfs_t
	if err := syscall.Statfs(b.netns, &fs); err != nil {
		return verdict(Unknown, "network namespace %s: %v", b.netns, err)
	}
	const nsfsMagic = 0x6e736673
	if fs.Type != nsfsMagic {
		// An unmounted bind target (the namespace file of a deleted netns) is a plain file.
		return verdict(Stale, "%s is no longer a network namespace", b.netns)
	}
	if b.id != (NetnsID{}) && b.id != (NetnsID{uint64(st.Dev), st.Ino}) {
		return verdict(Stale, "%s now names another network namespace than the one recorded", b.netns)
	}
	pid, err := j.processIn(nsID{uint64(st.Dev), st.Ino})
	if err != nil {
		return verdict(Unknown, "cannot list processes: %v", err)
	}
	if pid == 0 {
		if j.hidden > 0 {
			return verdict(Stale, "no process lives in network namespace %s (the namespaces of %d processes could not be read)", b.netns, j.hidden)
		}
		return verdict(Stale, "no process lives in network namespace %s", b.netns)
	}
	ev.PID = pid
	held, err := holds(b.netns, b.ifName, dest, b.addrs)
	if err != nil {
		return verdict(Unknown, "pid %d lives in %s, but its addresses cannot be read: %v", pid, b.netns, err)
	}
	if held == "" {
		want := "its addresses"
		if dest.IsValid() {
			want = dest.String()
		}
		ev.PID = 0
		return verdict(Stale, "pid %d lives in %s, but %s no longer holds %s", pid, b.netns, ifText(b.ifName), want)
	}
	return verdict(Alive, "pid %d lives in network namespace %s and %s holds %s", pid, b.netns, ifText(b.ifName), held)
}

func ifText(ifName string) string {
	if ifName == "" {
		return "no interface"
	}
	return "interface " + ifName
}

// processIn returns one process whose network namespace is id (0 if none). The process
// table is read once per Judge: stat of /proc/<pid>/ns/net for every process, ~1 µs each.
func (j *Judge) processIn(id nsID) (int, error) {
	if j.nsPIDs == nil && j.procErr == nil {
		j.nsPIDs, j.hidden, j.procErr = scanProcs(j.Proc)
	}
	return j.nsPIDs[id], j.procErr
}

// scanProcs maps each network namespace to one process in it, and counts the processes
// whose namespace could not be read for another reason than having exited meanwhile.
func scanProcs(proc string) (map[nsID]int, int, error) {
	if proc == "" {
		proc = "/proc"
	}
	d, err := os.Open(proc)
	if err != nil {
		return nil, 0, err
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return nil, 0, err
	}
	hidden := 0
	self := os.Getpid()
	out := map[nsID]int{}
	for _, n := range names {
		pid, err := strconv.Atoi(n)
		if err != nil || pid == self {
			continue
		}
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(proc, n, "ns", "net"), &st); err != nil {
			if !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.ESRCH) {
				hidden++ // e.g. EACCES: a process we may not look at
			}
			continue // gone meanwhile
		}
		k := nsID{uint64(st.Dev), st.Ino}
		if _, ok := out[k]; !ok {
			out[k] = pid
		}
	}
	return out, hidden, nil
}

// holds reports which address the interface ifName in the namespace at path holds: dest
// when valid, otherwise any of addrs; "" when none. An empty ifName looks at every
// interface.
func holds(path, ifName string, dest netip.Addr, addrs []netip.Addr) (string, error) {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return "", err
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns, syscall.NETLINK_ROUTE)
	if err != nil {
		return "", err
	}
	defer h.Close()
	var link netlink.Link
	if ifName != "" {
		if link, err = h.LinkByName(ifName); err != nil {
			var nf netlink.LinkNotFoundError
			if errors.As(err, &nf) {
				return "", nil
			}
			return "", err
		}
	}
	var list []netlink.Addr
	for attempt := 0; ; attempt++ {
		list, err = h.AddrList(link, netlink.FAMILY_ALL)
		if !errors.Is(err, netlink.ErrDumpInterrupted) || attempt == 3 {
			break
		}
	}
	if err != nil {
		return "", err
	}
	want := addrs
	if dest.IsValid() {
		want = []netip.Addr{dest}
	}
	for _, a := range list {
		got, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		for _, w := range want {
			if got.Unmap() == w.Unmap() {
				return w.String(), nil
			}
		}
	}
	return "", nil
}

// Holders returns the owners whose records (portguard's, then each libcni cache's) list
// addr among their addresses, each once: who may hold the address now. Audit uses it to
// find a claim forwarding to an address that another attachment took over.
func (j *Judge) Holders(addr netip.Addr) []hostport.Owner {
	addr = addr.Unmap()
	if j.holders == nil {
		j.holders = map[netip.Addr][]hostport.Owner{}
		seen := map[verdictKey]bool{}
		add := func(o hostport.Owner, addrs []netip.Addr) {
			for _, a := range addrs {
				k := verdictKey{o, a.Unmap()}
				if !seen[k] {
					seen[k] = true
					j.holders[k.dest] = append(j.holders[k.dest], o)
				}
			}
		}
		for _, r := range j.Records.All() {
			add(r.Owner, r.Addrs)
		}
		for _, d := range j.CacheDirs {
			for _, e := range cnicache.Entries(d, "") {
				add(e.Owner, e.Addrs)
			}
		}
	}
	return j.holders[addr]
}
