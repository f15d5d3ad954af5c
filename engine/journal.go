package engine

import (
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/sealdisk/sealdisk/sector"
)

// journal is the disk's metadata journal (FORMAT.md §6).
type journal struct {
	d        *Disk
	capacity uint64

	mu    sync.Mutex // guards epoch, next, fresh
	epoch uint64
	next  uint64 // next free record slot in this epoch
	// fresh: the header of this epoch is written but maybe not durable. The first append of
	// the epoch syncs it before its records overwrite the old epoch's first slots: were the
	// header lost after that, recovery would replay a truncated old epoch, and its zero
	// records (applied unconditionally) would punch sectors that later records rewrote.
	// (Found by TestCrashInsideOperations.)
	fresh bool
	// goodFails is the count of failed syncs (Disk.syncFails) as of which the journal's
	// header and records are known durable; when more syncs have failed, the next append
	// writes them again first. epochFails: the same for every write made before this epoch
	// began; when more have failed, the next checkpoint writes this epoch's sectors again.
	goodFails, epochFails uint64
}

func (j *journal) recordPos(i uint64) int64 {
	return int64(j.d.h.JournalOffset) + sector.JournalHeaderSize + int64(i)*sector.JournalRecordSize
}

// append claims the next len(recs)/JournalRecordSize record slots, has fill marshal the
// records into recs for them (it gets the first slot, its seq, and the epoch), writes them and
// makes them durable. ok is false, with nothing written, when the journal is full: the caller
// checkpoints and tries again.
//
// Slots are claimed and written under mu, so no slot is claimed before every earlier slot
// holds its records: any later sync — whichever shard issues it — covers every earlier record.
// Recovery scans records in slot order and stops at the first invalid one (FORMAT.md §6), so
// a hole before a record whose in-place writes landed would lose that record. (Found by
// TestCrashInsideOperations: two shards claimed slots, the later one synced and wrote in place
// first, the crash lost the earlier one's unsynced records.) A failed write claims nothing.
func (j *journal) append(recs []byte, fill func(start, epoch uint64)) (ok bool, err error) {
	n := uint64(len(recs) / sector.JournalRecordSize)
	j.mu.Lock()
	if j.next+n > j.capacity {
		j.mu.Unlock()
		return false, nil
	}
	fails := j.d.syncFails.Load()
	if fails != j.goodFails {
		// A failed sync may have lost the header or records of this epoch: a record behind
		// a lost one, or under a lost header, is invisible to recovery.
		if err := j.rewriteJournalLocked(fails); err != nil {
			j.mu.Unlock()
			return false, err
		}
	}
	if j.fresh {
		if err := j.d.syncSince(fails); err != nil {
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
	if err := j.d.syncSince(fails); err != nil {
		return false, fmt.Errorf("failed to sync journal: %w", err)
	}
	j.d.e.Stats.JournalSyncs.Add(1)
	return true, nil
}

// rewriteJournalLocked writes the journal's header and this epoch's records again, as reads
// see them, and syncs. The caller holds mu and read fails from Disk.syncFails.
func (j *journal) rewriteJournalLocked(fails uint64) error {
	start := int64(j.d.h.JournalOffset)
	buf := make([]byte, j.recordPos(j.next)-start)
	if _, err := j.d.st.ReadAt(buf, start); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("failed to read the journal to write it again: %w", err)
	}
	if _, err := j.d.st.WriteAt(buf, start); err != nil {
		return fmt.Errorf("failed to write the journal again: %w", err)
	}
	if err := j.d.syncSince(fails); err != nil {
		return fmt.Errorf("failed to sync the journal written again: %w", err)
	}
	j.goodFails, j.fresh = fails, false
	return nil
}

// checkpointLocked syncs every in-place update and starts a new epoch. The caller holds
// d.ckpt exclusively, so no writeback is between its journal append and its in-place writes.
// After a failed sync it first writes every journaled sector again (rewriteLocked); when that
// or its sync fails, the records stay and the error says the journal is kept.
func (j *journal) checkpointLocked() error {
	d := j.d
	fails := d.syncFails.Load()
	j.mu.Lock()
	lost := fails != j.epochFails
	j.mu.Unlock()
	if lost {
		err := j.rewriteLocked()
		if err == nil {
			err = d.syncSince(fails)
		}
		if err != nil {
			return fmt.Errorf("journal kept: a sync of the image failed (%w), and writing the journaled sectors again and syncing them failed: %w", d.lostCause(), err)
		}
		d.e.opts.Logger.Info("journaled sectors written again and synced after a failed sync", "asid", d.asid)
	} else if err := d.syncSince(fails); err != nil {
		return fmt.Errorf("failed to sync image: %w", err)
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if d.syncFails.Load() == fails {
		d.syncLost.Store(nil)
	}
	j.epochFails = fails
	if j.next == 0 {
		return nil // nothing journaled since the last checkpoint
	}
	return j.newEpochLocked(j.epoch + 1)
}

// rewriteLocked writes every sector of the current epoch's records again, entry and data, as
// reads see them now (a sector with a zero entry: punched again): after a failed sync
// (Disk.syncMu), the page cache may hold writes that reads see but the disk never got, and
// only writing them again makes a later sync write them. The caller syncs, and holds
// d.ckpt exclusively, so no write-back or zeroing is between its journal append and its
// in-place writes, and nothing else changes these bytes: a read opening the same sectors
// reads the same bytes either way.
func (j *journal) rewriteLocked() error {
	d := j.d
	j.mu.Lock()
	n, epoch := j.next, j.epoch
	j.mu.Unlock()
	buf := make([]byte, sector.JournalRecordSize)
	ct := make([]byte, d.ss)
	var e sector.Entry
	done := map[uint64]bool{}
	for i := range n {
		if _, err := d.st.ReadAt(buf, j.recordPos(i)); err != nil {
			return fmt.Errorf("failed to read journal record %d: %w", i, err)
		}
		r, err := d.c.ParseJournalRecord(buf)
		if err == nil && (r.Epoch != epoch || r.Seq != i || r.LBA >= d.sectors) {
			err = fmt.Errorf("%w: epoch %d, seq %d, sector %d in the slot of record %d of epoch %d", sector.ErrJournal, r.Epoch, r.Seq, r.LBA, i, epoch)
		}
		if err != nil {
			return fmt.Errorf("journal record %d: %w", i, err)
		}
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
		return punch(d.st, d.h.DataPos(lba), d.ss)
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

// recover replays the journal (FORMAT.md §6): per record, the entry that authenticates the
// data on disk becomes the sector's entry; zero records complete. Then a new epoch starts.
func (j *journal) recover() error {
	d := j.d
	hdr := make([]byte, sector.JournalHeaderSize)
	if _, err := d.st.ReadAt(hdr, int64(d.h.JournalOffset)); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("failed to read journal header: %w", err)
	}
	epoch, err := d.c.ParseJournalHeader(hdr)
	if err != nil {
		// A header that fails its MAC never covered an in-place write: start afresh.
		d.e.opts.Logger.Warn("journal header invalid; starting a new journal", "error", err)
		epoch = 0
	}
	// Decide every journaled sector's entry in memory first, in record order, and only then
	// write: applying a zero record (punching data) before a later write record of the same
	// sector is checked would destroy the data that record made durable.
	final := map[uint64]sector.Entry{}
	var order []uint64
	if epoch > 0 {
		buf := make([]byte, sector.JournalRecordSize)
		ct := make([]byte, d.ss, d.ss+sector.TagSize)
		pt := make([]byte, d.ss, d.ss+sector.TagSize)
		for i := uint64(0); i < j.capacity; i++ {
			if _, err := d.st.ReadAt(buf, j.recordPos(i)); err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("failed to read journal record %d: %w", i, err)
			}
			r, err := d.c.ParseJournalRecord(buf)
			if err != nil || r.Epoch != epoch || r.Seq != i || r.LBA >= d.sectors {
				break
			}
			if _, seen := final[r.LBA]; !seen {
				order = append(order, r.LBA)
			}
			if r.Kind == sector.RecordZero {
				final[r.LBA] = sector.Entry{}
				continue
			}
			n, err := d.st.ReadAt(ct, d.h.DataPos(r.LBA))
			if err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("failed to read sector %d for recovery: %w", r.LBA, err)
			}
			clear(ct[n:]) // past the end of a sparse file: zeros
			if e, ok := d.authentic(r.LBA, pt, ct, &r.Old, &r.New); ok {
				final[r.LBA] = e
			} else if _, decided := final[r.LBA]; !decided {
				// Neither authenticates: keep an earlier record's decision; with none, the
				// sector was damaged by something other than a crash and fails its reads.
				order = order[:len(order)-1]
			}
		}
		clear(pt)
	}
	// Each decided sector's data is written again too, as read: after a failed sync, the
	// page cache can hold data that reads see but that never reached the disk, and no later
	// sync writes it unless it is written again (Disk.syncMu). The sync below then makes
	// entry and data durable together, before the new epoch retires their records.
	ct := make([]byte, d.ss)
	for _, lba := range order {
		e, ok := final[lba]
		if !ok {
			continue
		}
		if err := d.writeSector(lba, &e, ct); err != nil {
			return fmt.Errorf("recovery: %w", err)
		}
	}
	applied := len(order)
	if err := d.st.Sync(); err != nil {
		return fmt.Errorf("failed to sync recovery: %w", err)
	}
	if applied > 0 {
		d.e.opts.Logger.Info("recovered journal", "epoch", epoch, "records", applied)
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if err := j.newEpochLocked(epoch + 1); err != nil {
		return err
	}
	if err := d.st.Sync(); err != nil {
		return fmt.Errorf("failed to sync journal header: %w", err)
	}
	j.fresh = false
	return nil
}

// authentic is a write record's verdict on ct, the data on disk of sector lba: its new entry
// if that authenticates ct, else its old one (an all-zero old entry matches all-zero data);
// ok is false when neither does. pt is scratch for the plaintext.
func (d *Disk) authentic(lba uint64, pt, ct []byte, old, new *sector.Entry) (e sector.Entry, ok bool) {
	switch {
	case d.c.Open(lba, pt, ct, new) == nil:
		return *new, true
	case old.IsZero() && allZero(ct):
		return sector.Entry{}, true
	case !old.IsZero() && d.c.Open(lba, pt, ct, old) == nil:
		return *old, true
	}
	return sector.Entry{}, false
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
