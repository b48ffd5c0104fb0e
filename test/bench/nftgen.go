package main

// Generation of the nftables side of a node for `-backend nftables`: kube-proxy's
// nftables-mode table (table `ip kube-proxy`, as kube-proxy v1.31+ writes it: verdict maps
// keyed by `ip daddr . meta l4proto . th dport`, one chain per service and per endpoint),
// and host-port attachments in the exact format upstream portmap v1.10.0's nftables backend
// leaves behind (`ip cni_hostport`, one rule per mapping and two masquerade rules per pod).

import (
	"fmt"
	"net/netip"
	"strings"
)

// kubeProxyNFT renders `nft -f` input for kube-proxy's table with services ClusterIP
// services of 1-3 endpoints each (every tenth also a NodePort on the node's addresses),
// and returns the number of chains it has (the cost of listing the ruleset's chains).
func kubeProxyNFT(services int) (script string, chains int) {
	var b strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	w("table ip kube-proxy {\n\tcomment \"rules for kube-proxy\"\n")
	w("\tset cluster-ips {\n\t\ttype ipv4_addr\n\t\tcomment \"Active ClusterIPs\"\n\t}\n")
	w("\tset nodeport-ips {\n\t\ttype ipv4_addr\n\t\tcomment \"IPs that accept NodePort traffic\"\n\t}\n")
	for _, m := range []struct{ name, key, comment string }{
		{"firewall-ips", "ipv4_addr . inet_proto . inet_service", "destinations that are subject to LoadBalancerSourceRanges"},
		{"no-endpoint-nodeports", "inet_proto . inet_service", "vmap to drop or reject packets to service nodeports with no endpoints"},
		{"no-endpoint-services", "ipv4_addr . inet_proto . inet_service", "vmap to drop or reject packets to services with no endpoints"},
		{"service-ips", "ipv4_addr . inet_proto . inet_service", "ClusterIP, ExternalIP and LoadBalancer IP traffic"},
		{"service-nodeports", "inet_proto . inet_service", "NodePort traffic"},
	} {
		w("\tmap %s {\n\t\ttype %s : verdict\n\t\tcomment \"%s\"\n\t}\n", m.name, m.key, m.comment)
	}
	base := []string{
		"cluster-ips-check {\n\t\tip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n\t\tip daddr 10.96.0.0/16 drop comment \"Drop traffic to unallocated ClusterIPs\"\n\t}",
		"filter-forward {\n\t\ttype filter hook forward priority -110; policy accept;\n\t\tct state new jump service-endpoints-check\n\t\tct state new jump cluster-ips-check\n\t}",
		"filter-input {\n\t\ttype filter hook input priority -110; policy accept;\n\t\tct state new jump nodeport-endpoints-check\n\t\tct state new jump service-endpoints-check\n\t}",
		"filter-output {\n\t\ttype filter hook output priority -110; policy accept;\n\t\tct state new jump service-endpoints-check\n\t\tct state new jump firewall-check\n\t}",
		"filter-output-post-dnat {\n\t\ttype filter hook output priority -90; policy accept;\n\t\tct state new jump cluster-ips-check\n\t}",
		"filter-prerouting {\n\t\ttype filter hook prerouting priority -110; policy accept;\n\t\tct state new jump firewall-check\n\t}",
		"firewall-check {\n\t\tip daddr . meta l4proto . th dport vmap @firewall-ips\n\t}",
		"mark-for-masquerade {\n\t\tmeta mark set meta mark | 0x00004000\n\t}",
		"masquerading {\n\t\tmeta mark & 0x00004000 == 0x00000000 return\n\t\tmeta mark set meta mark ^ 0x00004000\n\t\tmasquerade fully-random\n\t}",
		"nat-output {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tjump services\n\t}",
		"nat-postrouting {\n\t\ttype nat hook postrouting priority 100; policy accept;\n\t\tjump masquerading\n\t}",
		"nat-prerouting {\n\t\ttype nat hook prerouting priority -100; policy accept;\n\t\tjump services\n\t}",
		"nodeport-endpoints-check {\n\t\tip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports\n\t}",
		"service-endpoints-check {\n\t\tip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\t}",
		"services {\n\t\tip daddr . meta l4proto . th dport vmap @service-ips\n\t\tip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n\t}",
	}
	for _, c := range base {
		w("\tchain %s\n", c)
	}
	chains = len(base)
	var clusterIPs, svcElems, npElems []string
	for s := 0; s < services; s++ {
		eps := 1 + s%3
		spn := fmt.Sprintf("ns-%d/svc-%d/tcp/http", s/40, s)
		vip := netip.AddrFrom4([4]byte{10, 96, byte(s / 250), byte(1 + s%250)})
		port := 80 + s%5
		svc := "service-" + kubeHash(spn)[:8] + "-" + spn
		clusterIPs = append(clusterIPs, vip.String())
		var vm []string
		for e := 0; e < eps; e++ {
			ep := netip.AddrFrom4([4]byte{10, 244, byte(100 + (s*3+e)/250%50), byte(2 + (s*3+e)%250)})
			epc := fmt.Sprintf("endpoint-%s-%s__%s/8080", kubeHash(spn + ep.String())[:8], spn, ep)
			w("\tchain %s {\n\t\tip saddr %s jump mark-for-masquerade\n\t\tmeta l4proto tcp dnat to %s:8080\n\t}\n", epc, ep, ep)
			vm = append(vm, fmt.Sprintf("%d : goto %s", e, epc))
			chains++
		}
		w("\tchain %s {\n\t\tip daddr %s tcp dport %d ip saddr != %s jump mark-for-masquerade\n\t\tnumgen random mod %d vmap { %s }\n\t}\n",
			svc, vip, port, clusterCIDR, eps, strings.Join(vm, ", "))
		chains++
		svcElems = append(svcElems, fmt.Sprintf("%s . tcp . %d : goto %s", vip, port, svc))
		if s%10 == 0 {
			npElems = append(npElems, fmt.Sprintf("tcp . %d : goto %s", 30000+s/10, svc))
		}
	}
	w("}\n")
	elems := func(set string, es []string) {
		for len(es) > 0 {
			k := min(len(es), 500)
			w("add element ip kube-proxy %s { %s }\n", set, strings.Join(es[:k], ", "))
			es = es[k:]
		}
	}
	elems("cluster-ips", clusterIPs)
	elems("nodeport-ips", []string{"10.244.0.1"})
	elems("service-ips", svcElems)
	elems("service-nodeports", npElems)
	return b.String(), chains
}

// upstreamNFTTable is upstream's `ip cni_hostport` table as `nft list` prints it after
// ADDs of existing attachments 0..n-1 (snat: true, IPv4 pods, no conditions), in nft -f
// syntax; TestNFTGeneratorMatchesUpstream proves it equals what upstream's ADDs write.
func upstreamNFTTable(n int) string {
	var hp, masq strings.Builder
	for i := 0; i < n; i++ {
		a := existingAttachment(i)
		for k, p := range a.Ports {
			fmt.Fprintf(&hp, "\t\ttcp dport %d dnat to %s:%d comment \"%s\"\n", p, a.IP, containerPorts[k], a.ID)
		}
		fmt.Fprintf(&masq, "\t\tip saddr %s ip daddr %s masquerade comment \"%s\"\n", a.IP, a.IP, a.ID)
		fmt.Fprintf(&masq, "\t\tip saddr 127.0.0.1 ip daddr %s masquerade comment \"%s\"\n", a.IP, a.ID)
	}
	return "table ip cni_hostport {\n\tcomment \"CNI portmap plugin\"\n" +
		"\tchain hostports {\n" + hp.String() + "\t}\n\n" +
		"\tchain hostip_hostports {\n\t}\n\n" +
		"\tchain hostports_all {\n\t\tjump hostip_hostports\n\t\tjump hostports\n\t}\n\n" +
		"\tchain prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tfib daddr type local jump hostports_all\n\t}\n\n" +
		"\tchain output {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tfib daddr type local jump hostports_all\n\t}\n\n" +
		"\tchain masquerading {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n" + masq.String() + "\t}\n}\n"
}
