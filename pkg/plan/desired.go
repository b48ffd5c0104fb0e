// Package plan holds the verbs as pure functions: from the observed state and what the
// configuration wants, each produces one transaction per family and a report. No I/O.
package plan

import (
	"net/netip"
	"sort"
	"strconv"
	"strings"

	"github.com/portguard/portguard/pkg/config"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/state"
)

// Desired is what one attachment should have in one family's nat table.
type Desired struct {
	Family   hostport.Family
	Owner    hostport.Owner
	Chain    string
	Jumps    []iptables.Rule // rules of CNI-HOSTPORT-DNAT entering Chain, one per kernel rule
	Rules    []iptables.Rule // rules of Chain
	Claims   []hostport.Claim
	Mappings []config.Mapping
	PodIP    netip.Prefix // invalid when only jumps are known (DEL without prevResult)

	SNAT         bool
	MarkBit      int
	ExternalMark bool // marks go to a chain the operator manages
}

// maxMultiport is the multiport match's limit of ports per rule.
const maxMultiport = 15

// DesiredFor computes the attachment's rules for one family. podIP may be invalid: the jump
// rules (all DEL needs) do not depend on it.
func DesiredFor(c *config.Config, owner hostport.Owner, f hostport.Family, podIP netip.Prefix) Desired {
	d := Desired{Family: f, Owner: owner, Chain: hostport.ChainName(owner), PodIP: podIP,
		SNAT: c.SNAT, MarkBit: c.MarkBit, ExternalMark: c.ExternalSetMarkChain != ""}
	for _, m := range c.Mappings {
		if m.AppliesTo(f) {
			d.Mappings = append(d.Mappings, m)
			d.Claims = append(d.Claims, m.Claim(f))
		}
	}
	d.Jumps = jumpRules(d.Chain, hostport.Comment(owner), d.Mappings, c.Conditions[f])
	if podIP.IsValid() {
		d.Rules = chainRules(c, f, d.Chain, d.Mappings, podIP)
	}
	return d
}

// jumpRules groups ports by protocol (protocols sorted, ports in config order) into
// multiport rules of at most 15 ports, in upstream's argument order. Each is one kernel
// rule: where the conditions hold address lists, a rule per address pair, as iptables
// would expand them, so that every verb sees the rules the kernel holds one by one.
func jumpRules(chain, comment string, maps []config.Mapping, conds []string) []iptables.Rule {
	condRules := config.ExpandConditions(conds)
	byProto := map[string][]string{}
	for _, m := range maps {
		p := strconv.Itoa(m.HostPort)
		if !contains(byProto[m.Proto], p) {
			byProto[m.Proto] = append(byProto[m.Proto], p)
		}
	}
	protos := make([]string, 0, len(byProto))
	for p := range byProto {
		protos = append(protos, p)
	}
	sort.Strings(protos)
	var out []iptables.Rule
	for _, proto := range protos {
		ports := byProto[proto]
		for len(ports) > 0 {
			n := min(len(ports), maxMultiport)
			for _, cs := range condRules {
				args := []string{"-m", "comment", "--comment", comment, "-m", "multiport", "-p", proto,
					"--destination-ports", strings.Join(ports[:n], ",")}
				args = append(args, cs...)
				args = append(args, "-j", chain)
				out = append(out, iptables.Rule{Chain: state.DNATChain, Args: args})
			}
			ports = ports[n:]
		}
	}
	return out
}

func contains(xs []string, x string) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}

// chainRules: per mapping, the hairpin and localhost mark rules (snat on) then the DNAT.
func chainRules(c *config.Config, f hostport.Family, chain string, maps []config.Mapping, podIP netip.Prefix) []iptables.Rule {
	markChain := state.SetMarkChain
	if c.ExternalSetMarkChain != "" {
		markChain = c.ExternalSetMarkChain
	}
	var out []iptables.Rule
	for _, m := range maps {
		base := []string{"-p", m.Proto, "--dport", strconv.Itoa(m.HostPort)}
		if !m.AnyHostIP() {
			base = append(base, "-d", m.HostIP.String())
		}
		with := func(extra ...string) iptables.Rule {
			return iptables.Rule{Chain: chain, Args: append(append([]string(nil), base...), extra...)}
		}
		if c.SNAT {
			src := podIP.Masked().String()
			if c.MasqAll {
				src = "0.0.0.0/0"
				if f == hostport.V6 {
					src = "::/0"
				}
			}
			out = append(out, with("-s", src, "-j", markChain))
			if f == hostport.V4 && !c.MasqAll {
				out = append(out, with("-s", "127.0.0.1", "-j", markChain))
			}
		}
		dest := netip.AddrPortFrom(podIP.Addr(), uint16(m.ContainerPort)).String()
		out = append(out, with("-j", "DNAT", "--to-destination", dest))
	}
	return out
}
