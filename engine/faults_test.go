package engine

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"math/rand"
	"testing"

	"github.com/sealdisk/sealdisk/store"
)

var quietLog = slog.New(slog.NewTextHandler(io.Discard, nil))

// TestStoreErrorsSurface: every kind of backing-store failure on the data path comes back to
// the caller as an error (never a hang, a panic or wrong data), and once the store recovers
// nothing acknowledged was lost: dirty sectors stay dirty until a write-back succeeds.
func TestStoreErrorsSurface(t *testing.T) {
	const ss = 4096
	type step func(t *testing.T, d *Disk, es *store.ErrStore, im *testImage)
	fill := bytes.Repeat([]byte{0x5a}, 8*ss)
	cases := []struct {
		name string
		run  step
	}{
		{"read of data fails", func(t *testing.T, d *Disk, es *store.ErrStore, im *testImage) {
			must(t, d.WriteAt(ctx, fill, 0, true))
			d.e.ClearKey(1) // drop the cache so the read goes to the store
			d = im.attach(t, d.e, 1, es)
			es.SetInjector(store.FailRange(store.OpRead, im.h.DataPos(3), ss))
			if err := d.ReadAt(ctx, make([]byte, ss), 3*ss); !errors.Is(err, store.ErrInjected) {
				t.Fatalf("read: %v", err)
			}
			got := make([]byte, ss)
			if err := d.ReadAt(ctx, got, 5*ss); err != nil || !bytes.Equal(got, fill[:ss]) {
				t.Fatalf("unaffected sector: %v", err)
			}
			es.SetInjector(nil)
			if err := d.ReadAt(ctx, got, 3*ss); err != nil || !bytes.Equal(got, fill[:ss]) {
				t.Fatalf("after recovery: %v", err)
			}
		}},
		{"read of metadata fails", func(t *testing.T, d *Disk, es *store.ErrStore, im *testImage) {
			es.SetInjector(store.FailRange(store.OpRead, im.h.EntryPos(0), 64))
			if err := d.ReadAt(ctx, make([]byte, 10), 5); !errors.Is(err, store.ErrInjected) {
				t.Fatalf("read: %v", err)
			}
			if err := d.WriteAt(ctx, []byte{1}, 5, false); !errors.Is(err, store.ErrInjected) {
				t.Fatalf("read-modify-write: %v", err)
			}
			es.SetInjector(nil)
		}},
		{"journal sync fails on flush", func(t *testing.T, d *Disk, es *store.ErrStore, im *testImage) {
			must(t, d.WriteAt(ctx, fill, 0, false))
			es.SetInjector(store.FailAfter(store.OpSync, 0))
			if err := d.Flush(ctx); !errors.Is(err, store.ErrInjected) {
				t.Fatalf("flush: %v", err)
			}
			if err := d.WriteAt(ctx, fill[:ss], 0, true); !errors.Is(err, store.ErrInjected) {
				t.Fatalf("FUA write: %v", err)
			}
			es.SetInjector(nil)
			must(t, d.Flush(ctx))
		}},
		{"data write fails on flush", func(t *testing.T, d *Disk, es *store.ErrStore, im *testImage) {
			must(t, d.WriteAt(ctx, fill, 0, false))
			es.SetInjector(store.FailRange(store.OpWrite, im.h.DataPos(0), 8*ss))
			if err := d.Flush(ctx); !errors.Is(err, store.ErrInjected) {
				t.Fatalf("flush: %v", err)
			}
			es.SetInjector(nil)
			must(t, d.Flush(ctx))
		}},
		{"metadata write fails on flush", func(t *testing.T, d *Disk, es *store.ErrStore, im *testImage) {
			must(t, d.WriteAt(ctx, fill, 0, false))
			es.SetInjector(store.FailRange(store.OpWrite, im.h.EntryPos(0), 4096))
			if err := d.Flush(ctx); !errors.Is(err, store.ErrInjected) {
				t.Fatalf("flush: %v", err)
			}
			es.SetInjector(nil)
			must(t, d.Flush(ctx))
		}},
		{"eviction write-back fails", func(t *testing.T, d *Disk, es *store.ErrStore, im *testImage) {
			es.SetInjector(store.FailAfter(store.OpSync, 0))
			// far more than the cache holds: evictions must write back, and fail
			big := bytes.Repeat([]byte{0x77}, 512<<10)
			var err error
			for off := int64(0); off < 2<<20 && err == nil; off += int64(len(big)) {
				err = d.WriteAt(ctx, big, off, false)
			}
			if !errors.Is(err, store.ErrInjected) {
				t.Fatalf("writes beyond the cache with failing write-back: %v", err)
			}
			es.SetInjector(nil)
			must(t, d.WriteAt(ctx, fill, 0, false))
			must(t, d.Flush(ctx))
		}},
		{"punch fails on trim", func(t *testing.T, d *Disk, es *store.ErrStore, im *testImage) {
			must(t, d.WriteAt(ctx, fill, 0, true))
			es.SetInjector(store.FailAfter(store.OpPunch, 0))
			if err := d.Trim(ctx, 0, 8*ss); !errors.Is(err, store.ErrInjected) {
				t.Fatalf("trim: %v", err)
			}
			es.SetInjector(nil)
			// the trim failed: its range is undefined, but readable, and rewritable
			if err := d.ReadAt(ctx, make([]byte, 8*ss), 0); err != nil {
				t.Fatal(err)
			}
			must(t, d.WriteAt(ctx, fill, 0, false))
			must(t, d.Flush(ctx))
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			im := newTestImage(t, 4<<20, ss, 0)
			es := store.NewErrStore(store.NewMem(0), nil)
			im.create(t, es)
			e := New(Options{Shards: 2, CacheBytes: 256 << 10, StripeSectors: 64, Logger: quietLog})
			defer e.Close()
			d := im.attach(t, e, 1, es)
			c.run(t, d, es, im)
			// whatever happened, the store now works: the disk flushes and a fresh attach
			// reads every sector without an integrity error
			d = e.disks[1]
			if d != nil {
				must(t, d.Flush(ctx))
				must(t, e.ClearKey(1))
			}
			d = im.attach(t, e, 1, es)
			buf := make([]byte, 4<<20)
			if err := d.ReadAt(ctx, buf, 0); err != nil {
				t.Fatalf("after the faults: %v", err)
			}
			if c.name != "punch fails on trim" && c.name != "read of metadata fails" && c.name != "eviction write-back fails" {
				if !bytes.Equal(buf[:len(fill)], fill) {
					t.Fatal("acknowledged data lost across the faults")
				}
			}
		})
	}
}

// TestRandomStoreFaults: random failures of every store operation under random operations.
// Every call returns (no hang); a call that succeeded is reflected in the model, a failed one
// leaves its range undefined. With faults off, a flush succeeds and a fresh attach reads the
// model on every defined byte, with no integrity error anywhere.
func TestRandomStoreFaults(t *testing.T) {
	const size, ss = 2 << 20, 4096
	rounds := 30
	if testing.Short() {
		rounds = 10
	}
	r := rand.New(rand.NewSource(7))
	for round := 0; round < rounds; round++ {
		im := newTestImage(t, size, ss, 0)
		es := store.NewErrStore(store.NewMem(0), nil)
		im.create(t, es)
		e := New(Options{Shards: 2, CacheBytes: 64 << 10, StripeSectors: 64, Logger: quietLog})
		d := im.attach(t, e, 1, es)
		model := make([]byte, size)
		defined := make([]bool, size)
		for i := range defined {
			defined[i] = true
		}
		undefine := func(off, n int64) {
			for i := off; i < off+n; i++ {
				defined[i] = false
			}
		}
		es.SetInjector(store.FailRandomly(rand.New(rand.NewSource(int64(round))), 0.05))
		failed := 0
		for i := 0; i < 200; i++ {
			off := r.Int63n(size)
			n := min(1+r.Int63n(64<<10), size-off)
			var err error
			switch k := r.Intn(10); {
			case k < 5:
				buf := make([]byte, n)
				r.Read(buf)
				if err = d.WriteAt(ctx, buf, off, k == 0); err == nil {
					copy(model[off:], buf)
					for j := off; j < off+n; j++ {
						defined[j] = true
					}
				} else {
					undefine(off, n)
				}
			case k < 7:
				got := make([]byte, n)
				if err = d.ReadAt(ctx, got, off); err == nil {
					for j := int64(0); j < n; j++ {
						if defined[off+j] && got[j] != model[off+j] {
							t.Fatalf("round %d op %d: read [%d,+%d) byte %d differs", round, i, off, n, j)
						}
					}
				}
			case k == 7:
				if err = d.Trim(ctx, off, n); err == nil {
					clear(model[off : off+n])
				} else {
					undefine(off, n)
				}
			default:
				err = d.Flush(ctx)
			}
			if err != nil {
				failed++
				if !errors.Is(err, store.ErrInjected) {
					t.Fatalf("round %d op %d: error not from the store: %v", round, i, err)
				}
			}
		}
		es.SetInjector(nil)
		must(t, d.Flush(ctx))
		must(t, e.Close())
		e = New(Options{Shards: 2, StripeSectors: 64, Logger: quietLog})
		d = im.attach(t, e, 1, es)
		got := make([]byte, size)
		if err := d.ReadAt(ctx, got, 0); err != nil {
			t.Fatalf("round %d: after faults (%d failed ops): %v", round, failed, err)
		}
		for j := range got {
			if defined[j] && got[j] != model[j] {
				t.Fatalf("round %d: byte %d differs after faults (%d failed ops)", round, j, failed)
			}
		}
		must(t, e.Close())
	}
}
