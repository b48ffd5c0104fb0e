package testbed

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// Timeout bounds each connection attempt and each wait for an answer.
var Timeout = 2 * time.Second

type podProc struct {
	cmd *exec.Cmd
}

func stopProc(c *exec.Cmd) {
	if c.Process == nil {
		return
	}
	_ = syscall.Kill(-c.Process.Pid, syscall.SIGKILL)
	_ = c.Process.Kill()
	_, _ = c.Process.Wait()
}

// Serve starts socat responders in the pod on each port (default 80): TCP and UDP, IPv4 and
// IPv6. Every TCP connection and every UDP datagram is answered with the pod's name and a
// newline. It returns once all listeners are bound; they stop with the bed, Kill or
// StopServing.
func (p *Pod) Serve(ports ...int) {
	p.Bed.T.Helper()
	// TCP: the client sends nothing, echo answers and the connection closes. UDP: the child
	// must consume the datagram socat writes to its stdin before answering, or socat can hit
	// EPIPE and drop the answer.
	p.serve("EXEC:/bin/echo "+p.Name, "SYSTEM:head -c1 >/dev/null; echo "+p.Name, ports)
}

// ServePeer is Serve with responders that answer "<name> <peer address>": the source
// address the connection or datagram reached the pod with (after any masquerade), as
// socat reports it (IPv6 in brackets; see PeerOf).
func (p *Pod) ServePeer(ports ...int) {
	p.Bed.T.Helper()
	p.serve("SYSTEM:echo "+p.Name+" $SOCAT_PEERADDR", "SYSTEM:head -c1 >/dev/null; echo "+p.Name+" $SOCAT_PEERADDR", ports)
}

// PeerOf splits a ServePeer answer into the pod's name and the peer address (nil when the
// answer carries none).
func PeerOf(answer string) (string, net.IP) {
	name, peer, _ := strings.Cut(answer, " ")
	return name, net.ParseIP(strings.Trim(peer, "[]"))
}

func (p *Pod) serve(tcpReply, udpReply string, ports []int) {
	b := p.Bed
	b.T.Helper()
	if len(ports) == 0 {
		ports = []int{80}
	}
	for _, port := range ports {
		for _, l := range []struct{ addr, proto, reply string }{
			{fmt.Sprintf("TCP4-LISTEN:%d,reuseaddr,fork", port), "tcp", tcpReply},
			{fmt.Sprintf("TCP6-LISTEN:%d,ipv6only=1,reuseaddr,fork", port), "tcp6", tcpReply},
			{fmt.Sprintf("UDP4-RECVFROM:%d,reuseaddr,fork", port), "udp", udpReply},
			{fmt.Sprintf("UDP6-RECVFROM:%d,ipv6only=1,reuseaddr,fork", port), "udp6", udpReply},
		} {
			cmd := exec.Command("ip", "netns", "exec", p.NetNS, "socat", l.addr, l.reply)
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
			if err := cmd.Start(); err != nil {
				b.T.Fatal(err)
			}
			b.mu.Lock()
			b.procs = append(b.procs, cmd)
			p.procs = append(p.procs, &podProc{cmd: cmd})
			b.mu.Unlock()
			if err := waitListening(cmd.Process.Pid, l.proto, port); err != nil {
				b.T.Fatalf("responder %s in pod %s: %v", l.addr, p.Name, err)
			}
		}
	}
}

// StopServing kills the pod's responders.
func (p *Pod) StopServing() {
	p.Bed.mu.Lock()
	procs := p.procs
	p.procs = nil
	p.Bed.mu.Unlock()
	for _, pp := range procs {
		stopProc(pp.cmd)
	}
}

// waitListening polls /proc/<pid>/net/<proto> (the socket table of the process's netns) until
// the socat process (after `ip netns exec` has exec'd it) has a listening socket on port.
func waitListening(pid int, proto string, port int) error {
	deadline := time.Now().Add(5 * time.Second)
	want := fmt.Sprintf(":%04X", port)
	state := "0A" // TCP_LISTEN
	if strings.HasPrefix(proto, "udp") {
		state = "07" // unconnected UDP
	}
	for time.Now().Before(deadline) {
		comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if err != nil {
			return fmt.Errorf("process exited: %v", err)
		}
		if strings.TrimSpace(string(comm)) == "socat" {
			data, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, proto))
			if err == nil {
				for _, line := range strings.Split(string(data), "\n")[1:] {
					f := strings.Fields(line)
					if len(f) > 3 && strings.HasSuffix(f[1], want) && f[3] == state {
						return nil
					}
				}
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	return errors.New("not listening after 5s")
}

var testRanges = []*net.IPNet{
	mustCIDR("198.18.0.0/15"),
	mustCIDR("fd00::/8"),
	mustCIDR("127.0.0.0/8"),
	mustCIDR("::1/128"),
}

func checkTarget(fromNS string, addr string) (net.IP, error) {
	if !strings.HasPrefix(fromNS, "pge-") {
		return nil, fmt.Errorf("testbed: refusing to send traffic from namespace %q (not a test bed namespace)", fromNS)
	}
	ip := net.ParseIP(strings.Trim(addr, "[]"))
	if ip == nil {
		return nil, fmt.Errorf("testbed: %q is not an IP address", addr)
	}
	for _, r := range testRanges {
		if r.Contains(ip) {
			return ip, nil
		}
	}
	return nil, fmt.Errorf("testbed: refusing to send traffic to %s (outside the test ranges)", ip)
}

// inNetns runs f in the named namespace on a locked OS thread; sockets created there stay in
// that namespace.
func inNetns(name string, f func() error) error {
	h, err := ns.GetNS("/var/run/netns/" + name)
	if err != nil {
		return err
	}
	defer h.Close()
	return h.Do(func(ns.NetNS) error { return f() })
}

// ConnectTCP connects from a bed namespace to addr:port and returns what the peer sent
// before closing (trimmed): the name of the pod that answered. Timeouts are bounded by
// Timeout.
func ConnectTCP(fromNS, addr string, port int) (string, error) {
	ip, err := checkTarget(fromNS, addr)
	if err != nil {
		return "", err
	}
	var conn net.Conn
	err = inNetns(fromNS, func() error {
		var err error
		conn, err = net.DialTimeout("tcp", net.JoinHostPort(ip.String(), strconv.Itoa(port)), Timeout)
		return err
	})
	if err != nil {
		return "", fmt.Errorf("tcp %s -> %s: %w", fromNS, net.JoinHostPort(ip.String(), strconv.Itoa(port)), err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(Timeout))
	data, err := io.ReadAll(conn)
	if err != nil && len(data) == 0 {
		return "", fmt.Errorf("tcp %s -> %s: read: %w", fromNS, net.JoinHostPort(ip.String(), strconv.Itoa(port)), err)
	}
	return strings.TrimSpace(string(data)), nil
}

// SendUDP sends a datagram from a bed namespace to addr:port and returns the first answer
// (trimmed): the name of the pod that answered. It tries up to 3 times within ~Timeout.
func SendUDP(fromNS, addr string, port int) (string, error) {
	return sendUDP(fromNS, 0, addr, port)
}

// SendUDPFromPort is SendUDP from a fixed source port, so successive calls belong to the same
// conntrack entry (to test that stale UDP entries are flushed).
func SendUDPFromPort(fromNS string, srcPort int, addr string, port int) (string, error) {
	return sendUDP(fromNS, srcPort, addr, port)
}

func sendUDP(fromNS string, srcPort int, addr string, port int) (string, error) {
	ip, err := checkTarget(fromNS, addr)
	if err != nil {
		return "", err
	}
	target := net.JoinHostPort(ip.String(), strconv.Itoa(port))
	var conn *net.UDPConn
	network := "udp4"
	if ip.To4() == nil {
		network = "udp6"
	}
	for attempt := 0; ; attempt++ {
		err = inNetns(fromNS, func() error {
			var laddr *net.UDPAddr
			if srcPort != 0 {
				laddr = &net.UDPAddr{Port: srcPort}
			}
			var err error
			conn, err = net.DialUDP(network, laddr, &net.UDPAddr{IP: ip, Port: port})
			return err
		})
		// a fixed source port just released by the previous call: try again briefly
		if err == nil || srcPort == 0 || !errors.Is(err, syscall.EADDRINUSE) || attempt >= 10 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return "", fmt.Errorf("udp %s -> %s: %w", fromNS, target, err)
	}
	defer conn.Close()
	buf := make([]byte, 512)
	var lastErr error
	for i := 0; i < 3; i++ {
		if _, err := conn.Write([]byte("ping\n")); err != nil {
			lastErr = err
		}
		_ = conn.SetReadDeadline(time.Now().Add(Timeout / 3))
		n, err := conn.Read(buf)
		if err == nil {
			return strings.TrimSpace(string(buf[:n])), nil
		}
		lastErr = err
		var ne net.Error
		if !(errors.As(err, &ne) && ne.Timeout()) {
			// e.g. ICMP port unreachable: retry after a short pause
			time.Sleep(Timeout / 6)
		}
	}
	return "", fmt.Errorf("udp %s:%d -> %s: no answer: %w", fromNS, srcPort, target, lastErr)
}

// Dial is ConnectTCP or SendUDP by protocol name ("tcp" or "udp").
func Dial(proto, fromNS, addr string, port int) (string, error) {
	if strings.EqualFold(proto, "udp") {
		return SendUDP(fromNS, addr, port)
	}
	return ConnectTCP(fromNS, addr, port)
}
