package main

// The TAKEOVER op: a podman-style port range (one attachment with K mappings, left behind
// by a dead container) and later ADDs that each take ONE of its ports. What such an ADD
// costs must follow what it changes (one mapping), not what the victim keeps (K-1).

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// rangePort is the first host port of the range attachment: it holds rangePort..+K-1,
// above the existing attachments' ports (-n at most maxRangeExisting with TAKEOVER) and
// below the drain's.
const (
	rangePort        = 30000
	maxRange         = 20000
	maxRangeExisting = (rangePort - existingPort) / 2
)

// takeoverStats is one plugin's TAKEOVER runs.
type takeoverStats struct {
	Plugin    string
	Mappings  int
	VictimMs  float64   // the range attachment's own ADD
	Ms        []float64 // each one-port takeover ADD
	Failures  int
	FirstErr  string
	Verified  string // "ok", or what the last takeover left wrong
	VictimErr string
}

// rangeConf is the network config of an attachment with the given TCP host ports (each
// to the same container port), built like netConf's.
func rangeConf(p plugin, id string, ip netip.Addr, podNetns string, ports []int) []byte {
	var conf map[string]any
	json.Unmarshal(netConf(p, attachment{ID: id, IP: ip}, podNetns, false), &conf)
	var maps []map[string]any
	for _, hp := range ports {
		maps = append(maps, map[string]any{"hostPort": hp, "containerPort": hp, "protocol": "tcp"})
	}
	conf["runtimeConfig"] = map[string]any{"portMappings": maps}
	b, _ := json.Marshal(conf)
	return b
}

// runTakeover ADDs the range attachment (K mappings), then times runs ADDs that each take
// one of its ports (DELeted again, untimed), and finally DELs the range attachment.
func runTakeover(cfg scenarioConfig, p plugin) takeoverStats {
	st := takeoverStats{Plugin: p.Name, Mappings: cfg.Range, Verified: "ok"}
	victimID := containerID("range-"+p.Name, 0)
	victimIP := podIP(220, 0)
	var ports []int
	for i := 0; i < cfg.Range; i++ {
		ports = append(ports, rangePort+i)
	}
	vconf := rangeConf(p, victimID, victimIP, cfg.Env.PodNetns, ports)
	r := invokeConf(p, "ADD", victimID, vconf, cfg.Env, "")
	st.VictimMs = r.Ms
	if r.failed() {
		st.VictimErr = fmt.Sprintf("rc=%d: %s", r.RC, r.Out)
		return st
	}
	for run := 1; run <= cfg.Runs && run < cfg.Range; run++ {
		id := containerID("taker-"+p.Name, run)
		port := rangePort + run - 1
		conf := rangeConf(p, id, podIP(230, run), cfg.Env.PodNetns, []int{port})
		r := invokeConf(p, "ADD", id, conf, cfg.Env, "")
		st.Ms = append(st.Ms, r.Ms)
		if r.failed() {
			st.Failures++
			if st.FirstErr == "" {
				st.FirstErr = fmt.Sprintf("rc=%d: %s", r.RC, r.Out)
			}
		} else if run == cfg.Runs || run == cfg.Range-1 {
			st.Verified = verifyTakeover(victimID, id, port)
		}
		invokeConf(p, "DEL", id, conf, cfg.Env, "")
	}
	invokeConf(p, "DEL", victimID, vconf, cfg.Env, "")
	return st
}

// verifyTakeover checks the last takeover: the taker's jump is the only claim on the port,
// and the victim's chain still forwards the next port.
func verifyTakeover(victimID, takerID string, port int) string {
	st, err := natStateIn("")
	if err != nil {
		return err.Error()
	}
	victim, taker := dnChainName(netName, victimID), dnChainName(netName, takerID)
	claims, victimNext := 0, false
	for _, l := range strings.Split(st, "\n") {
		f := strings.Fields(l)
		if len(f) > 1 && f[0] == "-A" && f[1] == "CNI-HOSTPORT-DNAT" && slices.Contains(dports(f), port) {
			claims++
			if f[len(f)-1] != taker {
				return fmt.Sprintf("port %d is still claimed by %s", port, f[len(f)-1])
			}
		}
		if len(f) > 1 && f[0] == "-A" && f[1] == victim && slices.Contains(dports(f), port+1) && slices.Contains(f, "DNAT") {
			victimNext = true
		}
	}
	switch {
	case claims != 1:
		return fmt.Sprintf("%d claims on port %d after the takeover, want 1", claims, port)
	case !victimNext:
		return fmt.Sprintf("the victim lost port %d too", port+1)
	}
	return "ok"
}

// dports reads the destination ports of an iptables-save rule (--dport or a multiport
// list, ranges expanded).
func dports(f []string) []int {
	var out []int
	for i := 0; i+1 < len(f); i++ {
		if f[i] != "--dport" && f[i] != "--dports" {
			continue
		}
		for _, part := range strings.Split(f[i+1], ",") {
			lo, hi, isRange := strings.Cut(part, ":")
			a, _ := strconv.Atoi(lo)
			b := a
			if isRange {
				b, _ = strconv.Atoi(hi)
			}
			for p := a; p <= b && p-a <= 65535; p++ {
				out = append(out, p)
			}
		}
	}
	return out
}
