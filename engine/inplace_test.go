package engine

import (
	"bytes"
	"math/rand"
	"sync"
	"testing"

	"github.com/sealdisk/sealdisk/store/storetest"
)

// TestInPlaceWritesAreChunked: no pwrite into the data region is longer than inPlaceChunk,
// on every path that writes there — a part applying journalled and placed appends, recovery
// writing what the journal kept, a checkpoint at close — so that the page cache never holds
// the data region in folios larger than that (inplace.go).
func TestInPlaceWritesAreChunked(t *testing.T) {
	const ss = 4096
	for _, placed := range []int64{0, 4 * ss} {
		im := newTestImage(t, 4<<20, ss, 0)
		st := storetest.NewCrash()
		im.create(t, st)
		var mu sync.Mutex
		var total, longest int64
		record := func(p []byte, off int64) {
			if off >= int64(im.h.DataPos(0)) {
				mu.Lock()
				total += int64(len(p))
				longest = max(longest, int64(len(p)))
				mu.Unlock()
			}
		}
		check := func(what string, least int64) {
			t.Helper()
			mu.Lock()
			defer mu.Unlock()
			if total < least {
				t.Fatalf("placed %d, %s: %d bytes written in place, want at least %d", placed, what, total, least)
			}
			if longest > inPlaceChunk {
				t.Fatalf("placed %d, %s: a pwrite of %d bytes into the data region, want at most %d", placed, what, longest, inPlaceChunk)
			}
			total, longest = 0, 0
		}
		opts := placedOpts()
		opts.PlacedBytes = placed
		want := bytes.Repeat([]byte{9}, 1<<20)
		got := make([]byte, len(want))

		// Applied by the part (placed appends at the flush's settle; the rest at Close's
		// checkpoint).
		st.OnWrite = record
		e := New(opts)
		d := im.attach(t, e, 1, st)
		must(t, d.WriteAt(ctx, want, 0, false))
		must(t, d.Flush(ctx))
		must(t, d.WriteAt(ctx, want, 1<<20, false))
		must(t, d.Flush(ctx))
		if placed > 0 && e.Stats.Placed.Load() == 0 {
			t.Fatal("nothing written back placed")
		}
		must(t, e.Close())
		check("applied and checkpointed", 2<<20)

		// Written by recovery: flushed appends left in the journal by a crash.
		e = New(opts)
		d = im.attach(t, e, 1, st)
		must(t, d.WriteAt(ctx, want, 2<<20, false))
		must(t, d.Flush(ctx))
		crashed := st.Crash(rand.New(rand.NewSource(1)), 0)
		abandon(e)
		mu.Lock()
		total, longest = 0, 0
		mu.Unlock()
		crashed.OnWrite = record
		e2 := New(Options{Shards: 1, Logger: quietLog})
		d2 := im.attach(t, e2, 1, crashed)
		must(t, d2.ReadAt(ctx, got, 2<<20))
		if !bytes.Equal(got, want) {
			t.Fatal("flushed data lost in the crash")
		}
		must(t, e2.Close())
		// Placed sectors were in place before the flush returned: recovery writes the rest,
		// none when every sector was placed (writes of whole runs are, writeDirect).
		if placed == 0 {
			check("recovered", 1<<20)
		} else {
			check("recovered", 0)
		}
	}
}
