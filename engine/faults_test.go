package engine

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"math/rand"
	"sync"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/store/storetest"
)

var quietLog = slog.New(slog.NewTextHandler(io.Discard, nil))

// TestStoreErrorsSurface: every kind of backing-store failure on the data path comes back to
// the caller as an error (never a hang, a panic or wrong data), and once the store recovers
// nothing acknowledged was lost: dirty sectors stay dirty until a write-back succeeds.
func TestStoreErrorsSurface(t *testing.T) {
	const ss = 4096
	type step func(t *testing.T, d *Disk, es *storetest.ErrStore, im *testImage)
	fill := bytes.Repeat([]byte{0x5a}, 8*ss)
	// stillReadable: after an in-place write failed, the disk takes more writes, reads every
	// sector from its pending append, and flushes once the store works again.
	stillReadable := func(t *testing.T, d *Disk, es *storetest.ErrStore) {
		must(t, d.WriteAt(ctx, fill[2*ss:], 2*ss, false))
		got := make([]byte, len(fill))
		if err := d.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, fill) {
			t.Fatalf("read of sectors whose in-place write failed: %v", err)
		}
		es.SetInjector(nil)
		must(t, d.Flush(ctx))
	}
	cases := []struct {
		name string
		run  step
	}{
		{"read of data fails", func(t *testing.T, d *Disk, es *storetest.ErrStore, im *testImage) {
			must(t, d.WriteAt(ctx, fill, 0, true))
			d.e.ClearKey(1) // drop the cache so the read goes to the store
			d = im.attach(t, d.e, 1, es)
			es.SetInjector(storetest.FailRange(storetest.OpRead, im.h.DataPos(3), ss))
			if err := d.ReadAt(ctx, make([]byte, ss), 3*ss); !errors.Is(err, storetest.ErrInjected) {
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
		{"read of metadata fails", func(t *testing.T, d *Disk, es *storetest.ErrStore, im *testImage) {
			es.SetInjector(storetest.FailRange(storetest.OpRead, im.h.EntryPos(0), 64))
			if err := d.ReadAt(ctx, make([]byte, 10), 5); !errors.Is(err, storetest.ErrInjected) {
				t.Fatalf("read: %v", err)
			}
			if err := d.WriteAt(ctx, []byte{1}, 5, false); !errors.Is(err, storetest.ErrInjected) {
				t.Fatalf("read-modify-write: %v", err)
			}
			es.SetInjector(nil)
		}},
		{"journal sync fails on flush", func(t *testing.T, d *Disk, es *storetest.ErrStore, im *testImage) {
			must(t, d.WriteAt(ctx, fill, 0, false))
			es.SetInjector(storetest.FailAfter(storetest.OpSync, 0))
			if err := d.Flush(ctx); !errors.Is(err, storetest.ErrInjected) {
				t.Fatalf("flush: %v", err)
			}
			if err := d.WriteAt(ctx, fill[:ss], 0, true); !errors.Is(err, storetest.ErrInjected) {
				t.Fatalf("FUA write: %v", err)
			}
			es.SetInjector(nil)
			must(t, d.Flush(ctx))
		}},
		{"journal write fails on flush", func(t *testing.T, d *Disk, es *storetest.ErrStore, im *testImage) {
			must(t, d.WriteAt(ctx, fill, 0, false))
			es.SetInjector(storetest.FailRange(storetest.OpWrite, im.h.JournalPos(0), int64(im.h.JournalSize)))
			if err := d.Flush(ctx); !errors.Is(err, storetest.ErrInjected) {
				t.Fatalf("flush: %v", err)
			}
			es.SetInjector(nil)
			must(t, d.Flush(ctx))
		}},
		{"root record write fails on flush", func(t *testing.T, d *Disk, es *storetest.ErrStore, im *testImage) {
			must(t, d.WriteAt(ctx, fill, 0, false))
			es.SetInjector(storetest.FailRange(storetest.OpWrite, im.h.RootSlotPos(0), 2*4096))
			if err := d.Flush(ctx); !errors.Is(err, storetest.ErrInjected) {
				t.Fatalf("flush: %v", err)
			}
			es.SetInjector(nil)
			must(t, d.Flush(ctx))
		}},
		{"in-place write fails at a checkpoint", func(t *testing.T, d *Disk, es *storetest.ErrStore, im *testImage) {
			// two sectors: the append stays below what makes a write-back apply it
			must(t, d.WriteAt(ctx, fill[:2*ss], 0, true))
			es.SetInjector(storetest.FailRange(storetest.OpWrite, im.h.DataPos(0), 8*ss))
			must(t, d.Flush(ctx)) // commits, applies nothing
			if err := d.checkpoint(); !errors.Is(err, storetest.ErrInjected) {
				t.Fatalf("checkpoint: %v", err)
			}
			stillReadable(t, d, es)
		}},
		{"in-place write fails past the appends' bound", func(t *testing.T, d *Disk, es *storetest.ErrStore, im *testImage) {
			// six sectors in one part, committed, then two more: the appends hold more than the
			// part's bound (a quarter of its lines), so the second write-back applies the first
			must(t, d.WriteAt(ctx, fill[:6*ss], 0, true))
			es.SetInjector(storetest.FailRange(storetest.OpWrite, im.h.DataPos(0), 8*ss))
			must(t, d.WriteAt(ctx, fill[6*ss:], 6*ss, false))
			if err := d.Flush(ctx); !errors.Is(err, storetest.ErrInjected) {
				t.Fatalf("flush: %v", err)
			}
			stillReadable(t, d, es)
		}},
		{"metadata write fails at a checkpoint", func(t *testing.T, d *Disk, es *storetest.ErrStore, im *testImage) {
			must(t, d.WriteAt(ctx, fill, 0, true))
			es.SetInjector(storetest.FailRange(storetest.OpWrite, im.h.EntryPos(0), 4096))
			if err := d.checkpoint(); !errors.Is(err, storetest.ErrInjected) {
				t.Fatalf("checkpoint: %v", err)
			}
			es.SetInjector(nil)
			must(t, d.checkpoint())
		}},
		{"eviction write-back fails", func(t *testing.T, d *Disk, es *storetest.ErrStore, im *testImage) {
			es.SetInjector(storetest.FailAfter(storetest.OpSync, 0))
			// far more than the cache holds: evictions must write back, and fail
			big := bytes.Repeat([]byte{0x77}, 512<<10)
			var err error
			for off := int64(0); off < 2<<20 && err == nil; off += int64(len(big)) {
				err = d.WriteAt(ctx, big, off, false)
			}
			if !errors.Is(err, storetest.ErrInjected) {
				t.Fatalf("writes beyond the cache with failing write-back: %v", err)
			}
			es.SetInjector(nil)
			must(t, d.WriteAt(ctx, fill, 0, false))
			must(t, d.Flush(ctx))
		}},
		{"punch fails on trim", func(t *testing.T, d *Disk, es *storetest.ErrStore, im *testImage) {
			must(t, d.WriteAt(ctx, fill, 0, true))
			es.SetInjector(storetest.FailAfter(storetest.OpPunch, 0))
			must(t, d.Trim(ctx, 0, 8*ss, true)) // journaled and committed; punched once applied
			if err := d.checkpoint(); !errors.Is(err, storetest.ErrInjected) {
				t.Fatalf("checkpoint applying the trim: %v", err)
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
			es := storetest.NewErrStore(storetest.NewMem(0), nil)
			im.create(t, es)
			e := New(Options{Shards: 2, CacheBytes: 256 << 10, DirtyBytes: 256 << 10, StripeSectors: 64, Logger: quietLog})
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
// leaves its range undefined. A crash right after the faulty phase leaves every sector
// readable (no integrity error anywhere). With faults off, a flush succeeds and a fresh attach
// reads the model on every defined byte, with no integrity error anywhere.
func TestRandomStoreFaults(t *testing.T) {
	const size, ss = 2 << 20, 4096
	rounds := 30
	if testing.Short() {
		rounds = 10
	}
	r := rand.New(rand.NewSource(7))
	for round := 0; round < rounds; round++ {
		im := newTestImage(t, size, ss, 0)
		cs := storetest.NewCrash()
		cs.Units = units(im.h)
		es := storetest.NewErrStore(cs, nil)
		im.create(t, es)
		// Every other round writes runs of two sectors or more back in place (placed blocks).
		placed := []int64{-1, 2 * ss}[round%2]
		e := New(Options{Shards: 2, CacheBytes: 64 << 10, StripeSectors: 64, Logger: quietLog, PlacedBytes: placed})
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
		// A failed sync also loses what it would have synced, as Linux may
		// (TestFailedSyncWritesJournaledSectorsAgain).
		es.SetInjector(storetest.LosingSyncs(cs, storetest.FailRandomly(rand.New(rand.NewSource(int64(round))), 0.05)))
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
							t.Fatalf("round %d op %d under %s: read [%d,+%d) byte %d differs", round, i, es, off, n, j)
						}
					}
				}
			case k == 7:
				if err = d.Trim(ctx, off, n, false); err == nil {
					clear(model[off : off+n])
				} else {
					undefine(off, n)
				}
			default:
				err = d.Flush(ctx)
			}
			if err != nil {
				failed++
				if !errors.Is(err, storetest.ErrInjected) {
					t.Fatalf("round %d op %d under %s: error not from the store: %v", round, i, es, err)
				}
			}
		}
		if placed > 0 && e.Stats.Placed.Load() == 0 {
			t.Fatalf("round %d: nothing written back placed", round)
		}
		crashed := cs.Crash(r, r.Float64())
		ec := New(Options{Shards: 2, StripeSectors: 64, Logger: quietLog})
		got := make([]byte, size)
		if err := im.attach(t, ec, 1, crashed).ReadAt(ctx, got, 0); err != nil {
			t.Fatalf("round %d: crash after faults (%d failed ops, %s): %v", round, failed, es, err)
		}
		abandon(ec) // a crashed copy is read, never flushed: the counter stays the image's
		es.SetInjector(nil)
		must(t, d.Flush(ctx))
		// the flush made everything durable: a crash that keeps nothing unsynced loses nothing
		durable := cs.Crash(r, 0)
		must(t, e.Close())
		e = New(Options{Shards: 2, StripeSectors: 64, Logger: quietLog})
		d = im.attach(t, e, 1, durable)
		if err := d.ReadAt(ctx, got, 0); err != nil {
			t.Fatalf("round %d: after faults (%d failed ops, %s): %v", round, failed, es, err)
		}
		for j := range got {
			if defined[j] && got[j] != model[j] {
				t.Fatalf("round %d: byte %d differs after faults (%d failed ops, %s)", round, j, failed, es)
			}
		}
		must(t, e.Close())
	}
}

// TestConcurrentFailedSyncs: writers on both shards, FUA writes, flushes and idle write-backs
// race while 5 % of syncs fail and lose what they would have synced. A crash at the end must
// leave every sector readable; after a flush with faults off, a crash that keeps nothing
// unsynced must hold each sector's last acknowledged write. Each writer owns its sectors, so
// that last write is well defined.
func TestConcurrentFailedSyncs(t *testing.T) {
	const ss, writers, perWriter = 4096, 4, 24
	im := newTestImage(t, 2<<20, ss, 0)
	cs, es := faultyImage(t, im)
	e := New(Options{Shards: 2, StripeSectors: 64, CacheBytes: 64 << 10, IdleFlush: 5 * time.Millisecond, Logger: quietLog, journalBytes: 16 * 8 << 10})
	defer e.Close()
	d := im.attach(t, e, 1, es)
	es.SetInjector(storetest.LosingSyncs(cs, storetest.FailRandomly(rand.New(rand.NewSource(3)), 0.05, storetest.OpSync)))
	last := make([][]byte, writers*perWriter) // nil: no acknowledged write, or a failed one since
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewSource(int64(w)))
			for range 150 {
				// writer w's sectors are w, w+writers, …: spread over both shards' stripes
				lba := int64(w + writers*r.Intn(perWriter))
				if r.Intn(8) == 0 {
					if err := d.Flush(ctx); err != nil && !errors.Is(err, storetest.ErrInjected) {
						t.Errorf("flush: %v", err)
					}
					continue
				}
				buf := make([]byte, ss)
				r.Read(buf)
				err := d.WriteAt(ctx, buf, lba*ss, r.Intn(4) == 0)
				switch {
				case err == nil:
					last[lba] = buf
				case errors.Is(err, storetest.ErrInjected):
					last[lba] = nil
				default:
					t.Errorf("write of sector %d: %v", lba, err)
				}
			}
		}()
	}
	wg.Wait()
	got := make([]byte, ss)
	for seed := int64(0); seed < 5; seed++ {
		ec := New(Options{Shards: 2, StripeSectors: 64, Logger: quietLog})
		dc := im.attach(t, ec, 1, cs.Crash(rand.New(rand.NewSource(seed)), float64(seed)/4))
		for lba := range last {
			if err := dc.ReadAt(ctx, got, int64(lba)*ss); err != nil {
				t.Fatalf("crash %d after the faults (%s): sector %d: %v", seed, es, lba, err)
			}
		}
		abandon(ec) // a crashed copy is read, never flushed: the counter stays the image's
	}
	es.SetInjector(nil)
	must(t, d.Flush(ctx))
	ec := New(Options{Shards: 2, StripeSectors: 64, Logger: quietLog})
	defer ec.Close()
	dc := im.attach(t, ec, 1, cs.Crash(rand.New(rand.NewSource(1)), 0))
	for lba, want := range last {
		must(t, dc.ReadAt(ctx, got, int64(lba)*ss))
		if want != nil && !bytes.Equal(got, want) {
			t.Fatalf("sector %d after a flush and a crash (%s): not its last acknowledged write", lba, es)
		}
	}
}

// TestSyncSinceDistrustsEarlierFailures: a sync that succeeds does not vouch for writes made
// before another sync failed, since that one may have dropped them (Disk.syncMu).
func TestSyncSinceDistrustsEarlierFailures(t *testing.T) {
	im := newTestImage(t, 1<<20, 4096, 0)
	_, es := faultyImage(t, im)
	e := New(Options{Shards: 1, Logger: quietLog})
	defer e.Close()
	d := im.attach(t, e, 1, es)
	fails := d.syncs.mark()
	es.SetInjector(storetest.FailAfter(storetest.OpSync, 0))
	if err := d.syncs.since(d.syncs.mark()); !errors.Is(err, storetest.ErrInjected) {
		t.Fatalf("failing sync: %v", err)
	}
	es.SetInjector(nil)
	if err := d.syncs.since(fails); !errors.Is(err, storetest.ErrInjected) {
		t.Fatalf("sync after another failed: %v, want the other's error", err)
	}
	must(t, d.syncs.since(d.syncs.mark()))
}

// faultyImage creates im on a crashable store (storetest.Crash, crashing in the units of
// FORMAT.md §6) behind an error-injecting one (storetest.ErrStore), and syncs it.
func faultyImage(t testing.TB, im *testImage) (*storetest.Crash, *storetest.ErrStore) {
	cs := storetest.NewCrash()
	cs.Units = units(im.h)
	es := storetest.NewErrStore(cs, nil)
	im.create(t, es)
	must(t, cs.Sync())
	return cs, es
}
