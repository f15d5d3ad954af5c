package engine

import (
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/sealdisk/sealdisk/sector"
)

// journal is the disk's metadata journal (FORMAT.md §6): its bytes and its recovery rule
// belong to package sector; this is the writer (append, checkpoint) and recovery's writes
// (recover.go).
type journal struct {
	d        *Disk
	capacity uint64

	mu    sync.Mutex // guards epoch, next, fresh, journalMark, epochMark
	epoch uint64
	next  uint64 // next free record slot in this epoch
	// fresh: the header of this epoch is written but maybe not durable. The first append of
	// the epoch syncs it before its records overwrite the old epoch's first slots: were the
	// header lost after that, recovery would replay a truncated old epoch, and its zero
	// records (applied unconditionally) would punch sectors that later records rewrote.
	fresh bool
	// Marks of the disk's syncer (syncs.go): journalMark as of which the journal's header and
	// records are durable, epochMark as of which every write made before this epoch began is.
	// When a sync failed since, the next append writes the journal again first
	// (rewriteJournalLocked), the next checkpoint every journaled sector (rewriteSectors).
	journalMark, epochMark uint64
}

func (j *journal) recordPos(i uint64) int64 { return sector.JournalRecordPos(j.d.h, i) }

// append claims the next len(recs)/JournalRecordSize record slots, has fill marshal the
// records into recs for them (it gets the first slot, its seq, and the epoch), writes them and
// makes them durable. ok is false, with nothing written, when the journal is full: the caller
// checkpoints and tries again.
//
// Slots are claimed and written under mu, so no slot is claimed before every earlier slot
// holds its records: any later sync — whichever shard issues it — covers every earlier record.
// Recovery stops at the first invalid slot (FORMAT.md §6), so a hole before a record whose
// in-place writes landed would lose that record. A failed write claims nothing.
func (j *journal) append(recs []byte, fill func(start, epoch uint64)) (ok bool, err error) {
	n := uint64(len(recs) / sector.JournalRecordSize)
	syncs := &j.d.syncs
	j.mu.Lock()
	if j.next+n > j.capacity {
		j.mu.Unlock()
		return false, nil
	}
	mark := syncs.mark()
	if mark != j.journalMark {
		if err := j.rewriteJournalLocked(mark); err != nil {
			j.mu.Unlock()
			return false, err
		}
	}
	if j.fresh {
		if err := syncs.since(mark); err != nil {
			j.mu.Unlock()
			return false, fmt.Errorf("failed to sync journal header: %w", err)
		}
		j.fresh = false
	}
	start := j.next
	fill(start, j.epoch)
	if _, err := j.d.st.WriteAt(recs, j.recordPos(start)); err != nil {
		j.mu.Unlock()
		return false, fmt.Errorf("failed to write journal: %w", err)
	}
	j.next += n
	j.mu.Unlock()
	if err := syncs.since(mark); err != nil {
		return false, fmt.Errorf("failed to sync journal: %w", err)
	}
	j.d.e.Stats.JournalSyncs.Add(1)
	return true, nil
}

// rewriteJournalLocked writes the journal's header and this epoch's records again, as reads
// see them, and syncs: a record appended behind one a failed sync lost, or under a lost
// header, would be invisible to recovery. The caller holds mu; mark is the syncer's.
func (j *journal) rewriteJournalLocked(mark uint64) error {
	start := int64(j.d.h.JournalOffset)
	buf := make([]byte, j.recordPos(j.next)-start)
	if _, err := j.d.st.ReadAt(buf, start); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("failed to read the journal to write it again: %w", err)
	}
	if _, err := j.d.st.WriteAt(buf, start); err != nil {
		return fmt.Errorf("failed to write the journal again: %w", err)
	}
	if err := j.d.syncs.since(mark); err != nil {
		return fmt.Errorf("failed to sync the journal written again: %w", err)
	}
	j.journalMark, j.fresh = mark, false
	return nil
}

// checkpointLocked syncs every in-place update and starts a new epoch. The caller holds
// d.ckpt exclusively, so no writeback is between its journal append and its in-place writes.
// After a failed sync it first writes every journaled sector again (rewriteSectors); when that
// or its sync fails, the records stay and the error says the journal is kept.
func (j *journal) checkpointLocked() error {
	d := j.d
	syncs := &d.syncs
	mark := syncs.mark()
	j.mu.Lock()
	lost := mark != j.epochMark
	j.mu.Unlock()
	if lost {
		err := j.rewriteSectors()
		if err == nil {
			err = syncs.since(mark)
		}
		if err != nil {
			return fmt.Errorf("journal kept: a sync of the image failed (%w), and writing the journaled sectors again and syncing them failed: %w", syncs.lostCause(), err)
		}
		d.e.opts.Logger.Info("journaled sectors written again and synced after a failed sync", "asid", d.asid)
	} else if err := syncs.since(mark); err != nil {
		return fmt.Errorf("failed to sync image: %w", err)
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	syncs.checkpointed(mark)
	j.epochMark = mark
	if j.next == 0 {
		return nil // nothing journaled since the last checkpoint
	}
	return j.newEpochLocked(j.epoch + 1)
}

// rewriteSectors writes every sector of the current epoch's records again, entry and data, as
// reads see them now (a sector with a zero entry: punched again): after a failed sync, the
// page cache may hold writes that reads see but the disk never got, and only writing them
// again makes a later sync write them. The caller syncs, and holds d.ckpt exclusively, so no
// write-back or zeroing is between its journal append and its in-place writes, and nothing
// else changes these bytes: a read opening the same sectors reads the same bytes either way.
func (j *journal) rewriteSectors() error {
	d := j.d
	j.mu.Lock()
	n, epoch := j.next, j.epoch
	j.mu.Unlock()
	_, recs, err := d.c.ReadJournal(d.st, d.h, n)
	if err != nil {
		return fmt.Errorf("failed to read the journal: %w", err)
	}
	if uint64(len(recs)) != n || n > 0 && recs[0].Epoch != epoch {
		return fmt.Errorf("%w: %d valid records of epoch %d where %d were written", sector.ErrJournal, len(recs), epoch, n)
	}
	ct := make([]byte, d.ss)
	var e sector.Entry
	done := map[uint64]bool{}
	for _, r := range recs {
		if done[r.LBA] {
			continue
		}
		done[r.LBA] = true
		if _, err := d.st.ReadAt(e[:], d.h.EntryPos(r.LBA)); err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("failed to read the entry of sector %d: %w", r.LBA, err)
		}
		if err := d.writeSector(r.LBA, &e, ct); err != nil {
			return err
		}
	}
	return nil
}

// writeSector writes sector lba's entry e, then its data again as read (ct is scratch of a
// sector), or punches it when e is zero: after a failed sync, the page cache may hold what
// reads see but the disk never got, and no later sync writes it unless it is written again.
func (d *Disk) writeSector(lba uint64, e *sector.Entry, ct []byte) error {
	if _, err := d.st.WriteAt(e[:], d.h.EntryPos(lba)); err != nil {
		return fmt.Errorf("failed to write the entry of sector %d: %w", lba, err)
	}
	if e.IsZero() {
		return d.punch(d.h.DataPos(lba), d.ss)
	}
	n, err := d.st.ReadAt(ct, d.h.DataPos(lba))
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("failed to read sector %d: %w", lba, err)
	}
	if _, err := d.st.WriteAt(ct[:n], d.h.DataPos(lba)); err != nil {
		return fmt.Errorf("failed to write sector %d: %w", lba, err)
	}
	return nil
}

// newEpochLocked writes the journal header for epoch. It needs no sync of its own: the first
// append of the epoch syncs it before writing any record (see fresh).
func (j *journal) newEpochLocked(epoch uint64) error {
	hdr := make([]byte, sector.JournalHeaderSize)
	j.d.c.MarshalJournalHeader(epoch, hdr)
	if _, err := j.d.st.WriteAt(hdr, int64(j.d.h.JournalOffset)); err != nil {
		return fmt.Errorf("failed to write journal header: %w", err)
	}
	j.epoch, j.next, j.fresh = epoch, 0, true
	return nil
}
