package nft

import (
	"bytes"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// The element list AddElems encodes decodes back (the decoder is the one dumps use), and a
// list too long for one attribute is split into messages that each decode whole.
func TestElemsEncodeDecode(t *testing.T) {
	es := []Elem{
		{Key: []byte{6, 0, 0, 0, 0x1f, 0x90, 0, 0}, Data: []byte{10, 0, 0, 1, 0, 80, 0, 0}, Comment: "net/id"},
		{Key: []byte{1, 2, 3, 4}, KeyEnd: []byte{1, 2, 3, 255}},
		{Key: []byte{17, 0, 0, 0, 0, 53, 0, 0}, Jump: "cond-x", Comment: "n/c"},
	}
	ops, err := AddElems(unix.NFPROTO_INET, "t", "s", true, es...)
	if err != nil || len(ops) != 1 {
		t.Fatalf("AddElems: %d ops, %v", len(ops), err)
	}
	m := ops[0].m
	if m.flags&unix.NLM_F_EXCL == 0 {
		t.Error("no NLM_F_EXCL")
	}
	got, err := decodeElems(m.data[4:])
	if err != nil || len(got) != 3 {
		t.Fatalf("decode: %v, %v", got, err)
	}
	for i := range es {
		if !bytes.Equal(got[i].Key, es[i].Key) || !bytes.Equal(got[i].KeyEnd, es[i].KeyEnd) || !bytes.Equal(got[i].Data, es[i].Data) || got[i].Comment != es[i].Comment || got[i].Jump != es[i].Jump {
			t.Errorf("element %d: %+v, want %+v", i, got[i], es[i])
		}
	}

	many := make([]Elem, 5000)
	for i := range many {
		many[i] = Elem{Key: []byte{byte(i >> 8), byte(i), 0, 0}, Data: make([]byte, 20), Comment: "net/" + strings.Repeat("x", 40)}
	}
	ops, err = AddElems(unix.NFPROTO_INET, "t", "s", false, many...)
	if err != nil || len(ops) < 2 {
		t.Fatalf("5,000 elements: %d ops, %v", len(ops), err)
	}
	n := 0
	for _, op := range ops {
		d, err := decodeElems(op.m.data[4:])
		if err != nil {
			t.Fatal(err)
		}
		n += len(d)
	}
	if n != len(many) {
		t.Errorf("split messages hold %d elements, want %d", n, len(many))
	}

	if _, err := AddElems(unix.NFPROTO_INET, "t", "s", true, Elem{Key: []byte{1}, Comment: strings.Repeat("c", MaxComment+1)}); err == nil {
		t.Error("an over-long comment was accepted")
	}
}
