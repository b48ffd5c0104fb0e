package main

// Generation of the node's starting nat table: kube-proxy-like foreign rules and
// host-port attachments in the exact format upstream portmap v1.10.0 (iptables
// backend) leaves behind, as one iptables-restore payload.

import (
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base32"
	"encoding/hex"
	"fmt"
	"net/netip"
	"strings"
)

const (
	netName      = "pgbnet" // CNI network name used by every attachment
	podCIDRBits  = 16       // pod IPs are 10.244.0.0/16 (the node bridge cni0)
	existingPort = 10000    // existing attachment i holds existingPort+2i and +2i+1
	drainPort    = 50000    // drain attachment i holds drainPort+2i and +2i+1
	measurePort  = 60000    // the measured attachment holds 60000 and 60001
	maxExisting  = 20000    // keeps existing ports below drainPort
	maxDrain     = 2500     // keeps drain ports below measurePort
	clusterCIDR  = "10.244.0.0/16"
	markMasq     = "0x2000/0x2000" // upstream default markMasqBit 13
	kubeMarkMasq = "0x4000/0x4000"
)

// attachment is one pod's host-port claim: 2 TCP mappings to the pod's 80 and 443.
type attachment struct {
	ID    string     // container ID (64 hex, like a real runtime)
	IP    netip.Addr // pod IPv4 address in 10.244.0.0/16
	Ports [2]int     // host ports -> 80, 443
}

var containerPorts = [2]int{80, 443}

// containerID returns a deterministic 64-hex container ID.
func containerID(kind string, i int) string {
	s := sha256.Sum256([]byte(fmt.Sprintf("pgb-%s-%d", kind, i)))
	return hex.EncodeToString(s[:])
}

// podIP returns 10.244.(base + i/250).(2 + i%250).
func podIP(base, i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, 244, byte(base + i/250), byte(2 + i%250)})
}

func existingAttachment(i int) attachment {
	return attachment{ID: containerID("existing", i), IP: podIP(0, i),
		Ports: [2]int{existingPort + 2*i, existingPort + 2*i + 1}}
}

func drainAttachment(plugin string, i int) attachment {
	return attachment{ID: containerID("drain-"+plugin, i), IP: podIP(150, i),
		Ports: [2]int{drainPort + 2*i, drainPort + 2*i + 1}}
}

func measureAttachment(plugin string, round int) attachment {
	return attachment{ID: containerID("measure-"+plugin, round), IP: podIP(200, (round+1)%250),
		Ports: [2]int{measurePort, measurePort + 1}}
}

func nomapAttachment(plugin string, round int) attachment {
	return attachment{ID: containerID("nomap-"+plugin, round), IP: podIP(210, round%250)}
}

// dnChainName is upstream's CNI-DN-<first 21 hex of sha512(network name + container ID)>.
func dnChainName(net, id string) string {
	s := sha512.Sum512([]byte(net + id))
	return "CNI-DN-" + hex.EncodeToString(s[:])[:21]
}

// dnatComment is upstream's jump comment, quoted as iptables-save prints it.
func dnatComment(net, id string) string {
	return fmt.Sprintf(`"dnat name: \"%s\" id: \"%s\""`, net, id)
}

// upstreamAttachmentRules returns the jump rule (for CNI-HOSTPORT-DNAT) and the CNI-DN
// chain's rules exactly as iptables-save prints what portmap v1.10.0 installs with
// snat=true, no hostIP, no conditions.
func upstreamAttachmentRules(a attachment) (jump string, chainRules []string) {
	ch := dnChainName(netName, a.ID)
	jump = fmt.Sprintf("-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment %s -m multiport --dports %d,%d -j %s",
		dnatComment(netName, a.ID), a.Ports[0], a.Ports[1], ch)
	for k, hp := range a.Ports {
		chainRules = append(chainRules,
			fmt.Sprintf("-A %s -s %s -p tcp -m tcp --dport %d -j CNI-HOSTPORT-SETMARK", ch, clusterCIDR, hp),
			fmt.Sprintf("-A %s -s 127.0.0.1/32 -p tcp -m tcp --dport %d -j CNI-HOSTPORT-SETMARK", ch, hp),
			fmt.Sprintf("-A %s -p tcp -m tcp --dport %d -j DNAT --to-destination %s:%d", ch, hp, a.IP, containerPorts[k]))
	}
	return jump, chainRules
}

// kubeHash mimics kube-proxy's chain suffix: base32(sha256(s))[:16].
func kubeHash(s string) string {
	h := sha256.Sum256([]byte(s))
	return base32.StdEncoding.EncodeToString(h[:])[:16]
}

// natPayload renders the full nat table: about m foreign kube-proxy rules and n upstream
// attachments. It returns the payload and the exact number of foreign and CNI rules.
func natPayload(m, n int) (payload string, foreign, cni int) {
	var chains, pre, out, post, rules []string
	add := func(dst *[]string, r string) { *dst = append(*dst, r) }

	// kube-proxy (iptables mode) writes its jumps first in PREROUTING/OUTPUT.
	if m > 0 {
		chains = append(chains, "KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", "KUBE-NODEPORTS")
		add(&pre, `-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES`)
		add(&out, `-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES`)
		add(&rules, "-A KUBE-MARK-MASQ -j MARK --set-xmark "+kubeMarkMasq)
		add(&rules, "-A KUBE-POSTROUTING -m mark ! --mark "+kubeMarkMasq+" -j RETURN")
		add(&rules, "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0")
		add(&rules, `-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully`)
		foreign = 6 // + the POSTROUTING jump and the nodeports rule at the end
		var svcRules []string
		for s := 0; foreign+2+2+3 <= m; s++ {
			eps := 1 + s%3 // 1..3 endpoints
			if foreign+2+2+3*eps > m {
				eps = (m - foreign - 4) / 3
			}
			spn := fmt.Sprintf("ns-%d/svc-%d:http", s/40, s)
			vip := netip.AddrFrom4([4]byte{10, 96, byte(s / 250), byte(1 + s%250)})
			port := 80 + s%5
			svc := "KUBE-SVC-" + kubeHash(spn+"tcp")
			chains = append(chains, svc)
			add(&svcRules, fmt.Sprintf(`-A KUBE-SERVICES -d %s/32 -p tcp -m comment --comment "%s cluster IP" -m tcp --dport %d -j %s`, vip, spn, port, svc))
			add(&rules, fmt.Sprintf(`-A %s ! -s %s -d %s/32 -p tcp -m comment --comment "%s cluster IP" -m tcp --dport %d -j KUBE-MARK-MASQ`, svc, clusterCIDR, vip, spn, port))
			foreign += 2
			for e := 0; e < eps; e++ {
				ep := fmt.Sprintf("%s:8080", netip.AddrFrom4([4]byte{10, 244, byte(100 + (s*3+e)/250%50), byte(2 + (s*3+e)%250)}))
				sep := "KUBE-SEP-" + kubeHash(spn+"tcp"+ep)
				chains = append(chains, sep)
				if e < eps-1 {
					add(&rules, fmt.Sprintf(`-A %s -m comment --comment "%s -> %s" -m statistic --mode random --probability %.11f -j %s`, svc, spn, ep, 1/float64(eps-e), sep))
				} else {
					add(&rules, fmt.Sprintf(`-A %s -m comment --comment "%s -> %s" -j %s`, svc, spn, ep, sep))
				}
				add(&rules, fmt.Sprintf(`-A %s -s %s/32 -m comment --comment "%s" -j KUBE-MARK-MASQ`, sep, strings.Split(ep, ":")[0], spn))
				add(&rules, fmt.Sprintf(`-A %s -p tcp -m comment --comment "%s" -m tcp -j DNAT --to-destination %s`, sep, spn, ep))
				foreign += 3
			}
		}
		rules = append(rules, svcRules...)
		add(&rules, `-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS`)
		foreign += 2
	}

	// Upstream portmap: MASQ jump prepended in POSTROUTING, DNAT jumps appended.
	if n > 0 {
		chains = append(chains, "CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK", "CNI-HOSTPORT-MASQ")
		add(&pre, "-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT")
		add(&out, "-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT")
		add(&post, `-A POSTROUTING -m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ`)
		add(&rules, `-A CNI-HOSTPORT-SETMARK -m comment --comment "CNI portfwd masquerade mark" -j MARK --set-xmark `+markMasq)
		add(&rules, "-A CNI-HOSTPORT-MASQ -m mark --mark "+markMasq+" -j MASQUERADE")
		cni = 5
		var jumps []string
		for i := 0; i < n; i++ {
			a := existingAttachment(i)
			j, cr := upstreamAttachmentRules(a)
			chains = append(chains, dnChainName(netName, a.ID))
			jumps = append(jumps, j)
			rules = append(rules, cr...)
			cni += 1 + len(cr)
		}
		rules = append(rules, jumps...)
	}
	if m > 0 {
		add(&post, `-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING`)
	}

	var b strings.Builder
	b.WriteString("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n")
	for _, c := range chains {
		b.WriteString(":" + c + " - [0:0]\n")
	}
	for _, group := range [][]string{pre, out, post, rules} {
		for _, r := range group {
			b.WriteString(r)
			b.WriteByte('\n')
		}
	}
	b.WriteString("COMMIT\n")
	return b.String(), foreign, cni
}
