package main

// The CONN op (-backend nftables): what a new connection through a claim costs with N
// other claims on the node. A real pod (namespace `<node>-cp`, veth on the node's cni0,
// 10.244.250.2 with a TCP listener on :80) is ADDed by the plugin with host port 61000;
// the runner then opens cfg.ConnRuns TCP connections from the node's namespace to
// 10.244.0.1:61000 (the node's cni0 address: `fib daddr type local`, DNAT in the output
// hook) and as many straight to the pod (no DNAT: the floor of the same path), alternating,
// and reports the medians. Each connection is a full handshake, closed at once; the plugin's
// rules are walked once per connection (conntrack keeps the rest of a flow off them).

import (
	"fmt"
	"net"
	"net/netip"
	"sort"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

const connPort = 61000

// connStats is one plugin's CONN measurement in a scenario.
type connStats struct {
	Plugin   string
	Runs     int
	ClaimUs  float64 // median µs per connection through the claim (connect + close)
	DirectUs float64 // median µs per connection straight to the pod
	ClaimP90 float64
	Err      string
}

func connAttachment(plugin string) attachment {
	return attachment{ID: containerID("conn-"+plugin, 0), IP: netip.MustParseAddr("10.244.250.2"), Ports: [2]int{connPort, connPort + 1}}
}

// runConn measures plugin p's connection cost (see the file comment); the pod and the
// attachment are removed again.
func runConn(cfg scenarioConfig, p plugin) connStats {
	st := connStats{Plugin: p.Name, Runs: cfg.ConnRuns}
	if p.NS == "" {
		st.Err = "needs a node namespace per plugin (-backend nftables)"
		return st
	}
	a := connAttachment(p.Name)
	pod := p.NS + "-cp"
	if _, err := runOut("ip", "netns", "add", pod); err != nil {
		st.Err = err.Error()
		return st
	}
	defer runOut("ip", "netns", "del", pod)
	for _, c := range [][]string{
		{p.NS, "ip", "link", "add", "pgbc0", "type", "veth", "peer", "name", "eth0", "netns", pod},
		{p.NS, "ip", "link", "set", "pgbc0", "master", "cni0", "up"},
		{pod, "ip", "link", "set", "lo", "up"},
		{pod, "ip", "addr", "add", a.IP.String() + "/16", "dev", "eth0"},
		{pod, "ip", "link", "set", "eth0", "up"},
		{pod, "ip", "route", "add", "default", "via", "10.244.0.1"},
	} {
		if _, err := runIn(c[0], c[1], c[2:]...); err != nil {
			st.Err = err.Error()
			return st
		}
	}
	defer runIn(p.NS, "ip", "link", "del", "pgbc0")
	var ln net.Listener
	err := ns.WithNetNSPath("/var/run/netns/"+pod, func(ns.NetNS) (err error) {
		ln, err = net.Listen("tcp", a.IP.String()+":80")
		return err
	})
	if err != nil {
		st.Err = err.Error()
		return st
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	env := cfg.Env
	env.PodNetns = "/var/run/netns/" + pod
	if r := invoke(p, "ADD", a, env, true, ""); r.failed() {
		st.Err = fmt.Sprintf("ADD: rc=%d: %s", r.RC, r.Out)
		return st
	}
	defer invoke(p, "DEL", a, env, true, "")
	ts, err := dialTimes("/var/run/netns/"+p.NS, cfg.ConnRuns, fmt.Sprintf("10.244.0.1:%d", connPort), a.IP.String()+":80")
	if err != nil {
		st.Err = err.Error()
		return st
	}
	claim, direct := ts[0], ts[1]
	st.ClaimUs, st.ClaimP90, st.DirectUs = median(claim), p90(claim), median(direct)
	return st
}

// dialTimes opens n TCP connections to each of addrs from network namespace nsPath, one at
// a time and alternating between the addresses (so a change of the machine's load hits them
// alike), and returns per address the µs each connect took (handshake done), sorted. The
// socket closes with RST (linger 0), so the node keeps no TIME_WAIT entry per connection.
func dialTimes(nsPath string, n int, addrs ...string) ([][]float64, error) {
	out := make([][]float64, len(addrs))
	err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		var sas []*unix.SockaddrInet4
		for _, addr := range addrs {
			ap, err := netip.ParseAddrPort(addr)
			if err != nil {
				return err
			}
			sas = append(sas, &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()})
		}
		// Blocking syscalls on this (locked) thread, not the runtime's poller: the figure is
		// the kernel's path (SYN out through the nat hooks, SYN-ACK back), not goroutine wakeups.
		for i := 0; i < n; i++ {
			for k, sa := range sas {
				fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
				if err != nil {
					return err
				}
				t0 := time.Now()
				err = unix.Connect(fd, sa)
				d := time.Since(t0)
				_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
				unix.Close(fd)
				if err != nil {
					return fmt.Errorf("connect %s: %w", addrs[k], err)
				}
				out[k] = append(out[k], float64(d.Nanoseconds())/1e3)
			}
		}
		return nil
	})
	for _, ts := range out {
		sort.Float64s(ts)
	}
	return out, err
}
