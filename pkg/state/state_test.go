package state

import (
	"testing"

	"github.com/portguard/portguard/pkg/hostport"
	"github.com/portguard/portguard/pkg/iptables"
)

// The nat table as upstream portmap v1.10.0 leaves it, printed by iptables-save.
const upstreamSave = `*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:CNI-DN-1111111111111111111111 - [0:0]
:CNI-DN-2222222222222222222222 - [0:0]
:CNI-DN-3333333333333333333333 - [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A POSTROUTING -m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ
-A CNI-DN-1111111111111111111111 -s 10.244.1.0/24 -p tcp -m tcp --dport 8080 -j CNI-HOSTPORT-SETMARK
-A CNI-DN-1111111111111111111111 -s 127.0.0.1/32 -p tcp -m tcp --dport 8080 -j CNI-HOSTPORT-SETMARK
-A CNI-DN-1111111111111111111111 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.244.1.2:80
-A CNI-DN-1111111111111111111111 -d 192.0.2.1/32 -p udp -m udp --dport 53 -j DNAT --to-destination 10.244.1.2:5353
-A CNI-DN-2222222222222222222222 -p tcp -m tcp --dport 8086 -j DNAT --to-destination 10.244.1.3:80
-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"cbr0\" id: \"aaa\"" -m multiport --dports 8080 -j CNI-DN-1111111111111111111111
-A CNI-HOSTPORT-DNAT -p udp -m comment --comment "dnat name: \"cbr0\" id: \"aaa\"" -m multiport --dports 53 -j CNI-DN-1111111111111111111111
-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"cbr0\" id: \"bbb\"" -m multiport --dports 8080 -j CNI-DN-2222222222222222222222
COMMIT
`

func TestStateModelOfUpstreamTable(t *testing.T) {
	tab := iptables.NewTable()
	if err := tab.Parse(upstreamSave); err != nil {
		t.Fatal(err)
	}
	s := New(hostport.V4, tab)
	if len(s.Jumps) != 3 {
		t.Fatalf("jumps %d", len(s.Jumps))
	}
	a := s.Attachments["CNI-DN-1111111111111111111111"]
	if a == nil || a.Owner != (hostport.Owner{Network: "cbr0", ContainerID: "aaa"}) || len(a.Jumps) != 2 || !a.Read || !a.Exists {
		t.Fatalf("attachment aaa: %+v", a)
	}
	if len(a.Mappings) != 2 || len(a.Mappings[0].Rules) != 3 || a.Mappings[0].Dest.String() != "10.244.1.2:80" {
		t.Fatalf("mappings of aaa: %+v", a.Mappings)
	}
	if m := a.Mappings[1]; m.Claim.Proto != "udp" || m.Claim.HostIP.String() != "192.0.2.1" || m.Claim.HostPort != 53 {
		t.Fatalf("hostIP mapping: %+v", m.Claim)
	}
	b := s.Attachments["CNI-DN-2222222222222222222222"]
	if b.Jumps[0].Index != 2 || b.Mappings[0].Claim.HostPort != 8086 || !b.Jumps[0].HasPort(8080) {
		t.Fatalf("the blog post's mismatch (jump 8080, DNAT 8086) must be visible: %+v", b)
	}
	o := s.Attachments["CNI-DN-3333333333333333333333"]
	if o == nil || len(o.Jumps) != 0 || !o.Exists {
		t.Fatalf("orphan chain not modelled: %+v", o)
	}
	if !s.HasRule(EntryJump("PREROUTING")) || !s.HasRule(MasqJump()) || s.HasRule(SetMarkRule(13)) {
		t.Fatal("HasRule on the shared rules")
	}
}

func TestNormalizeEqualsInMeaning(t *testing.T) {
	ours := iptables.Rule{Chain: "C", Args: []string{"-m", "comment", "--comment", "x y", "-m", "multiport", "-p", "tcp", "--destination-ports", "80,81", "-j", "T"}}
	printed, _ := iptables.SplitArgs(`-p tcp -m comment --comment "x y" -m multiport --dports 80,81 -j T`)
	if Normalize(ours) != Normalize(iptables.Rule{Chain: "C", Args: printed}) {
		t.Fatalf("%s\n%s", Normalize(ours), Normalize(iptables.Rule{Chain: "C", Args: printed}))
	}
	a := iptables.Rule{Chain: "C", Args: []string{"-p", "tcp", "--dport", "80", "-s", "127.0.0.1", "-j", "M"}}
	b, _ := iptables.SplitArgs(`-s 127.0.0.1/32 -p tcp -m tcp --dport 80 -j M`)
	if Normalize(a) != Normalize(iptables.Rule{Chain: "C", Args: b}) {
		t.Fatal("implicit -m tcp and /32 must not matter")
	}
	c, _ := iptables.SplitArgs(`-s 127.0.0.1/32 -p tcp -m tcp --dport 81 -j M`)
	if Normalize(a) == Normalize(iptables.Rule{Chain: "C", Args: c}) {
		t.Fatal("different ports compare equal")
	}
	// masqAll's source: iptables prints no -s for a match of every address.
	all := iptables.Rule{Chain: "C", Args: []string{"-p", "tcp", "--dport", "80", "-s", "::/0", "-j", "M"}}
	none, _ := iptables.SplitArgs(`-p tcp -m tcp --dport 80 -j M`)
	if Normalize(all) != Normalize(iptables.Rule{Chain: "C", Args: none}) {
		t.Fatal("-s ::/0 must compare equal to no -s")
	}
	neg := iptables.Rule{Chain: "C", Args: []string{"!", "-s", "0.0.0.0/0", "-p", "tcp", "--dport", "80", "-j", "M"}}
	if Normalize(neg) == Normalize(iptables.Rule{Chain: "C", Args: none}) {
		t.Fatal("! -s 0.0.0.0/0 (no packet) compares equal to no -s (every packet)")
	}
}
