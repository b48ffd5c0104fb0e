package config

import (
	"fmt"
	"strings"

	"github.com/portguard/portguard/pkg/hostport"
)

// iptables turns one rule with an address list (-s a,b -d c,d) into one kernel rule per
// source and destination pair, sources outer: every verb must know those rules one by one
// (CHECK counts the jumps entering a chain, DEL and re-ADD delete each). The functions
// below are the one place that knows which condition arguments are address lists.

// addrOption tells whether argument a is iptables' source ('s') or destination ('d')
// address option in any spelling iptables accepts: -s, --source, --src, or an
// abbreviation getopt resolves (--sou, --ds); 0 otherwise. Abbreviations that are
// ambiguous are iptables' to refuse.
func addrOption(a string) byte {
	if a == "-s" || a == "-d" {
		return a[1]
	}
	name, ok := strings.CutPrefix(a, "--")
	if !ok || name == "" || strings.Contains(name, "=") {
		return 0
	}
	for _, o := range []struct {
		long string
		opt  byte
	}{{"source", 's'}, {"src", 's'}, {"destination", 'd'}, {"dst", 'd'}} {
		if strings.HasPrefix(o.long, name) {
			return o.opt
		}
	}
	return 0
}

// protocolOption tells whether a is iptables' -p option in any spelling (-p, -ptcp,
// --protocol, --proto=tcp): every jump already has the mapping's protocol.
func protocolOption(a string) bool {
	if strings.HasPrefix(a, "-p") {
		return true
	}
	name, _, _ := strings.Cut(a, "=")
	name, ok := strings.CutPrefix(name, "--")
	return ok && len(name) >= 2 && strings.HasPrefix("protocol", name)
}

// gluedAddrOption reports an address option written with its value in the same argument
// (-d192.0.2.1, --destination=192.0.2.1): getopt would accept it, iptables 1.8 does not.
func gluedAddrOption(a string) bool {
	if len(a) > 2 && (strings.HasPrefix(a, "-s") || strings.HasPrefix(a, "-d")) && a[2] != '-' {
		return true
	}
	if name, val, ok := strings.Cut(a, "="); ok && strings.HasPrefix(name, "--") {
		return addrOption(name) != 0 && val != ""
	}
	return false
}

// addrLists finds the values of the address options in conditions: the index of the
// value of -s (s) and of -d (d), -1 when absent. Arguments of --comment are skipped (a
// comment may read "-d"). It assumes validAddresses accepted args.
func addrLists(args []string) (s, d int) {
	s, d = -1, -1
	for i := 0; i < len(args); i++ {
		switch {
		case args[i] == "--comment":
			i++
		case addrOption(args[i]) == 's' && i+1 < len(args):
			s = i + 1
			i++
		case addrOption(args[i]) == 'd' && i+1 < len(args):
			d = i + 1
			i++
		}
	}
	return s, d
}

// validAddresses checks the address and protocol options of one family's conditions: no
// protocol (the mappings set it), each address option given at most once, with a value of literal addresses or prefixes (no host name: iptables
// resolves one anew on every call, into as many rules as it has addresses, so DEL and
// CHECK could not know the rules ADD made), no empty list item, and no negated list
// (iptables refuses one).
func validAddresses(field string, f hostport.Family, args []string) error {
	seen := map[byte]bool{}
	for i := 0; i < len(args); i++ {
		a := args[i]
		item := fmt.Sprintf("%s[%d]", field, i)
		if a == "--comment" {
			i++
			continue
		}
		if protocolOption(a) {
			return invalid(item, "%q: the protocol is each mapping's; a condition cannot set it (iptables allows one -p)", truncate(a))
		}
		if gluedAddrOption(a) {
			return invalid(item, "%q: give the address option and its value as two arguments", truncate(a))
		}
		opt := addrOption(a)
		if opt == 0 {
			continue
		}
		if seen[opt] {
			return invalid(item, "%q: a second -%c option (iptables allows one)", truncate(a), opt)
		}
		seen[opt] = true
		if i+1 >= len(args) {
			return invalid(item, "%q needs an address", truncate(a))
		}
		i++
		val := args[i]
		item = fmt.Sprintf("%s[%d]", field, i)
		items := strings.Split(val, ",")
		if len(items) > 1 && i >= 2 && args[i-2] == "!" {
			return invalid(item, "%q: iptables does not allow ! with an address list", truncate(val))
		}
		for _, it := range items {
			if !literalAddress(f, it) {
				return invalid(item, "%q is not a list of %s addresses or prefixes (host names are not accepted: iptables would resolve them anew on every call)", truncate(val), f)
			}
		}
	}
	return nil
}

// literalAddress reports whether s spells an address of family f, with an optional
// /prefix or (IPv4) /mask, in digits rather than a name iptables would resolve.
func literalAddress(f hostport.Family, s string) bool {
	if s == "" {
		return false
	}
	addr, _, _ := strings.Cut(s, "/")
	if addr == "" {
		return false
	}
	if f == hostport.V6 {
		return strings.Contains(addr, ":")
	}
	return strings.Trim(s, "0123456789./") == ""
}

// ExpandConditions returns the conditions of one rule as iptables installs them: one
// argument list per kernel rule, each with a single source and destination, in the order
// iptables adds them (sources outer). Conditions without an address list give themselves.
// args must have passed Parse's validation.
func ExpandConditions(args []string) [][]string {
	s, d := addrLists(args)
	srcs, dsts := []string{""}, []string{""}
	if s >= 0 {
		srcs = strings.Split(args[s], ",")
	}
	if d >= 0 {
		dsts = strings.Split(args[d], ",")
	}
	if len(srcs) == 1 && len(dsts) == 1 {
		return [][]string{args}
	}
	var out [][]string
	for _, src := range srcs {
		for _, dst := range dsts {
			one := append([]string(nil), args...)
			if s >= 0 {
				one[s] = src
			}
			if d >= 0 {
				one[d] = dst
			}
			out = append(out, one)
		}
	}
	return out
}
