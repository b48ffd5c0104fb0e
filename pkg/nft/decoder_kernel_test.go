package nft

import (
	"fmt"
	"os/exec"
	"reflect"
	"strings"
	"testing"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
	"github.com/portguard/portguard/pkg/state"
)

// The decoder against the kernel, in both families: iptables-nft writes each shape, the
// decoder reads it back over netlink, and `iptables -S` is the reference.

// shapes holds, per family, rules the decoder must read exactly as iptables -S prints
// them, and rules of shapes it must decline.
var shapes = map[hostport.Family]struct{ known, unknown []string }{
	hostport.V4: {
		known: []string{
			"-p tcp --dport 8080 -s 10.244.0.0/16 -j CNI-HOSTPORT-SETMARK",
			"-p tcp --dport 8080 -s 127.0.0.1 -j CNI-HOSTPORT-SETMARK",
			"-p tcp --dport 8080 -d 192.0.2.1 -j DNAT --to-destination 10.244.0.9:80",
			"-p udp --dport 53 -s 0.0.0.0/0 -j CNI-HOSTPORT-SETMARK",
			"-p udp --dport 53 -j DNAT --to-destination 10.244.0.9:5353",
			"-p sctp --dport 3868 -s 10.244.0.0/16 -j CNI-HOSTPORT-SETMARK",
			"-p sctp --dport 3868 -j DNAT --to-destination 10.244.0.9:3868",
			"-p tcp --dport 8081 -s 10.240.0.0/12 -d 10.1.2.2/31 -j OPERATOR-MARK",
			"! -s 10.0.0.0/8 ! -d 172.16.0.0/17 -p tcp --dport 1 -j OPERATOR-MARK",
			"-d 198.51.100.7 -p tcp -m comment --comment \"dnat name: \\\"n\\\" id: \\\"c\\\"\" -m multiport --dports 80,8000:8010,9000 -j CNI-DN-x",
			"-m comment --comment \"dnat name: \\\"n\\\" id: \\\"c\\\"\" -m multiport -p udp --destination-ports 53 ! -s 10.0.0.0/8 -j CNI-DN-x",
			"-p tcp -m multiport --dports 1:65535 -j CNI-DN-x",
			"-p tcp --dport 7 -j DNAT --to-destination 255.255.255.254:65535",
		},
		unknown: []string{
			"-p tcp --dport 80:90 -j DNAT --to-destination 10.0.0.1:80",
			"-p tcp --sport 80 -j DNAT --to-destination 10.0.0.1:80",
			"-i eth0 -p tcp --dport 80 -j DNAT --to-destination 10.0.0.1:80",
			"-p tcp --dport 80 -j DNAT --to-destination 10.0.0.1",
			"-p tcp --dport 80 -j DNAT --to-destination 10.0.0.1:80 --random",
			"-p tcp --dport 80 -j DNAT --to-destination 10.0.0.1-10.0.0.2:80",
			"-p tcp --dport 80 -j RETURN",
			"-p tcp --dport 80 -m iprange --src-range 10.0.0.1-10.0.0.9 -j CNI-DN-x",
			"! -p tcp -j CNI-DN-x",
			"-p tcp -m multiport ! --dports 80 -j CNI-DN-x",
			"-p sctp --dport 80:81 -j CNI-DN-x",
			"-p icmp -j CNI-DN-x",
			"-p tcp --dport 80 -g CNI-DN-x",
		},
	},
	hostport.V6: {
		known: []string{
			"-p tcp --dport 8080 -s fd00:1::/64 -j CNI-HOSTPORT-SETMARK",
			"-p tcp --dport 8080 -s fd00:1::/60 -j CNI-HOSTPORT-SETMARK",
			"-p tcp --dport 8080 -s ::/0 -j CNI-HOSTPORT-SETMARK",
			"-p tcp --dport 8080 -d 2001:db8::1 -j DNAT --to-destination [fd00:1::9]:80",
			"-p udp --dport 8082 -j DNAT --to-destination [fd00:1::9]:80",
			"-p sctp --dport 3868 -j DNAT --to-destination [::ffff:10.0.0.1]:3868",
			"! -s 2001:db8::/32 -d ::1 -p tcp --dport 9 -j OPERATOR-MARK",
			"-d 2001:db8:0:1::/127 -p tcp -m comment --comment \"dnat name: \\\"n\\\" id: \\\"c\\\"\" -m multiport --dports 80,443 -j CNI-DN-x",
		},
		unknown: []string{
			"-p tcp --dport 80:90 -j DNAT --to-destination [fd00::1]:80",
			"-i eth0 -p tcp --dport 80 -j DNAT --to-destination [fd00::1]:80",
			"-p tcp --dport 80 -j DNAT --to-destination fd00::1",
			"-p tcp -m comment --comment x -j RETURN",
		},
	},
}

func restoreTool(f hostport.Family) string {
	if f == hostport.V6 {
		return "ip6tables-restore"
	}
	return "iptables-restore"
}

// newNodeFamilies is newNode with netlink checked usable for IPv6 too.
func newNodeFamilies(t *testing.T) *node {
	n := newNode(t, "")
	path, err := exec.LookPath("ip6tables")
	if err != nil {
		t.Skip("ip6tables not installed")
	}
	usable := false
	n.do(func() { usable = Usable(hostport.V6, path) })
	if !usable {
		t.Skip("ip6tables here is not the nf_tables backend")
	}
	return n
}

func TestKernelDecoderEqualsIptables(t *testing.T) {
	n := newNodeFamilies(t)
	c := n.conn()
	exe := &iptables.Exec{WaitSeconds: 5, Prefix: []string{"ip", "netns", "exec", n.name}}
	for _, f := range hostport.Families {
		var b strings.Builder
		b.WriteString("*nat\n:CNI-HOSTPORT-SETMARK - [0:0]\n:OPERATOR-MARK - [0:0]\n:CNI-DN-x - [0:0]\n:KNOWN - [0:0]\n")
		for _, r := range shapes[f].known {
			fmt.Fprintf(&b, "-A KNOWN %s\n", r)
		}
		for i, r := range shapes[f].unknown {
			fmt.Fprintf(&b, ":U%d - [0:0]\n-A U%d %s\n", i, i, r)
		}
		b.WriteString("COMMIT\n")
		n.run(b.String(), restoreTool(f), "-w")

		want := iptables.NewTable()
		if err := exe.List(f, "KNOWN", want); err != nil {
			t.Fatal(err)
		}
		var got []iptables.Rule
		var exists, ok bool
		n.do(func() { got, exists, ok = c.ReadChain(f, "KNOWN") })
		if !ok || !exists {
			t.Fatalf("%s: ReadChain(KNOWN) = exists %v, ok %v", f, exists, ok)
		}
		if len(want.Rules("KNOWN")) != len(shapes[f].known) {
			t.Fatalf("%s: iptables -S shows %d rules", f, len(want.Rules("KNOWN")))
		}
		for i, w := range want.Rules("KNOWN") {
			if !reflect.DeepEqual(got[i], w) {
				t.Errorf("%s: rule %q\n  decoded: %q\n  iptables: %q", f, shapes[f].known[i], got[i].Args, w.Args)
			}
		}
		for i, r := range shapes[f].unknown {
			n.do(func() { _, exists, ok = c.ReadChain(f, fmt.Sprintf("U%d", i)) })
			if ok {
				t.Errorf("%s: decoded a rule of unknown shape: %s", f, r)
			}
		}
		n.do(func() { _, exists, ok = c.ReadChain(f, "NOSUCHCHAIN") })
		if !ok || exists {
			t.Errorf("%s: a missing chain reads as exists %v, ok %v", f, exists, ok)
		}
	}
}

// TestKernelExcerpt: CHECK's read keeps exactly the rules that jump to the attachment's
// chain or match one of its claims' protocol and port, with their positions, in both
// families; an unknown shape anywhere makes it decline.
func TestKernelExcerpt(t *testing.T) {
	n := newNodeFamilies(t)
	c := n.conn()
	exe := &iptables.Exec{WaitSeconds: 5, Prefix: []string{"ip", "netns", "exec", n.name}}
	own := hostport.ChainName(hostport.Owner{Network: "knet", ContainerID: "own"})
	jump := func(id, proto, ports, cond, chain string) string {
		return fmt.Sprintf("-A CNI-HOSTPORT-DNAT %s -p %s -m comment --comment \"dnat name: \\\"knet\\\" id: \\\"%s\\\"\" -m multiport --dports %s -j %s\n", cond, proto, id, ports, chain)
	}
	for _, f := range hostport.Families {
		addr := map[hostport.Family]string{hostport.V4: "-d 192.0.2.1/32", hostport.V6: "-d 2001:db8::1/128"}[f]
		var b strings.Builder
		b.WriteString("*nat\n:CNI-HOSTPORT-DNAT - [0:0]\n:CNI-DN-other - [0:0]\n:" + own + " - [0:0]\n")
		for i := 0; i < 40; i++ { // unrelated claims
			b.WriteString(jump(fmt.Sprint("u", i), "tcp", fmt.Sprintf("%d,%d", 20000+2*i, 20001+2*i), "", "CNI-DN-other"))
		}
		b.WriteString(jump("shadow", "tcp", "7000:7010", addr, "CNI-DN-other"))     // 40: covers 7005
		b.WriteString(jump("udp", "udp", "7005", "", "CNI-DN-other"))               // 41: other protocol
		b.WriteString(jump("own", "tcp", "7005,7100", "", own))                     // 42
		b.WriteString(jump("own", "udp", "53", "", own))                            // 43
		b.WriteString("-A CNI-HOSTPORT-DNAT -p tcp --dport 7100 -j CNI-DN-other\n") // 44: a plain --dport
		b.WriteString(jump("near", "tcp", "7101", "", "CNI-DN-other"))              // 45
		b.WriteString("COMMIT\n")
		n.run(b.String(), restoreTool(f), "-w")

		claims := []hostport.Claim{
			{Family: f, Proto: "tcp", HostPort: 7005}, {Family: f, Proto: "tcp", HostPort: 7100}, {Family: f, Proto: "udp", HostPort: 53},
		}
		var ex Excerpt
		var exists, ok bool
		n.do(func() { ex, exists, ok = c.Excerpt(f, state.DNATChain, own, claims) })
		if !ok || !exists || ex.Len != 46 {
			t.Fatalf("%s: Excerpt = exists %v, ok %v, len %d", f, exists, ok, ex.Len)
		}
		all := iptables.NewTable()
		if err := exe.List(f, state.DNATChain, all); err != nil {
			t.Fatal(err)
		}
		wantPos := []int{40, 42, 43, 44}
		if !reflect.DeepEqual(ex.Pos, wantPos) {
			t.Fatalf("%s: kept positions %v, want %v", f, ex.Pos, wantPos)
		}
		for i, p := range wantPos {
			if w := all.Rules(state.DNATChain)[p]; !reflect.DeepEqual(ex.Rules[i], w) {
				t.Errorf("%s: rule %d\n  excerpt: %q\n  iptables: %q", f, p, ex.Rules[i].Args, w.Args)
			}
		}

		// The model built from the excerpt numbers the kernel's positions.
		tab := iptables.NewTable()
		tab.Add(state.DNATChain, ex.Rules...)
		s := state.NewExcerpt(f, tab, ex.Pos)
		if a := s.Attachments[own]; a == nil || len(a.Jumps) != 2 || a.Jumps[0].Index != 42 || a.Owner.ContainerID != "own" {
			t.Fatalf("%s: own attachment from the excerpt: %+v", f, a)
		}

		// An unknown shape anywhere in the chain: declined.
		n.run("*nat\n-A CNI-HOSTPORT-DNAT -i eth0 -p tcp --dport 1 -j CNI-DN-other\nCOMMIT\n", restoreTool(f), "--noflush", "-w")
		n.do(func() { _, _, ok = c.Excerpt(f, state.DNATChain, own, claims) })
		if ok {
			t.Errorf("%s: Excerpt accepted a chain with an interface match", f)
		}
		// An empty chain exists; a missing one does not.
		n.run("*nat\n-F CNI-HOSTPORT-DNAT\nCOMMIT\n", restoreTool(f), "--noflush", "-w")
		n.do(func() { ex, exists, ok = c.Excerpt(f, state.DNATChain, own, claims) })
		if !ok || !exists || ex.Len != 0 {
			t.Errorf("%s: empty chain: exists %v, ok %v, len %d", f, exists, ok, ex.Len)
		}
		n.run("*nat\n-X CNI-HOSTPORT-DNAT\nCOMMIT\n", restoreTool(f), "--noflush", "-w")
		n.do(func() { ex, exists, ok = c.Excerpt(f, state.DNATChain, own, claims) })
		if !ok || exists {
			t.Errorf("%s: missing chain: exists %v, ok %v", f, exists, ok)
		}
	}
}
