package xtlegacy

import (
	"encoding/binary"
	"testing"

	"github.com/portguard/portguard/pkg/hostport"
)

// entryBytes builds one entry of layout l with a standard target of verdict v, or an
// ERROR target naming errName.
func entryBytes(l layout, errName string, v int32) []byte {
	tsize := xtHeader + 32
	b := make([]byte, l.size+tsize)
	binary.NativeEndian.PutUint16(b[l.targetOff:], uint16(l.size))
	binary.NativeEndian.PutUint16(b[l.nextOff:], uint16(len(b)))
	binary.NativeEndian.PutUint16(b[l.size:], uint16(tsize))
	if errName != "" {
		copy(b[l.size+2:], errorTarget)
		copy(b[l.size+xtHeader:], errName)
	} else {
		binary.NativeEndian.PutUint32(b[l.size+xtHeader:], uint32(v))
	}
	return b
}

// parse never panics and never loops, whatever the table holds.
func FuzzParse(f *testing.F) {
	for _, fam := range hostport.Families {
		l := layouts[fam]
		head := entryBytes(l, hostport.DNATChain, 0)
		f.Add(uint8(fam), append(append(head, entryBytes(l, "", int32(len(head)))...), entryBytes(l, errorTarget, 0)...))
	}
	f.Add(uint8(0), []byte{})
	f.Fuzz(func(t *testing.T, fam uint8, b []byte) {
		fm := hostport.V4
		if fam%2 == 1 {
			fm = hostport.V6
		}
		_, _ = parse(fm, b)
	})
}

// A jump whose verdict points into CNI-HOSTPORT-DNAT's own entries, or nowhere, is not
// a claim; one whose verdict points at a CNI-DN chain is.
func TestParseJumpTargets(t *testing.T) {
	l := layouts[hostport.V4]
	var b []byte
	add := func(e []byte) int { off := len(b); b = append(b, e...); return off }
	n := len(entryBytes(l, "", 0))
	add(entryBytes(l, hostport.DNATChain, 0))
	// Offsets: head 0, jump n, jump 2n, return 3n, CNI-DN head 4n, its first rule 5n.
	add(entryBytes(l, "", int32(5*n)))
	add(entryBytes(l, "", int32(3*n+7)))
	add(entryBytes(l, "", -5))
	add(entryBytes(l, "CNI-DN-x", 0))
	add(entryBytes(l, "", -5))
	add(entryBytes(l, errorTarget, 0))
	js, err := parse(hostport.V4, b)
	if err != nil || len(js) != 1 || js[0].Chain != "CNI-DN-x" || js[0].Proto != "" || !js[0].Owner.IsZero() {
		t.Fatalf("parse: %+v, %v", js, err)
	}
	if _, err := parse(hostport.V4, b[:len(b)-3]); err == nil {
		t.Errorf("a truncated table parsed")
	}
}
