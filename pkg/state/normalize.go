package state

import (
	"sort"
	"strings"

	"github.com/portguard/portguard/pkg/iptables"
)

var longFlags = map[string]string{
	"--source": "-s", "--destination": "-d", "--protocol": "-p", "--jump": "-j",
	"--goto": "-g", "--match": "-m", "--in-interface": "-i", "--out-interface": "-o",
	"--destination-ports": "--dports", "--source-ports": "--sports",
	"--destination-port": "--dport", "--source-port": "--sport",
}

// Normalize renders a rule so that two rules equal in meaning compare equal, whether they
// were written by portguard, by upstream portmap, or printed back by iptables -S: long
// flags become short, the implicit "-m tcp" goes, bare addresses get their /32 or /128,
// an address match of every address (-s 0.0.0.0/0) goes, and options are sorted.
func Normalize(r iptables.Rule) string {
	var opts []string
	var cur []string
	flush := func() {
		if len(cur) > 0 {
			opts = append(opts, strings.Join(cur, " "))
			cur = nil
		}
	}
	args := r.Args
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "!" || strings.HasPrefix(a, "-") && len(a) > 1 && !isNumber(a) {
			flush()
			if a == "!" && i+1 < len(args) {
				i++
				a = "!" + canonFlag(args[i])
			} else {
				a = canonFlag(a)
			}
			cur = []string{a}
			continue
		}
		if len(cur) > 0 && (cur[0] == "-s" || cur[0] == "-d" || cur[0] == "!-s" || cur[0] == "!-d") && !strings.Contains(a, "/") {
			if strings.Contains(a, ":") {
				a += "/128"
			} else {
				a += "/32"
			}
		}
		cur = append(cur, a)
	}
	flush()
	kept := opts[:0]
	for _, o := range opts {
		switch o {
		case "-m tcp", "-m udp", "-m sctp":
			continue
		case "-s 0.0.0.0/0", "-d 0.0.0.0/0", "-s ::/0", "-d ::/0":
			continue // matches every packet: iptables stores no match and prints none
		}
		kept = append(kept, o)
	}
	sort.Strings(kept)
	return r.Chain + "|" + strings.Join(kept, "|")
}

func canonFlag(f string) string {
	if s, ok := longFlags[f]; ok {
		return s
	}
	return f
}

func isNumber(s string) bool {
	s = strings.TrimPrefix(s, "-")
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}
