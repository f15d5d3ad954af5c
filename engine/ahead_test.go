package engine

import (
	"bytes"
	"math"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/store/storetest"
)

// TestCheckpointAppliesAheadInOrder: before a checkpoint stops appends it writes the committed
// appends in place itself (applyAhead), each claimed first: never one that its part is writing,
// nor any later append of that part after it — the later of two appends of one sector must
// reach the data region last — and never an append no commit covers yet.
func TestCheckpointAppliesAheadInOrder(t *testing.T) {
	const ss = 4096
	d := flushedDisk(t, ss)          // sector 0: w0
	for _, b := range []byte{1, 2} { // sector 1 twice: w1, then w2
		must(t, d.WriteAt(ctx, bytes.Repeat([]byte{b}, ss), ss, false))
		must(t, d.Flush(ctx))
	}
	must(t, d.WriteAt(ctx, bytes.Repeat([]byte{3}, ss), 2*ss, false))
	sh := d.e.shards[0]
	sh.own.Lock() // the part is the test's now
	defer sh.own.Unlock()
	p := d.parts[0]
	must(t, p.flushDirty(time.Time{})) // sector 2 appended, no commit: w3
	if len(p.pending) != 4 {
		t.Fatalf("%d appends pending, want 4 (the test's writes were applied or merged)", len(p.pending))
	}
	w := p.pending
	inPlace := func(lba uint64) []byte {
		b := make([]byte, ss)
		if _, err := d.st.ReadAt(b, d.h.DataPos(lba)); err != nil {
			t.Fatal(err)
		}
		return b
	}
	before := inPlace(2)
	states := func(when string, want ...int32) {
		t.Helper()
		for i, s := range want {
			if got := w[i].state.Load(); got != s {
				t.Fatalf("%s: append %d in state %d, want %d (0 pending, 1 applying, 2 applied)", when, i, got, s)
			}
		}
	}
	states("before", writePending, writePending, writePending, writePending)

	w[1].state.Store(writeApplying) // as if the part were writing it
	d.applyAhead(math.MaxUint64)
	states("with the part writing the second append", writeApplied, writeApplying, writePending, writePending)

	w[1].state.Store(writePending)
	d.applyAhead(math.MaxUint64)
	states("after", writeApplied, writeApplied, writeApplied, writePending)
	if got := inPlace(1); !bytes.Equal(got, w[2].data(0)) {
		t.Fatal("sector 1 in place is not its later append's ciphertext")
	}
	if got := inPlace(2); !bytes.Equal(got, before) {
		t.Fatal("sector 2 was written in place before a commit covered its append")
	}
}

// TestCheckpointWritesInPlaceBeforeStoppingAppends: the appends that a commit covers when a
// checkpoint begins are written in place before it takes d.ckpt exclusively (every append
// stopped), not while it holds it.
func TestCheckpointWritesInPlaceBeforeStoppingAppends(t *testing.T) {
	const ss = 4096
	im := newTestImage(t, 64*ss, ss, 1<<20)
	var watched atomic.Pointer[Disk]
	var stopped atomic.Int64 // data-region writes made while d.ckpt is held exclusively
	es := storetest.NewErrStore(storetest.NewMem(0), storetest.Func("watch", func(op storetest.Op, off, n int64) error {
		d := watched.Load()
		if d == nil || op != storetest.OpWrite || off < d.h.DataPos(0) || off >= d.h.DataPos(0)+int64(d.sectors)*d.ss {
			return nil
		}
		if d.ckpt.TryRLock() { // nothing else runs beside the checkpoint: fails only when it holds d.ckpt
			d.ckpt.RUnlock()
		} else {
			stopped.Add(1)
		}
		return nil
	}))
	im.create(t, es)
	e := New(Options{Shards: 1, Logger: quietLog})
	defer e.Close()
	d := im.attach(t, e, 1, es)
	for lba := int64(0); lba < 16; lba++ {
		must(t, d.WriteAt(ctx, bytes.Repeat([]byte{byte(lba)}, ss), lba*ss, false))
	}
	must(t, d.Flush(ctx))
	if n := len(d.parts[0].pending); n == 0 {
		t.Fatal("the flush applied its appends in place: the test covers none left to the checkpoint")
	}
	watched.Store(d)
	must(t, d.checkpoint())
	if n := stopped.Load(); n != 0 {
		t.Fatalf("the checkpoint wrote %d runs of sectors in place with every append stopped, want 0", n)
	}
	got := make([]byte, ss)
	for lba := int64(0); lba < 16; lba++ {
		must(t, d.ReadAt(ctx, got, lba*ss))
		if !bytes.Equal(got, bytes.Repeat([]byte{byte(lba)}, ss)) {
			t.Fatalf("sector %d read %x… after the checkpoint", lba, got[:4])
		}
	}
}
