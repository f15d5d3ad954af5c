package engine

import (
	"bytes"
	"errors"
	"os"
	"testing"

	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/store/storetest"
)

// Placed writes (settle.go, FORMAT.md §6.2): long runs written back under the cache's pressure
// go to the data region once, their journal blocks holding only entries.

// placedOpts is one shard whose cache holds 1 MiB of appends before applying them, with a
// dirty bound of 16 sectors: a 64-sector write is written back under pressure, 50 sectors in
// one placed run, and waits in memory, committed or not, until something applies it.
func placedOpts() Options {
	return Options{Shards: 1, StripeSectors: 64, CacheBytes: 4 << 20, DirtyBytes: 16 * 4096, PlacedBytes: 4 * 4096, Logger: quietLog}
}

// TestPlacedWritesGoInPlaceOnce: a placed run's ciphertexts are written once, in place; the
// journal gets a header per 29 sectors, not the data. A write of a run or more of whole
// sectors is sealed from the guest's buffer (writeDirect) and fills no cache line; smaller
// writes are cached and placed by the cache's pressure (writebackBatch).
func TestPlacedWritesGoInPlaceOnce(t *testing.T) {
	const ss = 4096
	for _, tc := range []struct {
		name           string
		each           int    // sectors per write
		placed, direct uint64 // sectors placed, of them direct
		journal        int64  // journal bytes written
	}{
		// 64 sectors in one write: 3 headers.
		{"direct", 64, 64, 64, 3 * 4096},
		// 2 sectors a write: past the dirty bound of 16, write-backs of 4 sectors, a run each;
		// the flush journals the 16 still dirty with their data.
		{"pressure", 2, 48, 0, 12*4096 + 4096 + 16*ss},
	} {
		t.Run(tc.name, func(t *testing.T) {
			im := newTestImage(t, 1<<20, ss, 0)
			st := storetest.NewCrash()
			im.create(t, st)
			var journal, data int64
			st.OnWrite = func(p []byte, off int64) {
				switch {
				case off >= int64(im.h.JournalOffset) && off < int64(im.h.MetaOffset):
					journal += int64(len(p))
				case off >= int64(im.h.DataPos(0)):
					data += int64(len(p))
				}
			}
			e := New(placedOpts())
			d := im.attach(t, e, 1, st)
			journal, data = 0, 0
			want := bytes.Repeat([]byte{7}, 64*ss)
			for off := 0; off < len(want); off += tc.each * ss {
				must(t, d.WriteAt(ctx, want[off:off+tc.each*ss], int64(off), false))
			}
			if tc.direct > 0 && d.parts[0].slots.lines != 0 {
				t.Fatalf("%d lines cached after direct writes, want none", d.parts[0].slots.lines)
			}
			must(t, d.Flush(ctx))
			if n, m := e.Stats.Placed.Load(), e.Stats.Direct.Load(); n != tc.placed || m != tc.direct {
				t.Fatalf("%d sectors placed, %d of them direct; want %d, %d", n, m, tc.placed, tc.direct)
			}
			if journal != tc.journal {
				t.Fatalf("journal writes: %d bytes, want %d (placed sectors' data journalled?)", journal, tc.journal)
			}
			if data != int64(tc.placed)*ss {
				t.Fatalf("data region writes before the checkpoint: %d bytes, want the placed runs' %d", data, int64(tc.placed)*ss)
			}
			got := make([]byte, len(want))
			must(t, d.ReadAt(ctx, got, 0))
			if !bytes.Equal(got, want) {
				t.Fatal("read back differs")
			}
			must(t, e.Close())
		})
	}
}

// TestFlushSettlesPlacedWrites: a flush whose placed appends were committed but not yet in
// place writes them there and syncs before it returns; a crash right after keeps them.
func TestFlushSettlesPlacedWrites(t *testing.T) {
	const ss = 4096
	im := newTestImage(t, 1<<20, ss, 0)
	st := storetest.NewCrash()
	im.create(t, st)
	e := New(placedOpts())
	d := im.attach(t, e, 1, st)
	want := bytes.Repeat([]byte{5}, 64*ss)
	must(t, d.WriteAt(ctx, want, 0, false))
	must(t, d.commit(false)) // the placed append is committed, and waits in memory
	if e.Stats.Placed.Load() == 0 {
		t.Fatal("nothing written back placed")
	}
	must(t, d.Flush(ctx))
	d2 := crashAndAttach(t, im, e, st, 2) // nothing unsynced survives
	got := make([]byte, len(want))
	must(t, d2.ReadAt(ctx, got, 0))
	if !bytes.Equal(got, want) {
		t.Fatal("a flushed placed write was lost in a crash")
	}
}

// TestOlderCiphertextUnderSettledPlacedBlock: after a flush settled a placed run, its sectors'
// older ciphertexts put back in the data region are an integrity error at the next attach,
// not the older data (recovery may fall back to a placed block's old entries only past the
// record's settled blocks).
func TestOlderCiphertextUnderSettledPlacedBlock(t *testing.T) {
	const ss = 4096
	im := newTestImage(t, 1<<20, ss, 0)
	st, path := fileStore(t, im)
	e := New(placedOpts())
	d := im.attach(t, e, 1, st)
	must(t, d.WriteAt(ctx, bytes.Repeat([]byte{1}, 64*ss), 0, false))
	must(t, d.Flush(ctx))
	must(t, d.checkpoint())
	older, err := os.ReadFile(path)
	must(t, err)
	must(t, d.WriteAt(ctx, bytes.Repeat([]byte{2}, 64*ss), 0, false))
	must(t, d.Flush(ctx))
	if e.Stats.Placed.Load() < 100 {
		t.Fatalf("%d sectors written back placed, want both runs", e.Stats.Placed.Load())
	}
	abandon(e) // the journal still holds the placed blocks
	must(t, st.Close())
	patch(t, path, older, im.h.DataPos(0), 64*ss)

	e2 := New(Options{Shards: 1, StripeSectors: 64, Logger: quietLog})
	defer e2.Close()
	d2 := im.attach(t, e2, psp.ASID(2), reopen(t, path))
	bad := 0
	for lba := int64(0); lba < 64; lba++ {
		got := make([]byte, ss)
		err := d2.ReadAt(ctx, got, lba*ss)
		switch {
		case errors.Is(err, ErrIntegrity):
			bad++
		case err != nil:
			t.Fatalf("sector %d: %v", lba, err)
		case bytes.Equal(got, bytes.Repeat([]byte{1}, ss)):
			t.Fatalf("sector %d reads the older data put back, without an error", lba)
		}
	}
	if bad < 50 {
		t.Fatalf("%d of the placed sectors fail their reads, want all 50", bad)
	}
}
