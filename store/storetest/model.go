package storetest

import (
	"bytes"
	"errors"
	"io"
	"math/rand"
	"testing"

	"github.com/sealdisk/sealdisk/store"
)

// model is a plain byte slice with a Store's semantics, to check the stores against.
type model []byte

func (m *model) write(p []byte, off int64) {
	if end := off + int64(len(p)); end > int64(len(*m)) {
		*m = append(*m, make([]byte, end-int64(len(*m)))...)
	}
	copy((*m)[off:], p)
}

func (m *model) punch(off, n int64) {
	end := min(off+n, int64(len(*m)))
	if off < end {
		clear((*m)[off:end])
	}
}

func (m *model) truncate(size int64) {
	if size <= int64(len(*m)) {
		*m = (*m)[:size]
	} else {
		*m = append(*m, make([]byte, size-int64(len(*m)))...)
	}
}

// Exercise runs random writes, punches, truncates and reads through s and checks every read
// and size against a model: the conformance test of a Store.
func Exercise(t testing.TB, s store.Store, seed int64) {
	r := rand.New(rand.NewSource(seed))
	var m model
	const span = 600 << 10
	for i := 0; i < 2000; i++ {
		off := r.Int63n(span)
		n := r.Int63n(200<<10) + 1
		switch k := r.Intn(10); {
		case k < 4:
			p := make([]byte, n)
			r.Read(p)
			if _, err := s.WriteAt(p, off); err != nil {
				t.Fatal(err)
			}
			m.write(p, off)
		case k < 6:
			if err := s.Punch(off, n); err != nil {
				t.Fatal(err)
			}
			m.punch(off, n)
		case k == 6:
			if err := s.Truncate(off); err != nil {
				t.Fatal(err)
			}
			m.truncate(off)
		default:
			p := make([]byte, n)
			got, err := s.ReadAt(p, off)
			want := int(max(0, min(n, int64(len(m))-off)))
			if got != want || (got < len(p)) != errors.Is(err, io.EOF) || (err != nil && !errors.Is(err, io.EOF)) {
				t.Fatalf("op %d: read [%d,+%d) = %d, %v; want %d bytes of %d", i, off, n, got, err, want, len(m))
			}
			if want > 0 && !bytes.Equal(p[:got], m[off:off+int64(got)]) {
				t.Fatalf("op %d: read [%d,+%d) differs", i, off, n)
			}
		}
		if size, _ := s.Size(); size != int64(len(m)) {
			t.Fatalf("op %d: size %d, want %d", i, size, len(m))
		}
	}
}
