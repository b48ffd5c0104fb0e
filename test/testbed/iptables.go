package testbed

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/containernetworking/plugins/pkg/utils"
)

// shimmed are the commands the PATH shim wraps.
var shimmed = []string{
	"iptables", "iptables-save", "iptables-restore",
	"ip6tables", "ip6tables-save", "ip6tables-restore",
	"iptables-nft", "iptables-nft-save", "iptables-nft-restore",
	"ip6tables-nft", "ip6tables-nft-save", "ip6tables-nft-restore",
	"iptables-legacy", "iptables-legacy-save", "iptables-legacy-restore",
	"ip6tables-legacy", "ip6tables-legacy-save", "ip6tables-legacy-restore",
}

// setupShim writes a directory of wrappers that append "<name> <args>" to ShimLog and exec
// the real binary; it goes first on the PATH of every cnitool call.
func (b *Bed) setupShim() {
	b.ShimDir = filepath.Join(b.Dir, "shim")
	b.ShimLog = filepath.Join(b.Dir, "shim.log")
	if err := os.MkdirAll(b.ShimDir, 0o755); err != nil {
		b.T.Fatal(err)
	}
	if err := os.WriteFile(b.ShimLog, nil, 0o644); err != nil {
		b.T.Fatal(err)
	}
	for _, name := range shimmed {
		real, err := exec.LookPath(name)
		if err != nil {
			continue
		}
		if real, err = filepath.Abs(real); err != nil {
			continue
		}
		b.realBins[name] = real
		script := fmt.Sprintf("#!/bin/sh\nprintf '%%s\\n' \"%s $*\" >>'%s'\nexec '%s' \"$@\"\n", name, b.ShimLog, real)
		if err := os.WriteFile(filepath.Join(b.ShimDir, name), []byte(script), 0o755); err != nil {
			b.T.Fatal(err)
		}
	}
	b.Env = append(b.Env, "PATH="+b.ShimDir+string(os.PathListSeparator)+os.Getenv("PATH"))
}

// ShimCalls returns the iptables-family processes started by plugins since the last
// ResetShim, one "<command> <args>" line each (nil without a shim).
func (b *Bed) ShimCalls() []string {
	if b.ShimLog == "" {
		return nil
	}
	data, err := os.ReadFile(b.ShimLog)
	if err != nil {
		b.T.Fatal(err)
	}
	s := strings.TrimSpace(string(data))
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}

// ResetShim empties the shim log.
func (b *Bed) ResetShim() {
	if b.ShimLog != "" {
		if err := os.WriteFile(b.ShimLog, nil, 0o644); err != nil {
			b.T.Fatal(err)
		}
	}
}

func saveCmd(f Family) string {
	if f == V6 {
		return "ip6tables-save"
	}
	return "iptables-save"
}

func iptCmd(f Family) string {
	if f == V6 {
		return "ip6tables"
	}
	return "iptables"
}

// SaveNAT returns `iptables-save -t nat` (or ip6tables-save) of the node.
func (b *Bed) SaveNAT(f Family) (string, error) {
	return b.SaveNATIn(b.Node, f)
}

// SaveNATIn returns `iptables-save -t nat` (or ip6tables-save) of any bed namespace.
func (b *Bed) SaveNATIn(ns string, f Family) (string, error) {
	return b.Exec(ns, saveCmd(f), "-t", "nat")
}

// MustSaveNAT is SaveNAT failing the test on error.
func (b *Bed) MustSaveNAT(f Family) string {
	b.T.Helper()
	s, err := b.SaveNAT(f)
	if err != nil {
		b.T.Fatal(err)
	}
	return s
}

// IPTables runs iptables/ip6tables with args in the node (not through the shim).
func (b *Bed) IPTables(f Family, args ...string) (string, error) {
	return b.Exec(b.Node, append([]string{iptCmd(f), "-w"}, args...)...)
}

// MustIPTables is IPTables failing the test on error.
func (b *Bed) MustIPTables(f Family, args ...string) string {
	b.T.Helper()
	out, err := b.IPTables(f, args...)
	if err != nil {
		b.T.Fatal(err)
	}
	return out
}

// RestoreNAT feeds a payload to `iptables-restore --noflush` in the node. The payload is the
// body of the nat table (without "*nat" and "COMMIT", which are added).
func (b *Bed) RestoreNAT(f Family, body string) error {
	cmd := "iptables-restore"
	if f == V6 {
		cmd = "ip6tables-restore"
	}
	payload := "*nat\n" + strings.TrimSpace(body) + "\nCOMMIT\n"
	_, _, err := runOut(nil, []byte(payload), "ip", "netns", "exec", b.Node, cmd, "--noflush", "-w")
	return err
}

// MustRestoreNAT is RestoreNAT failing the test on error.
func (b *Bed) MustRestoreNAT(f Family, body string) {
	b.T.Helper()
	if err := b.RestoreNAT(f, body); err != nil {
		b.T.Fatal(err)
	}
}

// NATState is a parsed nat table: chain names in declaration order, rules per chain in order
// (each rule is the iptables-save "-A CHAIN ..." line).
type NATState struct {
	Chains []string
	Rules  map[string][]string
}

// ParseNAT parses iptables-save output of the nat table.
func ParseNAT(save string) *NATState {
	st := &NATState{Rules: map[string][]string{}}
	inNat := false
	for _, line := range strings.Split(save, "\n") {
		line = strings.TrimRight(line, "\r")
		switch {
		case strings.HasPrefix(line, "*"):
			inNat = line == "*nat"
		case !inNat || line == "" || strings.HasPrefix(line, "#") || line == "COMMIT":
		case strings.HasPrefix(line, ":"):
			name := strings.Fields(line[1:])[0]
			st.Chains = append(st.Chains, name)
		case strings.HasPrefix(line, "-A "):
			f := strings.Fields(line)
			if len(f) >= 2 {
				st.Rules[f[1]] = append(st.Rules[f[1]], line)
			}
		}
	}
	return st
}

// HasChain reports whether a chain is declared.
func (s *NATState) HasChain(name string) bool {
	for _, c := range s.Chains {
		if c == name {
			return true
		}
	}
	return false
}

// DNChains returns the CNI-DN-* chains, sorted.
func (s *NATState) DNChains() []string {
	var out []string
	for _, c := range s.Chains {
		if strings.HasPrefix(c, "CNI-DN-") {
			out = append(out, c)
		}
	}
	sort.Strings(out)
	return out
}

// JumpsTo returns the rules of chain that jump (-j/-g) to target.
func (s *NATState) JumpsTo(chain, target string) []string {
	var out []string
	for _, r := range s.Rules[chain] {
		if ruleTarget(r) == target {
			out = append(out, r)
		}
	}
	return out
}

var targetRe = regexp.MustCompile(`\s-[jg]\s+(\S+)`)

func ruleTarget(rule string) string {
	m := targetRe.FindAllStringSubmatch(rule, -1)
	if len(m) == 0 {
		return ""
	}
	return m[len(m)-1][1]
}

// NAT returns the parsed nat table of the node for a family.
func (b *Bed) NAT(f Family) *NATState {
	b.T.Helper()
	return ParseNAT(b.MustSaveNAT(f))
}

// DNChains lists the node's CNI-DN-* chains for a family.
func (b *Bed) DNChains(f Family) []string {
	b.T.Helper()
	return b.NAT(f).DNChains()
}

// HostportJumps returns the rules of CNI-HOSTPORT-DNAT (in order).
func (b *Bed) HostportJumps(f Family) []string {
	b.T.Helper()
	return b.NAT(f).Rules["CNI-HOSTPORT-DNAT"]
}

// ForeignNAT reduces iptables-save output of the nat table to what portguard/portmap must
// never change: every chain not named CNI-* with its policy, and every rule that is neither in
// a CNI-* chain nor jumps to one, in order. Counters and comment lines are dropped, so two
// dumps taken before and after a plugin call must be byte-identical.
func ForeignNAT(save string) string { return Foreign(save, "nat") }

// Foreign is ForeignNAT for any table of an iptables-save dump.
func Foreign(save, table string) string {
	var out []string
	inNat := false
	for _, line := range strings.Split(save, "\n") {
		line = strings.TrimRight(line, "\r")
		switch {
		case strings.HasPrefix(line, "*"):
			inNat = line == "*"+table
		case !inNat || line == "" || strings.HasPrefix(line, "#") || line == "COMMIT":
		case strings.HasPrefix(line, ":"):
			f := strings.Fields(line[1:])
			if len(f) >= 2 && !strings.HasPrefix(f[0], "CNI-") {
				out = append(out, ":"+f[0]+" "+f[1])
			}
		case strings.HasPrefix(line, "-A "):
			f := strings.Fields(line)
			if len(f) < 2 || strings.HasPrefix(f[1], "CNI-") || strings.HasPrefix(ruleTarget(line), "CNI-") {
				continue
			}
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}

// ChainName is the per-attachment chain name upstream portmap (and portguard) use:
// "CNI-DN-" + the first 21 hex characters of sha512(network name + container ID).
func ChainName(network, containerID string) string {
	return utils.MustFormatChainNameWithPrefix(network, containerID, "DN-")
}

// Normalize drops comment lines and chain counters from an iptables-save dump, so two dumps of
// an unchanged ruleset compare equal.
func Normalize(save string) string {
	var out []string
	for _, line := range strings.Split(save, "\n") {
		line = strings.TrimRight(line, "\r")
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if strings.HasPrefix(line, ":") {
			if f := strings.Fields(line); len(f) >= 2 {
				line = f[0] + " " + f[1]
			}
		}
		out = append(out, line)
	}
	return strings.Join(out, "\n")
}

// SaveAll returns `iptables-save` (all tables) of the node for a family.
func (b *Bed) SaveAll(f Family) string {
	b.T.Helper()
	return b.MustExec(b.Node, saveCmd(f))
}
