package engine

import (
	"fmt"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/psp"
)

// Commits (FORMAT.md §6.2, §8): a root record naming the journal's end and the tree's root is
// written to the slot not holding the current one, and one fdatasync makes it and every block
// before it durable. A guest's FLUSH or FUA commits with the counter advanced, and the PSP
// records the counter before the flush is acknowledged; the cache's pressure and the idle
// timer commit without. Commits are serialised (commitMu); one covers every append made before
// it, so concurrent flushes share one sync. The PSP records a counter after commitMu is
// released, in counter order (advance), so the next commit's sync of the image runs while the
// PSP syncs the counter of the one before: a record on disk may be ahead of the PSP's counter
// (Admit accepts that: it is a crash between the two syncs), never behind an acknowledged one.

// commitState is guarded by Disk.commitMu.
type commitState struct {
	seq     uint64   // of the current record
	slot    int      // where the current record is
	counter uint64   // of the newest record synced; the PSP's may still be behind it
	adv     *advance // the newest counter-advancing commit whose record is synced (admitted first)
	// Syncs: goodMark is the syncer mark as of the last commit whose sync succeeded, goodHead
	// the journal position it covered (this epoch); epochMark the mark when the epoch began.
	goodMark, epochMark uint64
	goodHead            uint64
	// settled is the epoch's blocks (by seq) whose placed sectors a good sync made durable:
	// the next record names it (settle.go).
	settled uint32
}

// commit makes every append made before the call durable; bump advances the counter (a guest's
// flush or FUA) and returns once the PSP has recorded it. Nothing to do when an earlier commit
// already covers them.
func (d *Disk) commit(bump bool) error {
	want := d.jr.end()
	d.commitMu.Lock()
	if d.committed.Load() >= want {
		if !bump && !d.vouchWaits() {
			d.commitMu.Unlock()
			return nil
		}
		if a := d.cs.adv; bump && a.end >= want && !d.jr.placedIn(a.settled, want) {
			d.commitMu.Unlock()
			if a.wait() == nil {
				return nil
			}
			d.commitMu.Lock() // its counter was not recorded: advance it again
		}
	}
	d.hashLeaves() // most of the cut's hashing, while the parts go on appending
	d.ckpt.Lock()
	c, root := d.cutLocked()
	err := d.jr.writeUnwritten()
	d.ckpt.Unlock()
	if err != nil {
		d.commitMu.Unlock()
		return fmt.Errorf("failed to commit: %w", err)
	}
	a, err := d.publishLocked(c, root, bump)
	d.commitMu.Unlock()
	if err != nil || a == nil {
		return err
	}
	return a.record(d.roots)
}

// advance is a counter-advancing commit whose record is synced, on its way to the PSP. The
// commit that made it records it (record) after the one before it; flushes that the commit
// covers wait for it (wait).
type advance struct {
	end     uint64 // the journal LSN its record covers
	settled uint64 // the LSN before which its record names every placed append settled
	counter uint64
	root    [32]byte
	prev    *advance      // recorded first; only record reads it
	done    chan struct{} // closed once recorded or failed
	err     error         // set before done is closed
}

// admitted is the advance of the state an attach began from, which Admit recorded: it covers
// the journal up to its start (LSN 0), so a flush with nothing appended since needs no counter.
func admitted() *advance {
	a := &advance{done: make(chan struct{})}
	close(a.done)
	return a
}

func (a *advance) record(roots psp.RootKeeper) error {
	if p := a.prev; p != nil {
		<-p.done // a failed one is covered by this counter, which is higher
		a.prev = nil
	}
	if err := roots.Advance(a.counter, a.root); err != nil {
		a.err = fmt.Errorf("failed to record the image's counter %d in the PSP: %w", a.counter, err)
	}
	close(a.done)
	return a.err
}

func (a *advance) wait() error {
	<-a.done
	return a.err
}

// committer commits whenever a part asks (requestCommit), until Close closes d.kick. A
// failed commit loses nothing: the appends stay pending and the next commit — a flush's, or
// the part's own once its appends reach their hard bound — starts over (and reports).
func (d *Disk) committer() {
	defer close(d.committerDone)
	for range d.kick {
		if ep := d.ckptWanted.Swap(0); ep != 0 {
			if err := d.checkpointOf(ep - 1); err != nil {
				d.e.opts.Logger.Warn("background checkpoint failed; the next one retries", "asid", d.asid, "error", err)
			}
			continue
		}
		if err := d.commit(false); err != nil {
			d.e.opts.Logger.Warn("background commit failed; the next flush retries", "asid", d.asid, "error", err)
		}
	}
}

// requestCheckpoint asks the background committer for a checkpoint of the journal's epoch ep
// (which commits too), without waiting: the journal is half full, and a checkpoint begun
// before it is full writes most of the epoch in place and syncs it while the parts go on
// appending (checkpointIf).
func (d *Disk) requestCheckpoint(ep uint64) {
	if d.kick != nil && d.ckptWanted.Swap(ep+1) != ep+1 {
		d.requestCommit()
	}
}

// requestCommit asks the background committer for a commit, without waiting.
func (d *Disk) requestCommit() {
	select {
	case d.kick <- struct{}{}:
	default: // one is asked for already
	}
}

// cutLocked is the state to commit: the journal's end and the tree's root over every entry
// appended so far. The caller holds d.ckpt exclusively.
func (d *Disk) cutLocked() (cut, [32]byte) {
	c := d.jr.cutNow()
	var root [32]byte
	d.hashLeaves()
	if d.tree != nil {
		root = d.tree.Root()
	}
	return c, root
}

// publishLocked writes the record for c and syncs; with bump, the record's counter is one
// higher and the advance returned must be recorded once commitMu is released. The caller holds
// commitMu.
func (d *Disk) publishLocked(c cut, root [32]byte, bump bool) (*advance, error) {
	var settled uint64 // the LSN the record's settled stands for
	if err := d.broken.Load(); err != nil {
		return nil, fmt.Errorf("failed to commit: the disk's state in memory no longer matches its journal (%w); detach and attach it again", *err)
	}
	mark := d.syncs.mark()
	if mark != d.cs.goodMark {
		// A sync failed since the last good commit: it may have dropped blocks that reads
		// still see, which no later sync writes unless they are written again.
		from := d.cs.goodHead
		if err := d.jr.rewrite(from, c.head); err != nil {
			return nil, fmt.Errorf("failed to commit: %w", err)
		}
	}
	rec := format.RootFor(d.h)
	rec.Auth, rec.Seq, rec.Counter = format.RootByPSP, d.cs.seq+1, d.cs.counter
	if bump {
		rec.Counter++
	}
	rec.Epoch, rec.Head, rec.HeadDigest, rec.Root = c.epoch, c.head, c.digest, root
	rec.Settled, settled = d.cs.settled, d.settled.Load()
	vouches := d.canVouch(mark)
	var v vouch
	if vouches {
		v = d.jr.vouchable() // written in place before this sync: durable after it
	}
	if err := d.writeRoot(rec, 1-d.cs.slot); err != nil {
		return nil, err
	}
	d.cs.seq++ // even if the sync fails: the slot may hold this seq now
	if err := d.syncs.since(mark); err != nil {
		return nil, fmt.Errorf("failed to commit: %w", err)
	}
	if vouches {
		d.vouched(v)
	}
	d.cs.slot = 1 - d.cs.slot
	d.cs.goodMark, d.cs.goodHead = mark, c.head
	d.committed.Store(c.end)
	d.e.Stats.JournalSyncs.Add(1)
	if !bump {
		return nil, nil
	}
	d.cs.counter = rec.Counter
	a := &advance{end: c.end, settled: settled, counter: rec.Counter, root: root, prev: d.cs.adv, done: make(chan struct{})}
	d.cs.adv = a
	return a, nil
}

// vouchWaits reports whether a sync now would vouch for placed appends written in place since
// the last one (settle.go): a commit with nothing new to commit still syncs then, so that they
// are retired. The caller holds commitMu.
func (d *Disk) vouchWaits() bool {
	return d.canVouch(d.syncs.mark()) && d.jr.appliedUnvouched()
}

// writeRoot authenticates rec with the PSP and writes it into slot i.
func (d *Disk) writeRoot(rec *format.RootRecord, i int) error {
	body := rec.MarshalBody()
	if _, err := d.st.WriteAt(format.MarshalRootSlot(body, d.roots.SealRoot(body)), d.h.RootSlotPos(i)); err != nil {
		return fmt.Errorf("failed to write root record: %w", err)
	}
	return nil
}

// breaks records that the disk's state in memory no longer matches its journal: from then on
// it does not commit (publishLocked), so recovery at the next attach restores the last commit.
func (d *Disk) breaks(err error) {
	if d.broken.CompareAndSwap(nil, &err) {
		d.e.opts.Logger.Error("disk stops committing: its state in memory no longer matches its journal", "asid", d.asid, "error", err)
	}
}
