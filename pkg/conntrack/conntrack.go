// Package conntrack forgets UDP flows to a host port, through netlink (no process), so
// that datagrams move to the new pod at once instead of following a dead mapping.
package conntrack

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/portguard/portguard/pkg/hostport"
)

// udp is IPPROTO_UDP, the protocol the filters match.
const udp = 17

// FlushUDP deletes the conntrack entries of family f whose protocol is UDP and whose
// original destination port is one of ports; with a valid pod address, only the flows that
// address answers (reply source), i.e. the ones DNATed to that pod — DEL passes it, so the
// DEL of a container whose ADD was refused never cuts the flows of the port's live owner.
// ADD passes none: every flow to the port must move to the new pod. All ports go in one call: the kernel's
// conntrack table is dumped once and each entry tested against every port's filter, where
// upstream's utils.DeleteConntrackEntriesForDstPort dumps it once per port. (Going to
// netlinksafe directly also keeps plugins/pkg/utils, and with it go-iptables and knftables,
// out of the plugin.) Errors name the family and ports.
func FlushUDP(f hostport.Family, ports []int, pod netip.Addr) error {
	if len(ports) == 0 {
		return nil
	}
	fam := netlink.InetFamily(unix.AF_INET)
	if f == hostport.V6 {
		fam = unix.AF_INET6
	}
	filters := make([]netlink.CustomConntrackFilter, 0, len(ports))
	for _, p := range ports {
		flt := &netlink.ConntrackFilter{}
		if err := flt.AddProtocol(udp); err != nil {
			return fmt.Errorf("%s udp/%d: %w", f, p, err)
		}
		if err := flt.AddPort(netlink.ConntrackOrigDstPort, uint16(p)); err != nil {
			return fmt.Errorf("%s udp/%d: %w", f, p, err)
		}
		if pod.IsValid() {
			if err := flt.AddIP(netlink.ConntrackReplySrcIP, net.IP(pod.AsSlice())); err != nil {
				return fmt.Errorf("%s udp/%d: %w", f, p, err)
			}
		}
		filters = append(filters, flt)
	}
	if _, err := netlinksafe.ConntrackDeleteFilters(netlink.ConntrackTable, fam, filters...); err != nil {
		return fmt.Errorf("%s: deleting conntrack entries of udp ports %v: %w", f, ports, err)
	}
	return nil
}
