package main

// Invoking a chained CNI plugin directly: env, network config with prevResult on
// stdin, wall time and the child's rusage.

import (
	"bytes"
	"debug/buildinfo"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// plugin is one binary under test.
type plugin struct {
	Name string `json:"name"` // "upstream" or "portguard"
	Type string `json:"type"` // the config's "type"
	Path string `json:"path"`
	// Backend is the config's "backend" ("": the key is left out).
	Backend string `json:"backend,omitempty"`
	// NS is the plugin's own node network namespace (-backend nftables); "" is the
	// scenario runner's, shared by every plugin (-backend iptables).
	NS string `json:"ns,omitempty"`
	// Empty: the plugin's node has no existing attachments whatever the scenario's N (the
	// same-run baseline of the flatness table).
	Empty bool `json:"empty,omitempty"`
}

// portguard reports whether p is a build of portguard (whatever its backend).
func (p plugin) portguard() bool { return strings.HasPrefix(p.Name, "portguard") }

// callEnv is what every invocation in one scenario shares.
type callEnv struct {
	PodNetns string // CNI_NETNS and the prevResult sandbox
	LockFile string // PORTGUARD_LOCK_FILE
	ShimDir  string
	Self     string // this binary: launcher and shim
	WorkDir  string // launcher result files
}

// callResult is the outcome of one plugin execution.
type callResult struct {
	Ms     float64
	RSSKiB int64 // ru_maxrss of the plugin (and the children it waited for), via the launcher
	RC     int
	Out    string // stdout+stderr, trimmed, on failure
	Procs  []shimRecord
}

func (r callResult) failed() bool { return r.RC != 0 }

// netConf renders the network config a runtime hands a chained plugin.
func netConf(p plugin, a attachment, podNetns string, mappings bool) []byte {
	prev := map[string]any{
		"cniVersion": "1.0.0",
		"interfaces": []map[string]any{
			{"name": "cni0", "mac": "0a:58:0a:f4:00:01"},
			{"name": "veth" + a.ID[:8], "mac": "0a:58:0a:f4:00:02"},
			{"name": "eth0", "mac": "0a:58:0a:f4:00:03", "sandbox": podNetns},
		},
		"ips":    []map[string]any{{"address": fmt.Sprintf("%s/%d", a.IP, podCIDRBits), "gateway": "10.244.0.1", "interface": 2}},
		"routes": []map[string]any{{"dst": "0.0.0.0/0", "gw": "10.244.0.1"}},
		"dns":    map[string]any{},
	}
	conf := map[string]any{
		"cniVersion":   "1.0.0",
		"name":         netName,
		"type":         p.Type,
		"snat":         true,
		"capabilities": map[string]bool{"portMappings": true},
		"prevResult":   prev,
	}
	if p.Backend != "" {
		conf["backend"] = p.Backend
	}
	// A pod without host ports gets an empty list, as CRI runtimes send it once the
	// conflist declares the capability.
	conf["runtimeConfig"] = map[string]any{"portMappings": []map[string]any{}}
	if mappings {
		conf["runtimeConfig"] = map[string]any{"portMappings": []map[string]any{
			{"hostPort": a.Ports[0], "containerPort": containerPorts[0], "protocol": "tcp"},
			{"hostPort": a.Ports[1], "containerPort": containerPorts[1], "protocol": "tcp"},
		}}
	}
	b, _ := json.Marshal(conf)
	return b
}

// invoke runs one CNI verb through the launcher (see launch.go). With shimLog set, the
// shim directory is put first on PATH and the iptables processes are read back from
// the log.
func invoke(p plugin, verb string, a attachment, env callEnv, mappings bool, shimLog string) callResult {
	return invokeConf(p, verb, a.ID, netConf(p, a, env.PodNetns, mappings), env, shimLog)
}

// invokeConf is invoke with the network config given (id: CNI_CONTAINERID, 64 hex).
func invokeConf(p plugin, verb, id string, conf []byte, env callEnv, shimLog string) callResult {
	a := attachment{ID: id}
	resFile := filepath.Join(env.WorkDir, fmt.Sprintf("launch-%d.json", launchSeq.Add(1)))
	defer os.Remove(resFile)
	cmd := exec.Command(env.Self, p.Path)
	cmd.Stdin = bytes.NewReader(conf)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	path := os.Getenv("PATH")
	if shimLog != "" {
		path = env.ShimDir + string(os.PathListSeparator) + path
		os.Remove(shimLog)
	}
	cmd.Env = append(cleanEnv(),
		"PATH="+path,
		"CNI_COMMAND="+verb,
		"CNI_CONTAINERID="+a.ID,
		"CNI_NETNS="+env.PodNetns,
		"CNI_IFNAME=eth0",
		"CNI_PATH="+filepath.Dir(p.Path),
		"CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=pod-"+a.ID[:8]+";K8S_POD_INFRA_CONTAINER_ID="+a.ID,
		"PORTGUARD_LOCK_FILE="+env.LockFile,
		"PORTGUARD_STATE_DIR="+filepath.Join(env.WorkDir, "portguard-state"),
		"PORTGUARD_CNI_CACHE_DIR="+filepath.Join(env.WorkDir, "cni-cache"),
		envLaunch+"="+resFile,
	)
	if p.NS != "" {
		cmd.Env = append(cmd.Env, envLaunchNetns+"=/var/run/netns/"+p.NS)
	}
	if shimLog != "" {
		cmd.Env = append(cmd.Env, envShimLog+"="+shimLog, envShimDir+"="+env.ShimDir)
	}
	var res callResult
	err := cmd.Run()
	lr, lerr := readLaunchResult(resFile)
	switch {
	case lerr != nil:
		res.RC = -1
		fmt.Fprintf(&out, "\nlauncher: %v (%v)", lerr, err)
	default:
		res.Ms, res.RSSKiB, res.RC = lr.Ms, lr.RSSKiB, lr.RC
	}
	if res.RC != 0 {
		res.Out = strings.TrimSpace(out.String())
		if len(res.Out) > 600 {
			res.Out = res.Out[:600] + "…"
		}
	}
	if shimLog != "" {
		recs, lerr := readShimLog(shimLog)
		if lerr != nil && res.Out == "" {
			res.Out = lerr.Error()
		}
		res.Procs = recs
	}
	return res
}

// cleanEnv is the bench's environment minus CNI_* and bench-internal variables.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "CNI_") || strings.HasPrefix(kv, "PGB_") ||
			strings.HasPrefix(kv, "PATH=") || strings.HasPrefix(kv, "PORTGUARD_") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// pluginAbout returns the first line a plugin prints when run without CNI_COMMAND.
func pluginAbout(path string) string {
	cmd := exec.Command(path)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	out, _ := cmd.CombinedOutput()
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	if bi, err := buildinfo.ReadFile(path); err == nil {
		line += fmt.Sprintf(" (%s %s", bi.Main.Path, bi.Main.Version)
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				line += " rev " + s.Value[:12]
			}
		}
		line += ", " + bi.GoVersion + ")"
	}
	return line
}
