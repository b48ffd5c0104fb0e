// Package examples holds the conflist examples; this test loads each one as a runtime would.
package examples

import (
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	types100 "github.com/containernetworking/cni/pkg/types/100"

	"github.com/portguard/portguard/pkg/config"
)

// readmeTable returns the rows of the README table whose header starts with first: the
// first cell (backquotes trimmed) -> the last cell.
func readmeTable(t *testing.T, first string) map[string]string {
	t.Helper()
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	rows := map[string]string{}
	in := false
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "| "+first+" |") {
			in = true
			continue
		}
		if !in || strings.HasPrefix(l, "|---") {
			continue
		}
		if !strings.HasPrefix(l, "|") {
			break
		}
		cells := strings.Split(strings.Trim(l, "|"), "|")
		rows[strings.Trim(strings.TrimSpace(cells[0]), "`")] = strings.Trim(strings.TrimSpace(cells[len(cells)-1]), "`")
	}
	if len(rows) == 0 {
		t.Fatalf("README.md has no table starting with %q", first)
	}
	return rows
}

// load reads a .conflist, or a single-plugin .conf/.json as a list of one, with libcni.
func load(t *testing.T, path string) *libcni.NetworkConfigList {
	t.Helper()
	if filepath.Ext(path) == ".conflist" {
		l, err := libcni.ConfListFromFile(path)
		if err != nil {
			t.Fatalf("libcni: %v", err)
		}
		return l
	}
	c, err := libcni.ConfFromFile(path)
	if err != nil {
		t.Fatalf("libcni: %v", err)
	}
	l, err := libcni.ConfListFromConf(c)
	if err != nil {
		t.Fatalf("libcni: %v", err)
	}
	return l
}

var placeholder = regexp.MustCompile(`__[A-Z][A-Z_]*__`)

func TestExamplesLoadWithLibcni(t *testing.T) {
	versions := readmeTable(t, "file")
	placeholders := placeholderFiles(t)
	var files []string
	for _, ext := range []string{"*.conflist", "*.conf", "*.json"} {
		m, _ := filepath.Glob(ext)
		files = append(files, m...)
	}
	sort.Strings(files)
	if len(files) < 3 {
		t.Fatalf("only %d examples", len(files))
	}
	for _, file := range files {
		t.Run(file, func(t *testing.T) {
			want, ok := versions[file]
			if !ok {
				t.Fatalf("README.md does not say which file %s stands for and its cniVersion", file)
			}
			delete(versions, file)
			list := load(t, file)
			if list.CNIVersion != want {
				t.Errorf("cniVersion %s, README says %s", list.CNIVersion, want)
			}
			raw, _ := os.ReadFile(file)
			for _, p := range placeholder.FindAllString(string(raw), -1) {
				if !strings.Contains(placeholders[p], "`"+file+"`") {
					t.Errorf("placeholder %s is not documented for %s in README.md", p, file)
				}
			}
			var port []*libcni.PluginConfig
			for _, p := range list.Plugins {
				if p.Network.Type == "portguard" || p.Network.Type == "portmap" {
					port = append(port, p)
				}
			}
			if len(port) != 1 {
				t.Fatalf("%d portguard/portmap entries, want 1", len(port))
			}
			checkPortEntry(t, list, port[0])
		})
	}
	for file := range versions {
		t.Errorf("README.md lists %s, which does not exist", file)
	}
	// and the other way: every documented placeholder is in the files named for it
	for p, cell := range placeholders {
		for _, m := range regexp.MustCompile("`([^`]+\\.(?:conflist|conf|json))`").FindAllStringSubmatch(cell, -1) {
			raw, err := os.ReadFile(m[1])
			if err != nil || !strings.Contains(string(raw), `"`+p+`"`) {
				t.Errorf("README.md says %s holds %s: %v", m[1], p, err)
			}
		}
	}
}

// placeholderFiles maps each placeholder of README.md's table to its "file" cell (the
// second column), which names the examples that hold it.
func placeholderFiles(t *testing.T) map[string]string {
	t.Helper()
	b, _ := os.ReadFile("README.md")
	m := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		cells := strings.Split(strings.Trim(l, "|"), "|")
		if len(cells) >= 2 && placeholder.MatchString(cells[0]) {
			m[strings.Trim(strings.TrimSpace(cells[0]), "`")] = cells[1]
		}
	}
	return m
}

// checkPortEntry builds the stdin libcni hands the plugin on ADD (the entry plus the list's
// name and cniVersion, runtimeConfig.portMappings for the declared capability and a prevResult
// in the list's version) and parses it with pkg/config.
func checkPortEntry(t *testing.T, list *libcni.NetworkConfigList, p *libcni.PluginConfig) {
	t.Helper()
	if !p.Network.Capabilities["portMappings"] {
		t.Fatalf("the %s entry lacks the portMappings capability", p.Network.Type)
	}
	_, addr, _ := net.ParseCIDR("10.88.0.5/16")
	addr.IP = net.ParseIP("10.88.0.5").To4()
	idx := 0
	res := &types100.Result{CNIVersion: types100.ImplementedSpecVersion,
		Interfaces: []*types100.Interface{{Name: "eth0", Sandbox: "/var/run/netns/x"}},
		IPs:        []*types100.IPConfig{{Address: *addr, Interface: &idx}}}
	prev, err := res.GetAsVersion(list.CNIVersion)
	if err != nil {
		t.Fatal(err)
	}
	prevJSON, err := json.Marshal(prev)
	if err != nil {
		t.Fatal(err)
	}
	var prevMap map[string]any
	if err := json.Unmarshal(prevJSON, &prevMap); err != nil {
		t.Fatal(err)
	}
	conf, err := libcni.InjectConf(p, map[string]any{
		"name": list.Name, "cniVersion": list.CNIVersion, "prevResult": prevMap,
		"runtimeConfig": map[string]any{"portMappings": []any{map[string]any{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	c, err := config.Parse(conf.Bytes, "eth0")
	if err != nil {
		t.Fatalf("pkg/config refuses the %s entry: %v\n%s", p.Network.Type, err, conf.Bytes)
	}
	if len(c.Mappings) != 1 || c.Network != list.Name || c.CNIVersion != list.CNIVersion || c.PrevResult == nil {
		t.Fatalf("parsed %+v", c)
	}
}
