package engine

import (
	"bytes"
	"errors"
	"testing"

	"github.com/sealdisk/sealdisk/store/storetest"
)

// A failed fdatasync may drop the writes it could not write while reads still see them
// (storetest.Crash.LoseUnsynced): what the engine wrote before it is on disk only once it is
// written again.

// TestFailedCommitWritesJournalAgain: a flush whose sync failed lost its journal blocks; the
// next flush must write them again, or its record would commit blocks that are not there (and
// recovery would fall back to older data the guest was told was replaced).
func TestFailedCommitWritesJournalAgain(t *testing.T) {
	const ss = 4096
	im := newTestImage(t, 1<<20, ss, 0)
	cs, es := faultyImage(t, im)
	e := New(Options{Shards: 1, Logger: quietLog})
	d := im.attach(t, e, 1, es)
	data := bytes.Repeat([]byte{7}, ss)
	must(t, d.WriteAt(ctx, data, 3*ss, false))
	es.SetInjector(storetest.LosingSyncs(cs, storetest.FailAfter(storetest.OpSync, 0)))
	if err := d.Flush(ctx); !errors.Is(err, storetest.ErrInjected) {
		t.Fatalf("flush with its sync failing: %v", err)
	}
	es.SetInjector(nil)
	must(t, d.Flush(ctx))
	d2 := crashAndAttach(t, im, e, cs, 1)
	got := make([]byte, ss)
	must(t, d2.ReadAt(ctx, got, 3*ss))
	if !bytes.Equal(got, data) {
		t.Fatal("a flushed write was lost after an earlier sync failed")
	}
}

// TestFailedSyncReappliesTheEpoch: a failed sync lost a committed block's in-place write; the
// checkpoint that retires the journal must write the epoch in place again first.
func TestFailedSyncReappliesTheEpoch(t *testing.T) {
	const ss = 4096
	im := newTestImage(t, 1<<20, ss, 0)
	cs, es := faultyImage(t, im)
	e := New(Options{Shards: 1, Logger: quietLog})
	d := im.attach(t, e, 1, es)
	data := bytes.Repeat([]byte{8}, ss)
	must(t, d.WriteAt(ctx, data, 5*ss, true)) // committed
	must(t, d.Flush(ctx))                     // applies it in place, unsynced
	es.SetInjector(storetest.LosingSyncs(cs, storetest.FailAfter(storetest.OpSync, 0)))
	if err := d.syncs.since(d.syncs.mark()); !errors.Is(err, storetest.ErrInjected) {
		t.Fatalf("failing sync: %v", err)
	}
	es.SetInjector(nil)
	must(t, d.checkpoint())
	d2 := crashAndAttach(t, im, e, cs, 1)
	got := make([]byte, ss)
	if err := d2.ReadAt(ctx, got, 5*ss); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("a committed write after a lost in-place write and a checkpoint: %v", err)
	}
}
