//go:build linux && (amd64 || arm64 || ppc64le || riscv64 || s390x || loong64 || mips64 || mips64le)

package xtlegacy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/portguard/portguard/pkg/hostport"
)

// The getsockopt interface of ip_tables and ip6_tables (linux/netfilter_ipv4/ip_tables.h,
// linux/netfilter_ipv6/ip6_tables.h): both families number their options alike.
const (
	soGetInfo    = 64 // IPT_SO_GET_INFO, IP6T_SO_GET_INFO
	soGetEntries = 65 // IPT_SO_GET_ENTRIES, IP6T_SO_GET_ENTRIES
	tableNameLen = 32 // XT_TABLE_MAXNAMELEN
	// struct ipt_getinfo: name[32], valid_hooks, hook_entry[5], underflow[5],
	// num_entries, size (u32 each).
	getInfoSize = tableNameLen + 4 + 5*4 + 5*4 + 4 + 4
	// struct ipt_get_entries: name[32], size (u32), then the entries, 8-aligned.
	getEntriesHdr = 40
)

// socket opens the raw socket through which family f's tables are read, in the calling
// thread's network namespace.
func socket(f hostport.Family) (int, error) {
	domain := unix.AF_INET
	if f == hostport.V6 {
		domain = unix.AF_INET6
	}
	fd, err := unix.Socket(domain, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		return -1, fmt.Errorf("legacy nat table: socket: %w", err)
	}
	return fd, nil
}

func closeSocket(fd int) { unix.Close(fd) }

// entries returns the entry table of f's nat table, as the kernel lays it out.
func entries(fd int, f hostport.Family) ([]byte, error) {
	level := unix.IPPROTO_IP
	if f == hostport.V6 {
		level = unix.IPPROTO_IPV6
	}
	// The ruleset may be replaced between the two calls (the size then changes and the
	// kernel answers EAGAIN); read again.
	for try := 0; ; try++ {
		info := make([]byte, getInfoSize)
		copy(info, "nat")
		if err := getsockopt(fd, level, soGetInfo, info); err != nil {
			return nil, fmt.Errorf("legacy nat table: get info: %w", err)
		}
		size := binary.NativeEndian.Uint32(info[getInfoSize-4:])
		buf := make([]byte, getEntriesHdr+int(size))
		copy(buf, "nat")
		binary.NativeEndian.PutUint32(buf[tableNameLen:], size)
		err := getsockopt(fd, level, soGetEntries, buf)
		if errors.Is(err, unix.EAGAIN) && try < 3 {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("legacy nat table: get entries: %w", err)
		}
		return buf[getEntriesHdr:], nil
	}
}

func getsockopt(fd, level, opt int, buf []byte) error {
	l := uint32(len(buf))
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt),
		uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		return e
	}
	return nil
}
