package engine

import (
	"bytes"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/store/storetest"
)

// gateRoots is the image's root keeper with the PSP's counter write held at a gate: the first
// Advance signals entered and waits for release, then fails with fail (if set). Every call's
// counter is recorded in order of arrival.
type gateRoots struct {
	psp.RootKeeper
	entered chan struct{}
	release chan struct{}
	once    sync.Once
	fail    error

	mu    sync.Mutex
	calls []uint64
	busy  bool
	bad   string // why the calls were wrong, if they were
}

func newGateRoots(r psp.RootKeeper) *gateRoots {
	return &gateRoots{RootKeeper: r, entered: make(chan struct{}), release: make(chan struct{})}
}

func (r *gateRoots) open() { r.once.Do(func() { close(r.release) }) }

func (r *gateRoots) Advance(counter uint64, root [32]byte) error {
	r.mu.Lock()
	first := len(r.calls) == 0
	if r.busy {
		r.bad = "two counter writes ran at once"
	}
	if n := len(r.calls); n > 0 && counter <= r.calls[n-1] {
		r.bad = "a counter was recorded after a higher one"
	}
	r.calls = append(r.calls, counter)
	r.busy = true
	r.mu.Unlock()
	defer func() { r.mu.Lock(); r.busy = false; r.mu.Unlock() }()
	if first {
		close(r.entered)
		<-r.release
		if r.fail != nil {
			return r.fail
		}
	}
	return r.RootKeeper.Advance(counter, root)
}

func (r *gateRoots) check(t *testing.T) []uint64 {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.bad != "" {
		t.Fatalf("%s: counters recorded %v", r.bad, r.calls)
	}
	return append([]uint64(nil), r.calls...)
}

// attachGated attaches a fresh in-memory image whose root keeper is r's gate.
func attachGated(t *testing.T, fail error) (*Disk, *gateRoots, *testImage) {
	const ss = 4096
	im := newTestImage(t, 256*ss, ss, 1<<20)
	st := storetest.NewMem(0)
	im.create(t, st)
	roots := newGateRoots(im.Roots)
	roots.fail = fail
	b := im.Binding()
	b.Roots = roots
	e := New(Options{Shards: 2, Logger: quietLog})
	t.Cleanup(func() { e.Close() })
	t.Cleanup(roots.open) // first: a failed test leaves no flush waiting at the gate
	must(t, e.LoadKey(1, b))
	d, err := e.Attach(1, st, false)
	must(t, err)
	return d, roots, im
}

// flushAsync runs a flush and returns its result on a channel.
func flushAsync(d *Disk) chan error {
	c := make(chan error, 1)
	go func() { c <- d.Flush(ctx) }()
	return c
}

func notYet(t *testing.T, c chan error, what string) {
	t.Helper()
	select {
	case err := <-c:
		t.Fatalf("%s returned (%v) before the PSP recorded its counter", what, err)
	case <-time.After(100 * time.Millisecond):
	}
}

// TestFlushWaitsForItsCounterWhileTheNextCommitSyncs: while the PSP writes one flush's counter,
// a flush covered by it waits for that write, and a flush of newer data syncs the image at once
// (the two syncs overlap) but is acknowledged only after both counters are recorded, in order.
func TestFlushWaitsForItsCounterWhileTheNextCommitSyncs(t *testing.T) {
	d, roots, _ := attachGated(t, nil)
	must(t, d.WriteAt(ctx, bytes.Repeat([]byte{1}, 4096), 0, false))
	first := flushAsync(d)
	<-roots.entered

	covered := flushAsync(d) // nothing written since: the first flush's counter covers it
	notYet(t, covered, "a flush covered by a commit whose counter is being recorded")

	syncs := d.e.Stats.JournalSyncs.Load()
	must(t, d.WriteAt(ctx, bytes.Repeat([]byte{2}, 4096), 4096, false))
	newer := flushAsync(d)
	deadline := time.Now().Add(10 * time.Second)
	for d.e.Stats.JournalSyncs.Load() == syncs {
		if time.Now().After(deadline) {
			t.Fatal("the next flush's commit did not sync the image while the PSP recorded the counter before it")
		}
		time.Sleep(time.Millisecond)
	}
	notYet(t, newer, "a flush whose commit synced after one still being recorded")

	roots.open()
	for what, c := range map[string]chan error{"the first flush": first, "the covered flush": covered, "the newer flush": newer} {
		if err := <-c; err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	calls := roots.check(t)
	if len(calls) != 2 {
		t.Fatalf("counters recorded %v; want the first flush's and the newer flush's", calls)
	}
	d.commitMu.Lock()
	written := d.cs.counter
	d.commitMu.Unlock()
	if calls[1] != written {
		t.Fatalf("the PSP recorded %d last; the image's newest record holds %d", calls[1], written)
	}
}

// TestFlushAfterAFailedCounterWriteRecordsItAgain: when the PSP fails to record a commit's
// counter, that flush fails with an error naming it, and a flush that the commit covered does
// not fail with it: it commits again and the PSP ends up holding the image's counter.
func TestFlushAfterAFailedCounterWriteRecordsItAgain(t *testing.T) {
	boom := errors.New("counter file unwritable")
	d, roots, _ := attachGated(t, boom)
	must(t, d.WriteAt(ctx, bytes.Repeat([]byte{3}, 4096), 0, false))
	first := flushAsync(d)
	<-roots.entered
	covered := flushAsync(d)
	notYet(t, covered, "a flush covered by a commit whose counter is being recorded")
	roots.open()
	err := <-first
	if !errors.Is(err, boom) || !strings.Contains(err.Error(), "failed to record the image's counter") {
		t.Fatalf("the first flush returned %v; want the PSP's failure, named", err)
	}
	if err := <-covered; err != nil {
		t.Fatalf("the covered flush: %v; want it to commit again", err)
	}
	calls := roots.check(t)
	d.commitMu.Lock()
	written := d.cs.counter
	d.commitMu.Unlock()
	if len(calls) != 2 || calls[1] != written {
		t.Fatalf("counters recorded %v with the image's newest record at %d; want the failed one, then the image's", calls, written)
	}
}

// TestCheckpointBeginsBeforeTheJournalIsFull: once appends fill half of the journal,
// the background committer checkpoints (the journal starts a new epoch) with no further write,
// so a write-back rarely finds the journal full and waits for a whole checkpoint.
func TestCheckpointBeginsBeforeTheJournalIsFull(t *testing.T) {
	const ss = 4096
	im := newTestImage(t, 256*ss, ss, 1<<20)
	st := storetest.NewMem(0)
	im.create(t, st)
	e := New(Options{Shards: 1, Logger: quietLog, journalBytes: 32 * (ss + 512)})
	defer e.Close()
	d := im.attach(t, e, 1, st)
	state := func() (epoch, head, size uint64) {
		d.jr.mu.Lock()
		defer d.jr.mu.Unlock()
		return d.jr.epoch, d.jr.head, d.jr.size
	}
	epoch0, prev, size := state()
	var per uint64
	for lba := int64(0); ; lba++ {
		if lba == 1000 {
			t.Fatalf("1000 writes left the journal at %d of %d bytes", prev, size)
		}
		must(t, d.WriteAt(ctx, bytes.Repeat([]byte{byte(lba)}, ss), lba*ss, false))
		must(t, d.Flush(ctx))
		ep, head, _ := state()
		if per == 0 {
			per = head - prev // one write's journal bytes
		}
		if ep != epoch0 {
			if prev+per <= size/2 {
				t.Fatalf("a checkpoint came at %d of %d journal bytes, before half", prev+per, size)
			}
			return // it came as this write crossed half, before the next one
		}
		if head > size/2 {
			break // no more writes: the journal never fills
		}
		prev = head
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if ep, _, _ := state(); ep != epoch0 {
			return
		}
		if time.Now().After(deadline) {
			_, head, _ := state()
			t.Fatalf("no checkpoint 10 s after the journal filled %d of %d bytes", head, size)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestCheckpointOfAnEndedEpochDoesNothing: a part that found the journal full while a
// checkpoint ran, or a stale request of the background committer, does not checkpoint the
// epoch that followed (three more syncs for a nearly empty journal).
func TestCheckpointOfAnEndedEpochDoesNothing(t *testing.T) {
	const ss = 4096
	d := flushedDisk(t, ss)
	old := d.jr.epochNow()
	must(t, d.checkpointOf(old))
	now := d.jr.epochNow()
	if now == old {
		t.Fatalf("checkpointOf(%d), the current epoch, did not checkpoint", old)
	}
	syncs := d.e.Stats.JournalSyncs.Load()
	must(t, d.WriteAt(ctx, bytes.Repeat([]byte{8}, ss), ss, false))
	must(t, d.checkpointOf(old))
	if got := d.jr.epochNow(); got != now {
		t.Fatalf("checkpointOf(%d) after that epoch ended checkpointed epoch %d (now %d)", old, now, got)
	}
	if got := d.e.Stats.JournalSyncs.Load(); got != syncs {
		t.Fatalf("checkpointOf an ended epoch committed (%d journal syncs, want %d)", got, syncs)
	}
}

// TestBrokenDiskDoesNotCheckpoint: once the disk's memory no longer matches its journal
// (Disk.breaks), a checkpoint — even with everything appended committed — writes no pages, tree
// or epoch record: recovery at the next attach restores the last commit.
func TestBrokenDiskDoesNotCheckpoint(t *testing.T) {
	const ss = 4096
	d := flushedDisk(t, ss)
	ep := d.jr.epochNow()
	d.breaks(errors.New("a write-back's entries were not applied"))
	err := d.checkpoint()
	if err == nil || !strings.Contains(err.Error(), "no longer matches its journal") {
		t.Fatalf("checkpoint of a broken disk: %v; want it refused", err)
	}
	if got := d.jr.epochNow(); got != ep {
		t.Fatalf("checkpoint of a broken disk began epoch %d (was %d)", got, ep)
	}
}

// flushedDisk is a one-shard disk of 64 sectors of ss bytes on a memory store, with sector 0
// written and flushed; the engine closes at the test's end.
func flushedDisk(t *testing.T, ss int) *Disk {
	im := newTestImage(t, 64*uint64(ss), uint32(ss), 1<<20)
	st := storetest.NewMem(0)
	im.create(t, st)
	e := New(Options{Shards: 1, Logger: quietLog})
	t.Cleanup(func() { e.Close() })
	d := im.attach(t, e, 1, st)
	must(t, d.WriteAt(ctx, bytes.Repeat([]byte{7}, ss), 0, false))
	must(t, d.Flush(ctx))
	return d
}
