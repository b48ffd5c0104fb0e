package nft

import (
	"bytes"
	"testing"

	"golang.org/x/sys/unix"
)

// FuzzDecodeElems: any bytes as a set element message of a dump (the kernel's answer that
// Elem and Elems read). The decoder never panics; every element it returns has a key, and
// written back with AddElems (comments within the kernel's limit) it decodes to the same.
func FuzzDecodeElems(f *testing.F) {
	for _, es := range [][]Elem{
		{{Key: []byte{6, 0, 0, 0, 0x1f, 0x90, 0, 0}, Data: []byte{10, 0, 0, 1, 0, 80, 0, 0}, Comment: "net/id"}},
		{{Key: []byte{1, 2, 3, 4, 1, 2, 3, 4}, KeyEnd: []byte{1, 2, 3, 255, 1, 2, 3, 255}, Comment: "hairpin"}},
		{{Key: []byte{17, 0, 0, 0, 0, 53, 0, 0}, Jump: "cond-x", Comment: "n/c"}, {Key: []byte{6, 0, 0, 0}}},
	} {
		ops, err := AddElems(unix.NFPROTO_INET, "portguard", "any4", true, es...)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(ops[0].m.data[4:])
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		es, err := decodeElems(b)
		if err != nil {
			return
		}
		var back []Elem
		for _, e := range es {
			if e.Key == nil {
				t.Fatalf("element without a key: %+v", e)
			}
			if len(e.Comment) <= MaxComment {
				back = append(back, e)
			}
		}
		if len(back) == 0 {
			return
		}
		ops, err := AddElems(unix.NFPROTO_INET, "portguard", "any4", false, back...)
		if err != nil {
			t.Fatalf("decoded elements cannot be written back: %v", err)
		}
		var again []Elem
		for _, op := range ops {
			d, err := decodeElems(op.m.data[4:])
			if err != nil {
				t.Fatalf("written back, %+v does not decode: %v", back, err)
			}
			again = append(again, d...)
		}
		if len(again) != len(back) {
			t.Fatalf("%d elements written back decode to %d", len(back), len(again))
		}
		for i := range back {
			x, y := back[i], again[i]
			if !bytes.Equal(x.Key, y.Key) || !bytes.Equal(x.KeyEnd, y.KeyEnd) || !bytes.Equal(x.Data, y.Data) || x.Jump != y.Jump || x.Comment != y.Comment {
				t.Fatalf("element %d: %+v written back reads %+v", i, x, y)
			}
		}
	})
}
