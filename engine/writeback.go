package engine

import (
	"cmp"
	"fmt"
	"slices"
	"time"

	"github.com/sealdisk/sealdisk/sector"
)

// Write-back (FORMAT.md §6): dirty lines are sealed in batches; each batch's journal records
// (new and old entry) are appended and synced; then data and entries are written in place.

// flushDirty writes back every dirty line (older than cutoff, when cutoff is set).
func (p *part) flushDirty(cutoff time.Time) error {
	if err := p.settle(); err != nil {
		return err
	}
	if p.dirty == 0 {
		return nil
	}
	p.wb = p.wb[:0]
	for l := p.lineLRU.head; l != nil; l = l.next {
		if l.dirty && (cutoff.IsZero() || l.dirtyAt.Before(cutoff)) {
			p.wb = append(p.wb, l)
		}
	}
	return p.writeback(p.wb)
}

// writeback encrypts and writes the given dirty lines, in batches, after settling the part.
func (p *part) writeback(ls []*line) error {
	if err := p.settle(); err != nil {
		return err
	}
	for len(ls) > 0 {
		n := min(len(ls), p.batchMax())
		if err := p.writebackBatch(ls[:n]); err != nil {
			return err
		}
		ls = ls[n:]
	}
	return nil
}

// batchMax is the most records one batch may reserve: a batch larger than the whole journal
// would wait for room forever.
func (p *part) batchMax() int {
	return int(min(maxWriteback, p.d.jr.capacity))
}

func (p *part) writebackBatch(ls []*line) error {
	d := p.d
	if d.sess == nil {
		panic("BUG: engine: writeback on a read-only disk")
	}
	slices.SortFunc(ls, func(a, b *line) int { return cmp.Compare(a.lba, b.lba) })
	ss := d.ss
	// Seal first: the records need the new entries, not their journal slots.
	recs := p.jrecs[:0]
	for i, l := range ls {
		old, err := p.entry(l.lba)
		if err != nil {
			return err
		}
		r := sector.JournalRecord{Kind: sector.RecordWrite, LBA: l.lba, Old: *old}
		d.sess.Seal(l.lba, p.ct[int64(i)*ss:int64(i+1)*ss], l.data, &r.New)
		recs = append(recs, r)
	}
	p.jrecs = recs
	d.ckpt.RLock()
	defer d.ckpt.RUnlock()
	if err := p.journal(recs); err != nil {
		return err
	}
	if err := p.inPlace(ls, recs); err != nil {
		// Some of the batch may be on disk, data or entries: each sector is unsettled until
		// settle (or a trim) makes its entry match its data. Marked while ckpt is held, so no
		// checkpoint retires these records in between.
		for i := range recs {
			p.markUnsettled(recs[i].LBA, pending{old: recs[i].Old, new: recs[i].New}, err)
		}
		return err
	}
	for _, l := range ls {
		p.markClean(l)
	}
	d.e.Stats.Writebacks.Add(uint64(len(ls)))
	return nil
}

// inPlace writes a journaled batch's data from p.ct (contiguous runs in one pwrite each), once
// no read is opening sectors of the part outside the shard, then its entries.
func (p *part) inPlace(ls []*line, recs []sector.JournalRecord) error {
	if err := p.writeData(ls); err != nil {
		return err
	}
	return p.setEntries(recs)
}

func (p *part) writeData(ls []*line) error {
	d := p.d
	ss := d.ss
	p.gate.Lock()
	defer p.gate.Unlock()
	return forRuns(len(ls), func(i int) uint64 { return ls[i].lba }, func(i, j int) error {
		if _, err := d.st.WriteAt(p.ct[int64(i)*ss:int64(j)*ss], d.h.DataPos(ls[i].lba)); err != nil {
			return fmt.Errorf("failed to write data: %w", err)
		}
		return nil
	})
}

// journal appends recs (epoch and seq are filled in) and makes them durable, checkpointing
// first when the journal is full. The caller holds d.ckpt shared; it is released while a
// checkpoint runs.
func (p *part) journal(recs []sector.JournalRecord) error {
	d := p.d
	buf := p.recs[:len(recs)*sector.JournalRecordSize]
	fill := func(start, epoch uint64) {
		for i := range recs {
			recs[i].Epoch, recs[i].Seq = epoch, start+uint64(i)
			d.c.MarshalJournalRecord(&recs[i], buf[i*sector.JournalRecordSize:(i+1)*sector.JournalRecordSize])
		}
	}
	for {
		ok, err := d.jr.append(buf, fill)
		if err != nil || ok {
			return err
		}
		d.ckpt.RUnlock()
		if err = p.settle(); err == nil {
			err = d.checkpoint()
		}
		d.ckpt.RLock()
		if err != nil {
			return err
		}
	}
}
