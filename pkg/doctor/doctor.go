// Package doctor runs the checks an operator does by hand when a host port does not work:
// which network config the runtime uses and whether it chains a port-mapping plugin with the
// portMappings capability, whether the plugin binaries are there, whether iptables works,
// whether rules hide in the other iptables backend, the sysctls host ports depend on, and the
// audit of the nat tables. Every finding says what is wrong, why it breaks host ports, and the
// exact fix. All reads of files, sysctls and commands go through Env, so tests can fake them.
package doctor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/portguard/portguard/pkg/buildinfo"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/plan"
	"github.com/portguard/portguard/pkg/state"
)

// Severity of a finding.
type Severity string

const (
	OK      Severity = "ok"
	Warning Severity = "warning"
	Error   Severity = "error"
)

// Finding is one result of a check.
type Finding struct {
	Check    string   `json:"check"`
	Severity Severity `json:"severity"`
	What     string   `json:"what"`
	Why      string   `json:"why,omitempty"`
	Fix      string   `json:"fix,omitempty"`
	// Binary: what a plugin binary of the chain says it is (check "binary" only).
	Binary *Binary `json:"binary,omitempty"`
}

// Binary kinds.
const (
	KindPortguard       = "portguard"        // a portguard build, under any name
	KindUpstreamPortmap = "upstream-portmap" // containernetworking's portmap
	KindOther           = "other"            // another plugin that printed a CNI about line
	KindUnknown         = "unknown"          // said nothing recognisable
)

// Binary identifies one plugin binary from the line it prints when run without CNI_COMMAND
// (skel's "about" string: "portguard v0.1.0 (commit 0123456789ab, go1.26.8): ...",
// "CNI portmap plugin v1.10.0").
type Binary struct {
	Type    string `json:"type"` // the conflist's "type"
	Path    string `json:"path"`
	Kind    string `json:"kind"`              // KindPortguard, KindUpstreamPortmap, KindOther, KindUnknown
	About   string `json:"about,omitempty"`   // the line it printed
	Version string `json:"version,omitempty"` // portguard only
	Commit  string `json:"commit,omitempty"`  // portguard only, 12 hex digits
}

// Files deploy/install.sh leaves next to a drop-in (portguard installed as "portmap"); their
// presence says portmap is meant to be portguard. deploy/install_test.go checks the script
// writes exactly these names.
const (
	DropInBackup = "portmap.pre-portguard"
	DropInMarker = ".portguard-as-portmap.sha256"
)

// Env is everything doctor reads. DefaultEnv reads the real system.
type Env struct {
	ConfDir  string
	BinDirs  []string
	ReadDir  func(dir string) ([]fs.DirEntry, error)
	ReadFile func(path string) ([]byte, error)
	Stat     func(path string) (fs.FileInfo, error)
	// Sysctl reads a sysctl by its dotted name ("net.ipv4.ip_forward").
	Sysctl func(name string) (string, error)
	// Command runs a program and returns its stdout; exec.ErrNotFound (wrapped) when absent.
	Command func(name string, args ...string) (string, error)
	// RouteIface names the interface the node routes an address through.
	RouteIface func(a netip.Addr) (string, error)
	// About runs a plugin binary without CNI_COMMAND and returns the first line it prints
	// (CNI plugins print their about string and exit); see RunAbout.
	About  func(path string) (string, error)
	Runner iptables.Runner
}

// aboutTimeout bounds one plugin binary's answer; a plugin that waits for input is killed
// (a variable for tests).
var aboutTimeout = 5 * time.Second

// RunAbout runs the binary at path with an empty environment (so no CNI_COMMAND), stdin from
// /dev/null and a 5 s limit, and returns the first non-empty line of its output; every CNI
// plugin built on skel prints its about string there ("CNI portmap plugin v1.10.0") and exits
// non-zero, which is not an error here. The error is for a binary that cannot run or
// prints nothing.
func RunAbout(path string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), aboutTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, path)
	cmd.Env = []string{}
	cmd.WaitDelay = time.Second
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return "", fmt.Errorf("%s did not exit within %s when run without CNI_COMMAND", path, aboutTimeout)
	}
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		return "", err
	}
	for _, l := range strings.Split(string(out), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			return l, nil
		}
	}
	return "", fmt.Errorf("%s printed nothing when run without CNI_COMMAND", path)
}

// Identify reads what a plugin binary's about line says it is.
func Identify(typ, path, about string) *Binary {
	b := &Binary{Type: typ, Path: path, About: about, Kind: KindUnknown}
	switch {
	case about == "":
	case strings.HasPrefix(about, "portguard "):
		if v, c, ok := buildinfo.ParseAbout(about); ok {
			b.Kind, b.Version, b.Commit = KindPortguard, v, c
		} else if f := strings.Fields(about); len(f) >= 3 && strings.HasPrefix(f[2], "(CNI") {
			// builds before the commit was stamped: "portguard VERSION (CNI host ports ...)"
			b.Kind, b.Version, b.Commit = KindPortguard, f[1], "unknown"
		}
	case strings.HasPrefix(about, "CNI portmap plugin"):
		b.Kind = KindUpstreamPortmap
	case strings.HasPrefix(about, "CNI "):
		b.Kind = KindOther
	}
	return b
}

// describe is how findings name a binary: "portguard v0.1.0 (commit 0123456789ab)".
func (b *Binary) describe() string {
	switch b.Kind {
	case KindPortguard:
		return fmt.Sprintf("portguard %s (commit %s)", b.Version, b.Commit)
	case KindUpstreamPortmap:
		return fmt.Sprintf("upstream portmap (%q)", b.About)
	case KindOther:
		return fmt.Sprintf("%q", b.About)
	}
	if b.About == "" {
		return "unidentified"
	}
	return fmt.Sprintf("unidentified (it printed %q)", b.About)
}

// DefaultEnv reads the running system (in the current network namespace).
func DefaultEnv(confDir string, binDirs []string, r iptables.Runner) Env {
	return Env{
		ConfDir: confDir, BinDirs: binDirs, Runner: r,
		ReadDir: os.ReadDir, ReadFile: os.ReadFile, Stat: os.Stat,
		Sysctl: func(name string) (string, error) {
			b, err := os.ReadFile("/proc/sys/" + strings.ReplaceAll(name, ".", "/"))
			return strings.TrimSpace(string(b)), err
		},
		Command: func(name string, args ...string) (string, error) {
			path, err := exec.LookPath(name)
			if err != nil {
				return "", err
			}
			out, err := exec.Command(path, args...).Output()
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				return string(out), fmt.Errorf("%s: %v: %s", name, err, strings.TrimSpace(string(ee.Stderr)))
			}
			return string(out), err
		},
		RouteIface: func(a netip.Addr) (string, error) {
			routes, err := netlink.RouteGet(a.AsSlice())
			if err != nil || len(routes) == 0 {
				return "", fmt.Errorf("no route to %s: %v", a, err)
			}
			link, err := netlink.LinkByIndex(routes[0].LinkIndex)
			if err != nil {
				return "", err
			}
			return link.Attrs().Name, nil
		},
		About: RunAbout,
	}
}

// Report is doctor's result.
type Report struct {
	Conflist string           `json:"conflist"` // the file the runtime uses ("" when none)
	Findings []Finding        `json:"findings"`
	Audit    plan.AuditReport `json:"audit"`
}

// Healthy reports whether no finding is an error.
func (r Report) Healthy() bool {
	for _, f := range r.Findings {
		if f.Severity == Error {
			return false
		}
	}
	return true
}

// PortPlugins are the plugin types that implement runtimeConfig.portMappings.
var PortPlugins = map[string]bool{"portmap": true, "portguard": true}

// ConfExtensions are the extensions libcni (and so containerd, CRI-O, podman) load.
var ConfExtensions = []string{".conf", ".conflist", ".json"}

type doc struct {
	env      Env
	findings []Finding
}

func (d *doc) add(check string, sev Severity, what, why, fix string) {
	d.findings = append(d.findings, Finding{Check: check, Severity: sev, What: what, Why: why, Fix: fix})
}

// Run runs every check, then the audit of each family whose iptables works.
func Run(env Env) Report {
	d := &doc{env: env}
	var rep Report
	list, file := d.conflist()
	rep.Conflist = file
	mainType := ""
	if list != nil {
		mainType = d.chain(list, file)
	}
	usable := d.iptables()
	d.otherBackend(usable)
	states := map[hostport.Family]*state.State{}
	var audits []plan.FamilyAudit
	judge := liveness.New()
	for _, f := range hostport.Families {
		if !usable[f] {
			continue
		}
		s, err := state.ObserveAll(env.Runner, f)
		if err != nil {
			audits = append(audits, plan.UnavailableAudit(f, err))
			d.add("audit", Error, fmt.Sprintf("%s: cannot read the nat table: %v", f, err), "nothing about host ports can be checked", "run as root; check `"+saveTool(f)+" -t nat`")
			continue
		}
		states[f] = s
		fa := plan.Audit(s)
		fa.JudgeOwners(judge)
		audits = append(audits, fa)
	}
	d.sysctls(mainType, states)
	rep.Audit = plan.NewAuditReport(audits)
	for _, fa := range audits {
		if !fa.Available {
			continue
		}
		if len(fa.Problems) == 0 {
			d.add("audit", OK, fmt.Sprintf("%s: %d claims on %d host ports, no problem in the nat table", fa.Family, fa.Summary.Claims, fa.Summary.HostPorts), "", "")
		}
		for _, p := range fa.Problems {
			d.add("audit", Error, fmt.Sprintf("%s: %s: %s", fa.Family, p.Kind, p.Message), whyOf(p.Kind), p.Fix)
		}
	}
	rep.Findings = d.findings
	return rep
}

func whyOf(kind string) string {
	switch kind {
	case plan.KindShadowedClaim:
		return "the first matching jump in CNI-HOSTPORT-DNAT wins, so the shadowed pod never receives the port's traffic"
	case plan.KindDuplicateJump:
		return "a repeated jump survives the attachment's DEL of one copy and keeps the port claimed"
	case plan.KindOrphanChain:
		return "a leaked chain forwards nothing but accumulates and confuses anyone reading the table"
	case plan.KindPortMismatch:
		return "traffic for the jump's port enters a chain that does not DNAT it, so the host port silently goes elsewhere"
	case plan.KindMissingEntryJump:
		return "without the entry jump no packet ever reaches CNI-HOSTPORT-DNAT"
	default:
		return "hairpin and localhost connections to host ports need the mark and the masquerade"
	}
}

func saveTool(f hostport.Family) string {
	if f == hostport.V6 {
		return "ip6tables-save"
	}
	return "iptables-save"
}

// conflist finds the file the runtime will load: the lexically first .conf/.conflist/.json
// of the directory (libcni's ConfFiles, sorted as containerd, CRI-O and kubelet do).
func (d *doc) conflist() (*confList, string) {
	const check = "conflist"
	entries, err := d.env.ReadDir(d.env.ConfDir)
	if err != nil {
		d.add(check, Error, fmt.Sprintf("cannot read the CNI config directory %s: %v", d.env.ConfDir, err),
			"the runtime finds no network config, so pods get no network and no host ports",
			"pass the directory your runtime uses (--conf-dir; containerd: plugins.\"io.containerd.grpc.v1.cri\".cni.conf_dir) and install a conflist there")
		return nil, ""
	}
	var files []string
	for _, e := range entries {
		if e.IsDir() {
			continue
		}
		for _, ext := range ConfExtensions {
			if filepath.Ext(e.Name()) == ext {
				files = append(files, e.Name())
			}
		}
	}
	sort.Strings(files)
	if len(files) == 0 {
		d.add(check, Error, fmt.Sprintf("no .conflist, .conf or .json file in %s", d.env.ConfDir),
			"the runtime has no network config; pods do not start",
			"install your network's conflist in "+d.env.ConfDir)
		return nil, ""
	}
	path := filepath.Join(d.env.ConfDir, files[0])
	ignored := ""
	if len(files) > 1 {
		ignored = fmt.Sprintf("; ignored: %s", strings.Join(files[1:], ", "))
	}
	data, err := d.env.ReadFile(path)
	if err != nil {
		d.add(check, Error, fmt.Sprintf("cannot read %s: %v", path, err), "the runtime cannot load its network config", "fix the file's permissions or remove it")
		return nil, path
	}
	list, err := parseConf(data, filepath.Ext(path) == ".conflist")
	if err != nil {
		d.add(check, Error, fmt.Sprintf("%s (the file the runtime uses, being lexically first) does not parse: %v", path, err),
			"the runtime fails to set up any pod network", fmt.Sprintf("fix %s, or move it away so the next file is used%s", path, ignored))
		return nil, path
	}
	var types []string
	for _, p := range list.Plugins {
		types = append(types, p.Type)
	}
	d.add(check, OK, fmt.Sprintf("the runtime uses %s (network %q: %s)%s", path, list.Name, strings.Join(types, " -> "), ignored), "", "")
	return list, path
}

// confList is the part of a network configuration list doctor needs.
type confList struct {
	Name    string
	Plugins []*pluginConf
}

type pluginConf struct {
	Type         string          `json:"type"`
	Capabilities map[string]bool `json:"capabilities"`
}

// parseConf reads a .conflist, or a single-plugin .conf/.json which libcni turns into a
// list of one, with libcni's checks: a string name, and a type for every plugin.
func parseConf(data []byte, isList bool) (*confList, error) {
	var raw struct {
		Name    *string           `json:"name"`
		Type    string            `json:"type"`
		Plugins []json.RawMessage `json:"plugins"`
		Caps    map[string]bool   `json:"capabilities"`
	}
	if err := json.Unmarshal(data, &raw); err != nil {
		return nil, err
	}
	if raw.Name == nil {
		return nil, errors.New("no name")
	}
	l := &confList{Name: *raw.Name}
	if !isList {
		if raw.Type == "" {
			return nil, errors.New("no type")
		}
		l.Plugins = []*pluginConf{{Type: raw.Type, Capabilities: raw.Caps}}
		return l, nil
	}
	if len(raw.Plugins) == 0 {
		return nil, errors.New("no plugins in the list")
	}
	for i, b := range raw.Plugins {
		p := &pluginConf{}
		if err := json.Unmarshal(b, p); err != nil {
			return nil, fmt.Errorf("plugin %d: %v", i, err)
		}
		if p.Type == "" {
			return nil, fmt.Errorf("plugin %d: no type", i)
		}
		l.Plugins = append(l.Plugins, p)
	}
	return l, nil
}

// chain checks the port-mapping plugin and the plugin binaries; it returns the main
// plugin's type.
func (d *doc) chain(list *confList, file string) string {
	mainType := list.Plugins[0].Type
	var port []*pluginConf
	for _, p := range list.Plugins {
		if PortPlugins[p.Type] {
			port = append(port, p)
		}
	}
	switch {
	case len(port) == 0:
		d.add("port-mapping", Error, fmt.Sprintf("%s chains no portmap or portguard plugin", file),
			"the runtime passes hostPort mappings only to a plugin in the chain that declares them; with none, hostPort is silently ignored",
			fmt.Sprintf(`add {"type": "portguard", "capabilities": {"portMappings": true}} to "plugins" in %s after %q`, file, mainType))
	case len(port) > 1:
		d.add("port-mapping", Error, fmt.Sprintf("%s chains %d port-mapping plugins", file, len(port)),
			"each one installs its own rules for the same ports; DEL of one leaves the other's claim behind",
			fmt.Sprintf("keep one portmap/portguard entry in %s", file))
	}
	for _, p := range port {
		if !p.Capabilities["portMappings"] {
			d.add("port-mapping", Error, fmt.Sprintf("the %s plugin in %s lacks \"capabilities\": {\"portMappings\": true}", p.Type, file),
				"the runtime only passes runtimeConfig.portMappings to plugins that declare the capability, so the plugin never sees a host port",
				fmt.Sprintf(`add "capabilities": {"portMappings": true} to the %s entry of %s`, p.Type, file))
		} else {
			d.add("port-mapping", OK, fmt.Sprintf("%s chains %s with the portMappings capability", file, p.Type), "", "")
		}
	}
	for _, p := range list.Plugins {
		d.binary(p.Type, PortPlugins[p.Type])
	}
	return mainType
}

// binary finds the plugin's executable in the bin dirs (the first one wins, as CNI_PATH is
// searched), asks it what it is, and checks that a port-mapping plugin is what its name
// promises: "portguard" must be portguard; "portmap" may be upstream's (a warning: no stale
// claims are taken over) unless portguard had been installed in its place (drop-in) and
// something put upstream back, which is an error with the fix.
func (d *doc) binary(typ string, portPlugin bool) {
	why := "every ADD of the network fails, so no pod on it starts"
	if portPlugin {
		why = "the runtime cannot run the port-mapping plugin: every ADD fails (or, if the plugin is dropped from the chain, host ports are ignored)"
	}
	var tried []string
	for _, dir := range d.env.BinDirs {
		path := filepath.Join(dir, typ)
		tried = append(tried, path)
		fi, err := d.env.Stat(path)
		if err != nil {
			continue
		}
		if fi.IsDir() || fi.Mode().Perm()&0o111 == 0 {
			d.add("binary", Error, fmt.Sprintf("%s exists but is not an executable file (mode %s)", path, fi.Mode()), why, "chmod 0755 "+path)
			return
		}
		d.identify(typ, dir, path, portPlugin)
		return
	}
	fix := fmt.Sprintf("install the %s binary into %s", typ, strings.Join(d.env.BinDirs, " or "))
	if typ == "portguard" {
		fix = "make install (or copy bin/portguard) into " + strings.Join(d.env.BinDirs, " or ")
	}
	d.add("binary", Error, fmt.Sprintf("plugin %s not found (looked for %s)", typ, strings.Join(tried, ", ")), why, fix)
}

func (d *doc) identify(typ, dir, path string, portPlugin bool) {
	about := ""
	var aboutErr error
	if d.env.About != nil {
		about, aboutErr = d.env.About(path)
	}
	b := Identify(typ, path, about)
	f := Finding{Check: "binary", Severity: OK, Binary: b,
		What: fmt.Sprintf("plugin %s: %s is %s", typ, path, b.describe())}
	if aboutErr != nil {
		f.What = fmt.Sprintf("plugin %s: %s is executable; cannot tell what it is: %v", typ, path, aboutErr)
	}
	dropIn := d.exists(filepath.Join(dir, DropInMarker)) || d.exists(filepath.Join(dir, DropInBackup))
	reinstall := fmt.Sprintf("put portguard back: restart the portguard DaemonSet pod on this node, or `make install AS_PORTMAP=1 CNI_BIN=%s`; then stop the installer that overwrote it (Calico install-cni: SKIP_CNI_BINARIES=portmap; a containernetworking-plugins package upgrade; see docs/install.md)", dir)
	switch {
	case typ == "portguard" && b.Kind != KindPortguard:
		f.Severity = Error
		f.Why = "the conflist asks for portguard, but this binary is something else, so ADD/DEL do not behave as portguard's configuration expects"
		f.Fix = fmt.Sprintf("reinstall portguard: `make install CNI_BIN=%s`, or restart the portguard DaemonSet pod on this node", dir)
	case typ == "portmap" && b.Kind == KindUpstreamPortmap && dropIn:
		f.Severity = Error
		f.What += fmt.Sprintf(", but %s shows portguard was installed as portmap here (drop-in): something overwrote it", filepath.Join(dir, DropInBackup))
		f.Why = "pods now get upstream portmap's behaviour: a stale claim on a host port shadows every new pod asking for it"
		f.Fix = reinstall
	case typ == "portmap" && b.Kind == KindUpstreamPortmap:
		f.Severity = Warning
		f.Why = "upstream portmap works, but never removes a stale claim that shadows a new pod's host port"
		f.Fix = fmt.Sprintf("to use portguard: `make install AS_PORTMAP=1 CNI_BIN=%s` (drop-in), or install portguard and chain \"type\": \"portguard\"", dir)
	case typ == "portmap" && b.Kind == KindPortguard:
		f.What += " (installed as portmap: drop-in)"
	case portPlugin && b.Kind != KindPortguard:
		f.Severity = Warning
		f.Why = "doctor cannot tell whether this port-mapping plugin is portguard or upstream portmap, so what it does with stale claims is unknown"
		f.Fix = fmt.Sprintf("check what %s is (run it without arguments: CNI plugins print their name and version), or reinstall with `make install AS_PORTMAP=1 CNI_BIN=%s`", path, dir)
	}
	d.findings = append(d.findings, f)
}

func (d *doc) exists(path string) bool {
	_, err := d.env.Stat(path)
	return err == nil
}

// iptables probes each family.
func (d *doc) iptables() map[hostport.Family]bool {
	usable := map[hostport.Family]bool{}
	for _, f := range hostport.Families {
		tool := "iptables"
		if f == hostport.V6 {
			tool = "ip6tables"
		}
		if err := d.env.Runner.Probe(f); err != nil {
			sev := Error
			why := "the port-mapping plugin cannot install any rule, so every ADD with a host port fails"
			if f == hostport.V6 {
				sev = Warning
				why = "IPv6 host ports cannot work (IPv4 is unaffected)"
			}
			d.add("iptables", sev, fmt.Sprintf("%s: %s -t nat does not work: %v", f, tool, err), why,
				fmt.Sprintf("install the iptables package (it provides %s) and make sure the kernel has the nat table (modprobe %s)", tool, natModule(f)))
			continue
		}
		usable[f] = true
		d.add("iptables", OK, fmt.Sprintf("%s: %s works", f, tool), "", "")
	}
	return usable
}

func natModule(f hostport.Family) string {
	if f == hostport.V6 {
		return "ip6table_nat or nft_chain_nat"
	}
	return "iptable_nat or nft_chain_nat"
}

// otherBackend looks for CNI chains in the iptables backend that `iptables` does not use.
func (d *doc) otherBackend(usable map[hostport.Family]bool) {
	ver, err := d.env.Command("iptables", "-V")
	if err != nil {
		return
	}
	current, other := "nft", "legacy"
	if strings.Contains(ver, "legacy") {
		current, other = "legacy", "nft"
	}
	for _, f := range hostport.Families {
		base := "iptables"
		if f == hostport.V6 {
			base = "ip6tables"
		}
		if other == "legacy" {
			// /proc/net/ip_tables_names lists the legacy tables of this namespace; reading it
			// does not load modules, unlike running iptables-legacy-save.
			names := "/proc/net/ip_tables_names"
			if f == hostport.V6 {
				names = "/proc/net/ip6_tables_names"
			}
			b, err := d.env.ReadFile(names)
			if err != nil || !containsLine(string(b), "nat") {
				continue
			}
		}
		tool := base + "-" + other + "-save"
		out, err := d.env.Command(tool, "-t", "nat")
		if err != nil {
			continue
		}
		t := iptables.NewTable()
		if err := t.Parse(out); err != nil {
			d.add("backend", Warning, fmt.Sprintf("%s: cannot parse `%s -t nat`: %v", f, tool, err), "", "")
			continue
		}
		var found []string
		for _, name := range t.Order {
			if strings.HasPrefix(name, "CNI-HOSTPORT-") || strings.HasPrefix(name, hostport.ChainPrefix) {
				found = append(found, name)
			}
		}
		if len(found) == 0 {
			continue
		}
		s := state.New(f, t)
		claims := 0
		for _, j := range s.Jumps {
			if j.IsClaim() {
				claims++
			}
		}
		other6 := base + "-" + other
		var fix []string
		for _, ch := range state.EntryChains {
			if s.HasRule(state.EntryJump(ch)) {
				fix = append(fix, fmt.Sprintf("%s -t nat -D %s", other6, state.EntryJump(ch).String()[3:]))
			}
		}
		if s.HasRule(state.MasqJump()) {
			fix = append(fix, fmt.Sprintf("%s -t nat -D %s", other6, state.MasqJump().String()[3:]))
		}
		for _, ch := range found {
			fix = append(fix, fmt.Sprintf("%s -t nat -F %s", other6, ch))
		}
		for _, ch := range found {
			fix = append(fix, fmt.Sprintf("%s -t nat -X %s", other6, ch))
		}
		d.add("backend", Error,
			fmt.Sprintf("%s: the %s backend holds %d CNI chains (%d claims in CNI-HOSTPORT-DNAT) that `%s` (%s) does not show", f, other, len(found), claims, base, current),
			"the kernel runs both backends' rules: these hidden rules can DNAT host ports to pods that no longer exist, and no portguard or portmap call will ever remove them",
			"after checking they are stale (`"+tool+" -t nat`): "+strings.Join(fix, "; "))
	}
}

func containsLine(s, want string) bool {
	for _, l := range strings.Split(s, "\n") {
		if strings.TrimSpace(l) == want {
			return true
		}
	}
	return false
}

func (d *doc) sysctl(name string) (string, bool) {
	v, err := d.env.Sysctl(name)
	return v, err == nil
}

// sysctls checks forwarding, bridge netfilter and route_localnet.
func (d *doc) sysctls(mainType string, states map[hostport.Family]*state.State) {
	if v, ok := d.sysctl("net.ipv4.ip_forward"); !ok || v != "1" {
		d.add("sysctl", Error, fmt.Sprintf("net.ipv4.ip_forward is %q", v),
			"DNATed packets from other hosts must be forwarded to the pod; without forwarding the kernel drops them",
			"sysctl -w net.ipv4.ip_forward=1 and persist it: echo net.ipv4.ip_forward=1 > /etc/sysctl.d/99-portguard.conf")
	} else {
		d.add("sysctl", OK, "net.ipv4.ip_forward is 1", "", "")
	}
	if s := states[hostport.V6]; s != nil && len(s.Jumps) > 0 {
		if v, ok := d.sysctl("net.ipv6.conf.all.forwarding"); !ok || v != "1" {
			d.add("sysctl", Error, fmt.Sprintf("net.ipv6.conf.all.forwarding is %q while IPv6 host ports exist", v),
				"IPv6 packets DNATed to a pod are dropped instead of forwarded",
				"sysctl -w net.ipv6.conf.all.forwarding=1 and persist it in /etc/sysctl.d/")
		}
	}
	if mainType == "bridge" || mainType == "flannel" {
		const name = "net.bridge.bridge-nf-call-iptables"
		v, ok := d.sysctl(name)
		switch {
		case !ok:
			d.add("sysctl", Error, fmt.Sprintf("%s does not exist (br_netfilter is not loaded) and the main plugin is %s", name, mainType),
				"traffic between pods on the same bridge skips iptables: a pod reaching a host port served by a pod on the same bridge gets replies that bypass the NAT, so the connection hangs",
				"modprobe br_netfilter && sysctl -w "+name+"=1; persist with echo br_netfilter > /etc/modules-load.d/br_netfilter.conf and "+name+"=1 in /etc/sysctl.d/")
		case v != "1":
			d.add("sysctl", Error, fmt.Sprintf("%s is %q and the main plugin is %s", name, v, mainType),
				"traffic between pods on the same bridge skips iptables: hairpin connections to host ports get replies that bypass the NAT",
				"sysctl -w "+name+"=1 and persist it in /etc/sysctl.d/")
		default:
			d.add("sysctl", OK, name+" is 1", "", "")
		}
	}
	d.routeLocalnet(states[hostport.V4])
}

// routeLocalnet: a claim whose chain marks 127.0.0.1 sources promises localhost access,
// which needs route_localnet on the interface that routes to the pod.
func (d *doc) routeLocalnet(s *state.State) {
	if s == nil {
		return
	}
	checked := map[string]bool{}
	for _, a := range s.AttachmentsSorted() {
		if len(a.Jumps) == 0 {
			continue
		}
		for _, m := range a.Mappings {
			local := false
			for _, r := range m.Rules {
				if src := r.Value("-s", "--source"); src == "127.0.0.1/32" || src == "127.0.0.1" {
					local = true
				}
			}
			if !local {
				continue
			}
			ifname, err := d.env.RouteIface(m.Dest.Addr())
			if err != nil || checked[ifname] {
				continue
			}
			checked[ifname] = true
			name := "net.ipv4.conf." + ifname + ".route_localnet"
			if v, ok := d.sysctl(name); ok && v != "1" {
				d.add("sysctl", Warning, fmt.Sprintf("%s is %q while %s (-> %s) accepts localhost connections", name, v, m.Claim, m.Dest),
					"the kernel drops packets from 127.0.0.1 that are routed out of "+ifname+", so curl 127.0.0.1:"+fmt.Sprint(m.Claim.HostPort)+" on the node times out ([::1] can never work)",
					"sysctl -w "+name+"=1 (the plugin sets it on ADD when snat is on; mind kubernetes#90259: it exposes 127.0.0.1 services to the pod network)")
			} else if ok {
				d.add("sysctl", OK, name+" is 1 (localhost host ports work)", "", "")
			}
		}
	}
}
