// Package nft talks to nf_tables over netlink, in-process, for the few reads and deletes
// on the hot path where starting an iptables process and letting it cache whole chains
// costs more than the change itself. It understands only what iptables-nft writes for
// portguard's own rules; everything else stays with iptables (pkg/iptables), which
// remains the only writer of rules. Callers use it only when the node's iptables is the
// nf_tables backend (see Usable), and fall back to iptables whenever a fast path declines.
package nft

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/portguard/portguard/pkg/hostport"
)

// Conn is a netlink socket to nf_tables in the network namespace it was opened in.
type Conn struct {
	fd     int
	seq    atomic.Uint32
	buf    []byte
	sndbuf int // bytes a datagram may have without growing the send buffer
	acks   int // acks of one batch the receive buffer holds without growing
}

// Open opens the socket. The receive timeout keeps a misbehaving kernel from hanging a
// CNI call; every request here is answered in microseconds.
func Open() (*Conn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
	if err != nil {
		return nil, fmt.Errorf("nf_tables netlink socket: %w", err)
	}
	tv := unix.NsecToTimeval(int64(5 * time.Second))
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, err
	}
	// Errors echo only the request's header, not the request: a refused batch message can
	// be hundreds of KiB of elements, and echoing it would overflow the receive buffer.
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_CAP_ACK, 1)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, err
	}
	c := &Conn{fd: fd, buf: make([]byte, 1<<17), sndbuf: 64 << 10, acks: 100}
	c.seq.Store(uint32(time.Now().UnixNano()))
	return c, nil
}

// Close closes the socket. After a commit that deleted something the kernel makes this
// wait for an RCU grace period (nft_rcv_nl_event); so does an iptables process's exit.
func (c *Conn) Close() error { return unix.Close(c.fd) }

func family(f hostport.Family) uint8 {
	if f == hostport.V6 {
		return unix.NFPROTO_IPV6
	}
	return unix.NFPROTO_IPV4
}

// msg is one netlink message under construction.
type msg struct {
	typ   uint16
	flags uint16
	seq   uint32
	data  []byte
}

func nftType(m int) uint16 { return uint16(unix.NFNL_SUBSYS_NFTABLES<<8 | m) }

func newMsg(typ uint16, flags uint16, fam uint8) *msg {
	// struct nfgenmsg: family, version, res_id (big endian).
	return &msg{typ: typ, flags: flags, data: []byte{fam, unix.NFNETLINK_V0, 0, 0}}
}

func (m *msg) attr(typ uint16, payload []byte) *msg {
	l := 4 + len(payload)
	b := make([]byte, align(l))
	binary.NativeEndian.PutUint16(b[0:], uint16(l))
	binary.NativeEndian.PutUint16(b[2:], typ)
	copy(b[4:], payload)
	m.data = append(m.data, b...)
	return m
}

func (m *msg) str(typ uint16, s string) *msg { return m.attr(typ, append([]byte(s), 0)) }

func (m *msg) u64(typ uint16, v uint64) *msg {
	return m.attr(typ, binary.BigEndian.AppendUint64(nil, v))
}

func (m *msg) bytes() []byte {
	b := make([]byte, unix.NLMSG_HDRLEN, unix.NLMSG_HDRLEN+len(m.data))
	binary.NativeEndian.PutUint32(b[0:], uint32(unix.NLMSG_HDRLEN+len(m.data)))
	binary.NativeEndian.PutUint16(b[4:], m.typ)
	binary.NativeEndian.PutUint16(b[6:], m.flags)
	binary.NativeEndian.PutUint32(b[8:], m.seq)
	return append(b, m.data...)
}

func align(n int) int { return (n + unix.NLA_ALIGNTO - 1) &^ (unix.NLA_ALIGNTO - 1) }

// reply is one received message: its type, sequence number and payload after nfgenmsg.
type reply struct {
	typ   uint16
	flags uint16
	seq   uint32
	err   error // for NLMSG_ERROR: nil is an ACK
	fam   uint8 // nfgenmsg's family of an object
	data  []byte
}

// send writes the messages in one datagram, numbering them.
func (c *Conn) send(ms ...*msg) error {
	var out []byte
	for _, m := range ms {
		m.seq = c.seq.Add(1)
		out = append(out, m.bytes()...)
	}
	if len(out) > c.sndbuf {
		// A batch is one datagram, and the socket refuses (EMSGSIZE) one larger than its
		// send buffer (~208 KiB by default: about 4,000 set elements). Grow it as nft(8)
		// does; SO_SNDBUFFORCE passes net.core.wmem_max, which a CNI plugin (root) may.
		n := 2 * len(out)
		if err := unix.SetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, n); err != nil {
			if err := unix.SetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_SNDBUF, n); err != nil {
				return err
			}
		}
		c.sndbuf = len(out)
	}
	return unix.Sendto(c.fd, out, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
}

// recv reads one datagram and splits it into messages.
func (c *Conn) recv() ([]reply, error) {
	n, _, err := unix.Recvfrom(c.fd, c.buf, 0)
	if err != nil {
		return nil, fmt.Errorf("nf_tables netlink: %w", err)
	}
	// One copy per datagram; the messages' payloads are slices of it.
	return split(append([]byte(nil), c.buf[:n]...))
}

// split splits a datagram into messages; their payloads are slices of b.
func split(b []byte) ([]reply, error) {
	var out []reply
	for len(b) >= unix.NLMSG_HDRLEN {
		l := int(binary.NativeEndian.Uint32(b[0:]))
		if l < unix.NLMSG_HDRLEN || l > len(b) {
			return nil, errors.New("nf_tables netlink: truncated message")
		}
		r := reply{typ: binary.NativeEndian.Uint16(b[4:]), flags: binary.NativeEndian.Uint16(b[6:]), seq: binary.NativeEndian.Uint32(b[8:])}
		body := b[unix.NLMSG_HDRLEN:l]
		switch r.typ {
		case unix.NLMSG_ERROR:
			if len(body) < 4 {
				return nil, errors.New("nf_tables netlink: short error message")
			}
			if e := int32(binary.NativeEndian.Uint32(body)); e != 0 {
				r.err = unix.Errno(-e)
			}
			if len(body) >= 4+unix.NLMSG_HDRLEN {
				// The error echoes the request header: its sequence number is the request's.
				r.seq = binary.NativeEndian.Uint32(body[4+8:])
			}
		case unix.NLMSG_DONE:
			// A dump's end carries the errno that cut it short, if one did.
			if len(body) >= 4 {
				if e := int32(binary.NativeEndian.Uint32(body)); e < 0 {
					r.err = unix.Errno(-e)
				}
			}
		default:
			if len(body) >= 4 {
				r.fam, r.data = body[0], body[4:]
			}
		}
		out = append(out, r)
		if align(l) >= len(b) {
			break // the last message may lack its padding
		}
		b = b[align(l):]
	}
	return out, nil
}

// ErrDumpInterrupted says the ruleset changed while a dump was being read, so its parts
// may not fit together; the caller reads again or uses iptables.
var ErrDumpInterrupted = errors.New("nf_tables netlink: the ruleset changed during the dump")

// get sends one request and collects its answers: one object, or every object of a dump.
func (c *Conn) get(m *msg) ([][]byte, error) {
	if err := c.send(m); err != nil {
		return nil, fmt.Errorf("nf_tables netlink: %w", err)
	}
	dump := m.flags&unix.NLM_F_DUMP != 0
	var out [][]byte
	interrupted := false
	for {
		rs, err := c.recv()
		if err != nil {
			return nil, err
		}
		for _, r := range rs {
			if r.seq != m.seq {
				continue // a late answer to an earlier request
			}
			interrupted = interrupted || r.flags&unix.NLM_F_DUMP_INTR != 0
			switch {
			case r.typ == unix.NLMSG_DONE:
				if r.err != nil {
					return nil, r.err
				}
				if interrupted {
					return nil, ErrDumpInterrupted
				}
				return out, nil
			case r.typ == unix.NLMSG_ERROR:
				if r.err != nil {
					return nil, r.err
				}
				return out, nil
			default:
				out = append(out, r.data)
				if !dump {
					return out, nil
				}
			}
		}
	}
}

// Op is one change in a batch.
type Op struct {
	m *msg
}

// DeleteRule deletes the rule with this handle from table nat, chain.
func DeleteRule(f hostport.Family, chain string, handle uint64) Op {
	m := newMsg(nftType(unix.NFT_MSG_DELRULE), unix.NLM_F_REQUEST|unix.NLM_F_ACK, family(f))
	m.str(unix.NFTA_RULE_TABLE, "nat").str(unix.NFTA_RULE_CHAIN, chain).u64(unix.NFTA_RULE_HANDLE, handle)
	return Op{m}
}

// DeleteChain deletes a chain of table nat together with its rules; the kernel refuses
// (and the whole batch fails) while any rule elsewhere still jumps to it.
func DeleteChain(f hostport.Family, chain string) Op {
	m := newMsg(nftType(unix.NFT_MSG_DELCHAIN), unix.NLM_F_REQUEST|unix.NLM_F_ACK, family(f))
	m.str(unix.NFTA_CHAIN_TABLE, "nat").str(unix.NFTA_CHAIN_NAME, chain)
	return Op{m}
}

// Commit applies the ops as one nf_tables transaction: all of them or none.
func (c *Conn) Commit(ops ...Op) error { return c.commit(nil, ops) }

// CommitAt is Commit for a batch planned from reads at generation genid (see GenID): the
// kernel refuses the whole batch with ERESTART when the ruleset changed since.
func (c *Conn) CommitAt(genid uint32, ops ...Op) error { return c.commit(&genid, ops) }

func (c *Conn) commit(genid *uint32, ops []Op) error {
	if len(ops) == 0 {
		return nil
	}
	// Batch begin/end carry the subsystem in nfgenmsg.res_id (big endian).
	begin := &msg{typ: unix.NFNL_MSG_BATCH_BEGIN, flags: unix.NLM_F_REQUEST, data: []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, unix.NFNL_SUBSYS_NFTABLES}}
	if genid != nil {
		begin.attr(unix.NFNL_BATCH_GENID, binary.BigEndian.AppendUint32(nil, *genid))
	}
	end := &msg{typ: unix.NFNL_MSG_BATCH_END, flags: unix.NLM_F_REQUEST, data: []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, unix.NFNL_SUBSYS_NFTABLES}}
	ms := []*msg{begin}
	for _, o := range ops {
		ms = append(ms, o.m)
	}
	ms = append(ms, end)
	if len(ops) > c.acks {
		// Every op is acknowledged by a message of its own, and acks that overflow the
		// receive buffer are dropped (ENOBUFS): size it for the batch, ~1 KiB per ack as
		// the kernel accounts them.
		n := 1024 * len(ops)
		if err := unix.SetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, n); err != nil {
			if err := unix.SetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_RCVBUF, n); err != nil {
				return err
			}
		}
		c.acks = len(ops)
	}
	if err := c.send(ms...); err != nil {
		return fmt.Errorf("nf_tables netlink: %w", err)
	}
	pending := map[uint32]bool{}
	for _, o := range ops {
		pending[o.m.seq] = true
	}
	var errs []error
	for len(pending) > 0 {
		rs, err := c.recv()
		if err != nil {
			return err
		}
		for _, r := range rs {
			if r.typ != unix.NLMSG_ERROR {
				continue
			}
			if r.seq == begin.seq && r.err != nil {
				return fmt.Errorf("nf_tables batch: %w", r.err)
			}
			if pending[r.seq] {
				delete(pending, r.seq)
				if r.err != nil {
					errs = append(errs, r.err)
				}
			}
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("nf_tables batch refused: %w", errors.Join(errs...))
	}
	return nil
}
