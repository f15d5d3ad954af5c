package store

import (
	"bytes"
	"errors"
	"io"
	"math/rand"
	"path/filepath"
	"testing"
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

// exercise runs random writes, punches, truncates and reads through s and a model.
func exercise(t *testing.T, s Store, seed int64) {
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

func TestFileAgainstModel(t *testing.T) {
	f, err := CreateFile(filepath.Join(t.TempDir(), "img"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	exercise(t, f, 1)
}

func TestMemAgainstModel(t *testing.T) { exercise(t, NewMem(0), 2) }

func TestMemIsSparse(t *testing.T) {
	m := NewMem(100 << 30)
	if _, err := m.WriteAt([]byte{1}, 50<<30); err != nil {
		t.Fatal(err)
	}
	if a := m.Allocated(); a != memChunk {
		t.Fatalf("one byte allocated %d bytes", a)
	}
	m.Punch(50<<30-memChunk, 3*memChunk)
	if m.Allocated() != 0 {
		t.Fatal("punch kept a chunk")
	}
}

func TestErrStoreInjects(t *testing.T) {
	e := NewErrStore(NewMem(1<<20), FailAfter(OpWrite, 2))
	p := make([]byte, 10)
	for i := 0; i < 2; i++ {
		if _, err := e.WriteAt(p, 0); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.WriteAt(p, 0); !errors.Is(err, ErrInjected) {
		t.Fatalf("third write: %v", err)
	}
	if _, err := e.ReadAt(p, 0); err != nil {
		t.Fatalf("reads are not failed by a write injector: %v", err)
	}
	e.SetInjector(FailRange(OpRead, 4096, 4096))
	if _, err := e.ReadAt(p, 4090); !errors.Is(err, ErrInjected) {
		t.Fatalf("read touching the range: %v", err)
	}
	if _, err := e.ReadAt(p, 8192); err != nil {
		t.Fatalf("read past the range: %v", err)
	}
	if _, err := e.ReadAt(p, 4086); err != nil {
		t.Fatalf("read before the range: %v", err)
	}
	e.SetInjector(FailAfter(OpSync, 0))
	if err := e.Sync(); !errors.Is(err, ErrInjected) {
		t.Fatal(err)
	}
	// a failed write leaves the store untouched
	e.SetInjector(FailRange(OpWrite, 0, 1))
	e.WriteAt([]byte{7}, 0)
	e.SetInjector(nil)
	e.ReadAt(p[:1], 0)
	if p[0] != 0 {
		t.Fatal("a failed write reached the store")
	}
	if e.Injected() != 4 {
		t.Fatalf("injected %d", e.Injected())
	}
	r := rand.New(rand.NewSource(1))
	e.SetInjector(FailRandomly(r, 0.5, OpPunch))
	fails := 0
	for i := 0; i < 200; i++ {
		if e.Punch(0, 1) != nil {
			fails++
		}
		if _, err := e.ReadAt(p, 0); err != nil {
			t.Fatal("random injector hit an op it does not cover")
		}
	}
	if fails == 0 || fails == 200 {
		t.Fatalf("%d of 200 punches failed", fails)
	}
}
