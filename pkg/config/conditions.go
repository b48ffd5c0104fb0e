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

// addrArg is one address option of the conditions: 's' or 'd', and the indexes of the
// option and of its value (len(args) when it has none).
type addrArg struct {
	opt     byte
	at, val int
}

// addrArgs reads the conditions as iptables does as far as addresses go: it lists the
// address options in order, skipping the free text of --comment (which may read "-d"),
// and hands every other argument's index to check (nil: none), stopping at its error.
func addrArgs(args []string, check func(i int) error) ([]addrArg, error) {
	var out []addrArg
	for i := 0; i < len(args); i++ {
		if args[i] == "--comment" {
			i++
			continue
		}
		if opt := addrOption(args[i]); opt != 0 {
			out = append(out, addrArg{opt: opt, at: i, val: i + 1})
			i++
			continue
		}
		if check != nil {
			if err := check(i); err != nil {
				return nil, err
			}
		}
	}
	return out, nil
}

// validAddresses checks the address and protocol options of one family's conditions: no
// protocol (the mappings set it); each address option given at most once, as its own
// argument, with a value of literal addresses or prefixes (no host name: iptables
// resolves one anew on every call, into as many rules as it has addresses, so DEL and
// CHECK could not know the rules ADD made), no empty list item, and no negated list
// (iptables refuses one).
func validAddresses(field string, f hostport.Family, args []string) error {
	item := func(i int) string { return fmt.Sprintf("%s[%d]", field, i) }
	addrs, err := addrArgs(args, func(i int) error {
		switch a := args[i]; {
		case protocolOption(a):
			return invalid(item(i), "%q: the protocol is each mapping's; a condition cannot set it (iptables allows one -p)", truncate(a))
		case gluedAddrOption(a):
			return invalid(item(i), "%q: give the address option and its value as two arguments", truncate(a))
		}
		return nil
	})
	if err != nil {
		return err
	}
	seen := map[byte]bool{}
	for _, x := range addrs {
		if seen[x.opt] {
			return invalid(item(x.at), "%q: a second -%c option (iptables allows one)", truncate(args[x.at]), x.opt)
		}
		seen[x.opt] = true
		if x.val >= len(args) {
			return invalid(item(x.at), "%q needs an address", truncate(args[x.at]))
		}
		val := args[x.val]
		items := strings.Split(val, ",")
		if len(items) > 1 && x.at > 0 && args[x.at-1] == "!" {
			return invalid(item(x.val), "%q: iptables does not allow ! with an address list", truncate(val))
		}
		for _, it := range items {
			if !literalAddress(f, it) {
				return invalid(item(x.val), "%q is not a list of %s addresses or prefixes (host names are not accepted: iptables would resolve them anew on every call)", truncate(val), f)
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
	s, d := -1, -1
	addrs, _ := addrArgs(args, nil)
	for _, x := range addrs {
		switch {
		case x.val >= len(args):
		case x.opt == 's':
			s = x.val
		default:
			d = x.val
		}
	}
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
