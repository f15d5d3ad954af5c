package engine

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"os"
	"sync"
	"testing"
	"time"
)

var ctx = context.Background()

// TestRandomOpsAgainstModel drives random unaligned reads, writes, trims, zeroes and flushes
// through the engine and a MemDevice, reattaching midway, and compares every read.
func TestRandomOpsAgainstModel(t *testing.T) {
	for _, tc := range []struct {
		ss     uint32
		placed int64 // Options.PlacedBytes: whole-sector writes of 8 sectors or more sealed from the buffer
	}{{4096, 0}, {512, 0}, {4096, 8 * 4096}, {512, 8 * 512}} {
		ss := tc.ss
		im := newTestImage(t, 8<<20, ss, 0)
		st, path := fileStore(t, im)
		e := New(Options{Shards: 3, CacheBytes: 256 << 10, StripeSectors: 64, PlacedBytes: tc.placed})
		d := im.attach(t, e, 1, st)
		model := NewMemDevice(8<<20, false)
		r := rand.New(rand.NewSource(int64(ss) + tc.placed))
		for i := 0; i < 3000; i++ {
			off := r.Int63n(8 << 20)
			n := min(r.Int63n(300<<10)+1, 8<<20-off)
			if r.Intn(2) == 0 { // whole sectors
				off &^= int64(ss) - 1
				n = max(n&^(int64(ss)-1), int64(ss))
			}
			switch op := r.Intn(10); {
			case op < 4:
				buf := make([]byte, n)
				r.Read(buf)
				must(t, d.WriteAt(ctx, buf, off, op == 0))
				must(t, model.WriteAt(ctx, buf, off, false))
			case op < 7:
				a, b := make([]byte, n), make([]byte, n)
				must(t, d.ReadAt(ctx, a, off))
				must(t, model.ReadAt(ctx, b, off))
				if !bytes.Equal(a, b) {
					t.Fatalf("ss %d placed %d op %d: read [%d,+%d) differs", ss, tc.placed, i, off, n)
				}
			case op == 7:
				must(t, d.Trim(ctx, off, n, false))
				must(t, model.Trim(ctx, off, n, false))
			case op == 8:
				must(t, d.WriteZeroes(ctx, off, n, ZeroFlags{NoHole: r.Intn(2) == 0}))
				must(t, model.WriteZeroes(ctx, off, n, ZeroFlags{}))
			default:
				must(t, d.Flush(ctx))
			}
			if i == 1500 {
				must(t, e.ClearKey(1))
				d = im.attach(t, e, 1, reopen(t, path))
			}
		}
		a, b := make([]byte, 8<<20), make([]byte, 8<<20)
		for off := int64(0); off < 8<<20; off += 4 << 20 {
			must(t, d.ReadAt(ctx, a[off:off+4<<20], off))
		}
		model.ReadAt(ctx, b, 0)
		if !bytes.Equal(a, b) {
			t.Fatal("final contents differ")
		}
		if tc.placed > 0 && e.Stats.Direct.Load() == 0 {
			t.Fatal("no write was sealed from the buffer")
		}
		must(t, e.Close())
	}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestTamperedSectorIsIntegrityError(t *testing.T) {
	im := newTestImage(t, 1<<20, 4096, 0)
	st, path := fileStore(t, im)
	e := New(Options{Shards: 2})
	defer e.Close()
	d := im.attach(t, e, 7, st)
	buf := bytes.Repeat([]byte{0xaa}, 1<<20)
	must(t, d.WriteAt(ctx, buf, 0, false))
	must(t, e.ClearKey(7))
	f, _ := os.OpenFile(path, os.O_RDWR, 0)
	f.WriteAt([]byte{0x55}, im.h.DataPos(10)+7)
	f.Close()
	d = im.attach(t, e, 7, reopen(t, path))
	got := make([]byte, 4096)
	if err := d.ReadAt(ctx, got, 10*4096); !errors.Is(err, ErrIntegrity) {
		t.Fatalf("tampered sector: %v", err)
	}
	if !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("data returned from a tampered sector")
	}
	if err := d.ReadAt(ctx, got, 11*4096); err != nil || got[0] != 0xaa {
		t.Fatalf("neighbour: %v", err)
	}
	// a sub-sector write to the tampered sector cannot read-modify-write it either
	if err := d.WriteAt(ctx, []byte{1}, 10*4096+5, false); !errors.Is(err, ErrIntegrity) {
		t.Fatalf("RMW on tampered sector: %v", err)
	}
	// a whole-sector overwrite repairs it
	must(t, d.WriteAt(ctx, make([]byte, 4096), 10*4096, false))
	must(t, d.ReadAt(ctx, got, 10*4096))
	if e.Stats.AuthFailures.Load() == 0 {
		t.Fatal("auth failure not counted")
	}
}

func TestPermissionAndDetach(t *testing.T) {
	im := newTestImage(t, 1<<20, 4096, 0)
	st, _ := fileStore(t, im)
	e := New(Options{Shards: 2})
	defer e.Close()
	if _, err := e.Attach(3, st, false); !errors.Is(err, ErrPermission) {
		t.Fatalf("attach without key: %v", err)
	}
	other := newTestImage(t, 1<<20, 4096, 0)
	b := other.b
	b.Key = append([]byte(nil), other.key...)
	must(t, e.LoadKey(4, b))
	if _, err := e.Attach(4, st, false); !errors.Is(err, ErrPermission) {
		t.Fatalf("attach with another image's key: %v", err)
	}
	d := im.attach(t, e, 5, st)
	must(t, d.WriteAt(ctx, []byte("hello"), 0, false))
	must(t, e.ClearKey(5))
	if err := d.ReadAt(ctx, make([]byte, 5), 0); !errors.Is(err, ErrDetached) {
		t.Fatalf("read after detach: %v", err)
	}
	for _, p := range d.parts {
		if p.slots.lines != 0 || len(p.slots.chunks) != 0 {
			t.Fatal("cache not zeroised on detach")
		}
	}
}

// TestConcurrentSharedSectors: goroutines own interleaved 100-byte slices, so every sector is
// shared by several writers; read-modify-write must never lose a neighbour's bytes.
func TestConcurrentSharedSectors(t *testing.T) {
	im := newTestImage(t, 2<<20, 4096, 0)
	st, _ := fileStore(t, im)
	e := New(Options{Shards: 2, CacheBytes: 128 << 10, StripeSectors: 64})
	defer e.Close()
	d := im.attach(t, e, 1, st)
	const G, slice = 8, 100
	var wg sync.WaitGroup
	for g := 0; g < G; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			r := rand.New(rand.NewSource(int64(g)))
			for i := 0; i < 300; i++ {
				k := r.Intn((2<<20)/(slice*G)) * G
				off := int64((k + g) * slice)
				buf := bytes.Repeat([]byte{byte(g + 1)}, slice)
				if err := d.WriteAt(ctx, buf, off, false); err != nil {
					t.Error(err)
					return
				}
				if i%50 == 0 {
					if err := d.Flush(ctx); err != nil {
						t.Error(err)
					}
				}
				got := make([]byte, slice)
				if err := d.ReadAt(ctx, got, off); err != nil || !bytes.Equal(got, buf) {
					t.Errorf("goroutine %d lost its write at %d: %v", g, off, err)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	all := make([]byte, 2<<20)
	must(t, d.ReadAt(ctx, all, 0))
	for i, b := range all {
		if b != 0 && int(b-1) != (i/slice)%G {
			t.Fatalf("byte %d = %d belongs to another goroutine", i, b)
		}
	}
}

func TestIdleWriteback(t *testing.T) {
	im := newTestImage(t, 1<<20, 4096, 0)
	st, _ := fileStore(t, im)
	e := New(Options{Shards: 1, IdleFlush: 50 * time.Millisecond})
	defer e.Close()
	d := im.attach(t, e, 1, st)
	must(t, d.WriteAt(ctx, []byte("x"), 0, false))
	deadline := time.Now().Add(5 * time.Second)
	for e.Stats.Writebacks.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if e.Stats.Writebacks.Load() == 0 {
		t.Fatal("dirty sector never written back while idle")
	}
}

func TestBlockStatus(t *testing.T) {
	im := newTestImage(t, 4<<20, 4096, 0)
	st, _ := fileStore(t, im)
	e := New(Options{Shards: 2, StripeSectors: 64})
	defer e.Close()
	d := im.attach(t, e, 1, st)
	must(t, d.WriteAt(ctx, []byte{1}, 1<<20, false))
	must(t, d.WriteAt(ctx, make([]byte, 8192), 2<<20, false))
	ext, err := d.BlockStatus(ctx, 0, 4<<20)
	must(t, err)
	want := []Extent{{1 << 20, true, true}, {4096, false, false}, {1<<20 - 4096, true, true}, {8192, false, false}, {2<<20 - 8192, true, true}}
	if len(ext) != len(want) {
		t.Fatalf("%v", ext)
	}
	for i := range ext {
		if ext[i] != want[i] {
			t.Fatalf("extent %d: %v want %v", i, ext[i], want[i])
		}
	}
	must(t, d.Flush(ctx))
	must(t, d.Trim(ctx, 2<<20, 8192, false))
	ext, _ = d.BlockStatus(ctx, 2<<20, 8192)
	if len(ext) != 1 || !ext[0].Hole {
		t.Fatalf("after trim: %v", ext)
	}
}
