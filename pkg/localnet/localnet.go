// Package localnet lets 127.0.0.1:hostPort reach a pod: the kernel drops 127/8 sources
// that cross a routing boundary unless route_localnet is set on the interface that routes
// to the pod. IPv6 has no equivalent, so [::1]:hostPort cannot be forwarded.
package localnet

import (
	"fmt"
	"net/netip"

	"github.com/containernetworking/plugins/pkg/utils/sysctl"
	"github.com/vishvananda/netlink"
)

// Enable sets route_localnet on the host interface that routes to pod.
func Enable(pod netip.Addr) error {
	routes, err := netlink.RouteGet(pod.AsSlice())
	if err != nil || len(routes) == 0 {
		return nil // no route: nothing would use it anyway
	}
	link, err := netlink.LinkByIndex(routes[0].LinkIndex)
	if err != nil {
		return nil
	}
	name := link.Attrs().Name
	if _, err := sysctl.Sysctl("net/ipv4/conf/"+name+"/route_localnet", "1"); err != nil {
		return fmt.Errorf("route_localnet on %s: %w", name, err)
	}
	return nil
}
