// Package conntrack forgets UDP flows to a host port, through netlink (no process), so
// that datagrams move to the new pod at once instead of following a dead mapping.
package conntrack

import (
	"errors"
	"fmt"

	"github.com/containernetworking/plugins/pkg/utils"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/portguard/portguard/pkg/hostport"
)

// FlushUDP deletes the conntrack entries whose original destination port is one of ports.
func FlushUDP(f hostport.Family, ports []int) error {
	fam := netlink.InetFamily(unix.AF_INET)
	if f == hostport.V6 {
		fam = unix.AF_INET6
	}
	var errs []error
	for _, p := range ports {
		if err := utils.DeleteConntrackEntriesForDstPort(uint16(p), utils.PROTOCOL_UDP, fam); err != nil {
			errs = append(errs, fmt.Errorf("%s udp/%d: %w", f, p, err))
		}
	}
	return errors.Join(errs...)
}
