// Command portguard is a CNI meta plugin that forwards host ports to a pod like upstream
// portmap (same configuration, same chains), but applies every call as one iptables
// transaction and never lets a stale claim shadow a new pod. It behaves the same under
// any file name, so it can be installed as "portmap".
package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os/exec"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/portguard/portguard/pkg/backend"
	nftbackend "github.com/portguard/portguard/pkg/backend/nftables"
	"github.com/portguard/portguard/pkg/buildinfo"
	"github.com/portguard/portguard/pkg/cnicache"
	"github.com/portguard/portguard/pkg/config"
	"github.com/portguard/portguard/pkg/conntrack"
	"github.com/portguard/portguard/pkg/engine"
	"github.com/portguard/portguard/pkg/eventlog"
	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/localnet"
)

func main() {
	config.DefaultBackend = probeBackend
	skel.PluginMainFuncs(skel.CNIFuncs{
		Add:    cmdAdd,
		Del:    cmdDel,
		Check:  cmdCheck,
		GC:     cmdGC,
		Status: cmdStatus,
	}, version.PluginSupports("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"),
		buildinfo.About())
}

// newEngine makes the engine of a call; tests replace it to run the verbs against a fake
// nat table (pkg/iptables/iptablestest).
var newEngine = engine.New

// newNFTEngine makes the engine of a call with "backend": "nftables".
var newNFTEngine = func(lockTimeout time.Duration) *engine.Engine {
	return engine.NewWith(nftbackend.New(), lockTimeout)
}

// probeBackend is the backend of a configuration without the backend key: upstream's rule,
// nftables when iptables is unusable and nf_tables works, iptables otherwise. Unusable here
// means no iptables binary in PATH: upstream also runs `iptables --version` and `iptables -S
// INPUT 1`, but two processes on every call of every iptables node would undo the process
// budget of the iptables backend, and a node whose iptables is installed but broken fails
// loudly in the iptables backend instead of silently changing backend.
func probeBackend() string {
	if _, err := exec.LookPath("iptables"); err == nil {
		return config.BackendIPTables
	}
	if nftbackend.New().Status() == nil {
		return config.BackendNFTables
	}
	return config.BackendIPTables
}

// engineFor picks the engine of c's backend.
func engineFor(c *config.Config) *engine.Engine {
	if c.Backend == config.BackendNFTables {
		return newNFTEngine(c.LockTimeout)
	}
	return newEngine(c.LockTimeout)
}

// load validates the call's input with parse (config.Parse, or config.ParseDel for DEL);
// nothing is touched before it passes.
func load(args *skel.CmdArgs, parse func([]byte, string) (*config.Config, error)) (*config.Config, hostport.Owner, error) {
	if err := config.ValidateContainerID(args.ContainerID); err != nil {
		return nil, hostport.Owner{}, err
	}
	c, err := parse(args.StdinData, args.IfName)
	if err != nil {
		return nil, hostport.Owner{}, err
	}
	return c, hostport.Owner{Network: c.Network, ContainerID: args.ContainerID}, nil
}

func cmdAdd(args *skel.CmdArgs) error {
	c, owner, err := load(args, config.Parse)
	if err != nil {
		return err
	}
	if c.PrevResult == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "prevResult: missing; portguard must be chained after a plugin that assigns addresses", "")
	}
	if len(c.Mappings) == 0 {
		return types.PrintResult(c.PrevResult, c.CNIVersion)
	}
	if err := needPodIP(c, args.IfName); err != nil {
		return err
	}
	e := engineFor(c)
	e.OnTakeover = takeoverLogger(c.LogFile)
	e.Judge = liveness.New(c.CNICacheDir)
	e.Sandbox = liveness.Record{Netns: args.Netns, IfName: args.IfName}
	if _, err := e.Add(c, owner); err != nil {
		var ce *types.Error
		if errors.As(err, &ce) && ce.Code == engine.ErrHostPortInUse {
			// A refusal is an event an operator counts (the agent's
			// portguard_plugin_events_total{event="refused"}), not only the runtime's error.
			eventlog.ToStderrAndFile(c.LogFile, slog.LevelWarn, "refused", slog.Any("owner", owner),
				slog.String("policy", c.Policy), slog.String("error", ce.Msg))
		}
		return err
	}
	if ip, ok := c.PodIPs[hostport.V4]; ok && c.SNAT {
		if err := localnet.Enable(ip.Addr()); err != nil {
			return err
		}
	}
	// Flush UDP flows after the rules are in, so new datagrams take the new path.
	for f := range c.PodIPs {
		if err := conntrack.FlushUDP(f, udpPorts(c, f), netip.Addr{}); err != nil {
			eventlog.ToStderrAndFile("", slog.LevelWarn, "conntrack", slog.String("error", err.Error()))
		}
	}
	return types.PrintResult(c.PrevResult, c.CNIVersion)
}

func cmdDel(args *skel.CmdArgs) error {
	c, owner, err := load(args, config.ParseDel)
	if err != nil {
		return err
	}
	// Unlike upstream, DEL also runs without portMappings (some runtimes omit them on
	// DEL): the chain is found by its name, the jumps by reading CNI-HOSTPORT-DNAT.
	if len(c.Mappings) == 0 && !attachmentMayExist(c) {
		return nil
	}
	e := engineFor(c)
	e.Judge = liveness.New(c.CNICacheDir)
	if err := e.Del(c, owner); err != nil {
		return err
	}
	for _, f := range hostport.Families {
		// Only the flows this pod answers: a DEL after a refused ADD must not cut the live
		// owner's flows on the same port. Without the pod's address (no prevResult: libcni
		// caches none for an ADD that failed) there is no flow of this pod to tell apart.
		ip, ok := c.PodIPs[f]
		if !ok {
			continue
		}
		if err := conntrack.FlushUDP(f, udpPorts(c, f), ip.Addr()); err != nil {
			eventlog.ToStderrAndFile("", slog.LevelWarn, "conntrack", slog.String("error", err.Error()))
		}
	}
	return nil
}

// attachmentMayExist tells a runtime that passed portMappings (an empty list or null: a
// pod without host ports, which must cost no iptables process) from one that passed no
// portMappings key on DEL at all (plugins#509): then the attachment may still have rules
// from its ADD, and we look.
func attachmentMayExist(c *config.Config) bool {
	return !c.Raw.PortMappingsSent
}

func cmdCheck(args *skel.CmdArgs) error {
	c, owner, err := load(args, config.Parse)
	if err != nil {
		return err
	}
	if c.PrevResult == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "prevResult: missing; CHECK needs the result of ADD", "")
	}
	if len(c.Mappings) == 0 {
		return nil
	}
	if err := needPodIP(c, args.IfName); err != nil {
		return err
	}
	return engineFor(c).Check(c, owner)
}

func cmdGC(args *skel.CmdArgs) error {
	c, err := config.Parse(args.StdinData, args.IfName)
	if err != nil {
		return err
	}
	valid := map[string]bool{}
	for _, a := range c.Raw.ValidAttachments {
		valid[a.ContainerID] = true
	}
	e := engineFor(c)
	e.Judge = liveness.New(c.CNICacheDir)
	// GC goes by the runtime's valid-attachments list (CNI spec); the evidence is for the
	// log, gathered before GC removes the records it rests on (the Judge keeps verdicts).
	cached := cnicache.Owners(cnicache.Dir(), c.Network)
	for _, r := range e.Judge.Records.All() {
		cached = append(cached, r.Owner)
	}
	for _, o := range cached {
		if o.Network == c.Network && !valid[o.ContainerID] {
			e.Judge.Owner(o, netip.Addr{})
		}
	}
	removed, err := e.GC(c.Network, valid, cached)
	for _, o := range removed {
		ev := e.Judge.Owner(o, netip.Addr{})
		eventlog.ToStderrAndFile(c.LogFile, slog.LevelInfo, "gc", slog.Any("removed", o), slog.Any("evidence", ev))
	}
	var ce *types.Error
	if err != nil && !errors.As(err, &ce) {
		return types.NewError(types.ErrInternal, "GC of network "+c.Network+" incomplete: "+err.Error(), "")
	}
	return err
}

func cmdStatus(args *skel.CmdArgs) error {
	c, err := config.Parse(args.StdinData, args.IfName)
	if err != nil {
		return err
	}
	return engineFor(c).Status()
}

// needPodIP refuses host ports for a pod prevResult gives no address: upstream silently
// installs nothing, and the ports just never work.
func needPodIP(c *config.Config, ifName string) error {
	if len(c.PodIPs) == 0 {
		return types.NewError(types.ErrInvalidNetworkConfig,
			fmt.Sprintf("prevResult: no IP address on the sandbox interface %q to forward the host ports to", ifName), "")
	}
	return nil
}

func udpPorts(c *config.Config, f hostport.Family) []int {
	var out []int
	for _, m := range c.Mappings {
		if m.Proto == "udp" && m.AppliesTo(f) {
			out = append(out, m.HostPort)
		}
	}
	return out
}

func takeoverLogger(file string) func(backend.Takeover) {
	return func(t backend.Takeover) {
		eventlog.ToStderrAndFile(file, slog.LevelInfo, "takeover", slog.Any("takeover", t))
	}
}
