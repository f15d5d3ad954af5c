package tests

import (
	"bytes"
	"errors"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// dataExtents lists a file's data ranges with SEEK_DATA/SEEK_HOLE.
func dataExtents(t testing.TB, f *os.File, size int64) [][2]int64 {
	var out [][2]int64
	fd := int(f.Fd())
	for off := int64(0); off < size; {
		d, err := seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		h, err := seek(fd, d, unix.SEEK_HOLE)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, [2]int64{d, h})
		off = h
	}
	return out
}

// cmpSparse compares two files byte for byte over n bytes like cmp, but reads only the
// union of their data extents: everything else is a hole in both and reads as zeros. `cmp` of
// two 20 GiB sparse files takes about 50 s here (it reads every zero page), this well under 1 s.
func cmpSparse(t testing.TB, a, b string, n int64) {
	t.Helper()
	fa, fb := mustOpen(t, a), mustOpen(t, b)
	ranges := append(dataExtents(t, fa, n), dataExtents(t, fb, n)...)
	if len(ranges) == 0 && n > 0 {
		t.Fatalf("neither %s nor %s has a data extent: nothing would be compared", a, b)
	}
	ba, bb := make([]byte, 1<<20), make([]byte, 1<<20)
	for _, r := range ranges {
		for off := r[0]; off < min(r[1], n); {
			k := min(int64(len(ba)), min(r[1], n)-off)
			if _, err := fa.ReadAt(ba[:k], off); err != nil {
				t.Fatalf("read %s at %d: %v", a, off, err)
			}
			if _, err := fb.ReadAt(bb[:k], off); err != nil {
				t.Fatalf("read %s at %d: %v", b, off, err)
			}
			if !bytes.Equal(ba[:k], bb[:k]) {
				t.Fatalf("%s and %s differ in [%d, %d)", a, b, off, off+k)
			}
			off += k
		}
	}
}
