package engine

import (
	"cmp"
	"errors"
	"slices"
	"time"

	"github.com/sealdisk/sealdisk/sector"
)

// Write-back (FORMAT.md §6.2): dirty lines are sealed in batches and appended to the journal as
// data blocks, without a sync; their new entries take effect in the part's pages and the tree.
// Until a commit has made the append durable and it is written in place (apply.go), reads of
// its sectors without a line open its ciphertext in memory (p.slots.ref), never the data region.

// flushDirty writes back every dirty line (older than cutoff, when cutoff is set).
func (p *part) flushDirty(cutoff time.Time) error {
	if err := p.applyCommitted(); err != nil {
		return err
	}
	if len(p.dirtyLines) == 0 {
		return nil
	}
	p.wb = p.wb[:0]
	for _, l := range p.dirtyLines { // not the whole cache: a flush costs what is dirty
		if cutoff.IsZero() || l.dirtyAt.Before(cutoff) {
			p.wb = append(p.wb, l)
		}
	}
	return p.writeback(p.wb, false)
}

// writeback seals and appends the given dirty lines, in batches, then relieves the part if
// its appends waiting to be applied grew past their bound. With place (the cache's pressure:
// no flush waits for these), runs of at least Options.PlacedBytes of consecutive sectors are
// appended as placed blocks, their ciphertexts written in place only; a flush or FUA
// journals its sectors' data, so that it needs no sync beyond its commit's.
func (p *part) writeback(ls []*line, place bool) error {
	if err := p.applyCommitted(); err != nil {
		return err
	}
	for len(ls) > 0 {
		n := min(len(ls), maxWriteback)
		if err := p.writebackBatch(ls[:n], place); err != nil {
			return err
		}
		ls = ls[n:]
	}
	return p.relieve(false)
}

// writebackBatch seals and appends ls: with place, runs of at least placedRun consecutive
// sectors as one placed write, the rest as one data write.
func (p *part) writebackBatch(ls []*line, place bool) error {
	d := p.d
	if d.sess == nil {
		panic("BUG: engine: writeback on a read-only disk")
	}
	slices.SortFunc(ls, func(a, b *line) int { return cmp.Compare(a.lba, b.lba) })
	run := d.placedRun
	if !place || run == 0 || len(ls) < run {
		return p.writebackKind(ls, sector.BlockData)
	}
	p.runs, p.rest = p.runs[:0], p.rest[:0]
	for i := 0; i < len(ls); {
		j := i + 1
		for j < len(ls) && ls[j].lba == ls[j-1].lba+1 {
			j++
		}
		if j-i >= run {
			p.runs = append(p.runs, ls[i:j]...)
		} else {
			p.rest = append(p.rest, ls[i:j]...)
		}
		i = j
	}
	if len(p.rest) > 0 {
		if err := p.writebackKind(p.rest, sector.BlockData); err != nil {
			return err
		}
	}
	if len(p.runs) > 0 {
		return p.writebackKind(p.runs, sector.BlockPlaced)
	}
	return nil
}

// writebackKind seals ls (ascending) into one append of kind data or placed.
func (p *part) writebackKind(ls []*line, kind uint8) error {
	d := p.d
	p.lbas = p.lbas[:0]
	for _, l := range ls {
		p.lbas = append(p.lbas, l.lba)
	}
	w, err := p.sealWrite(kind, p.lbas, func(i int) []byte { return ls[i].data })
	if err != nil {
		return err
	}
	if err := p.appendWrite(w); err != nil {
		return err
	}
	for i, l := range ls {
		p.markClean(l)
		p.slots.setRef(l.lba, unappliedRef{w: w, i: i})
	}
	d.e.Stats.Writebacks.Add(uint64(len(ls)))
	if kind == sector.BlockPlaced {
		d.e.Stats.Placed.Add(uint64(len(ls)))
	}
	return nil
}

// sealWrite lays out one append of kind for lbas (ascending) and seals each sector's
// plaintext pt(i) into it. Placed, it first takes the entries the sectors replace, which
// recovery falls back to should a new ciphertext not reach the data region before a crash (a
// page lookup per page of each run); an error there frees the write.
func (p *part) sealWrite(kind uint8, lbas []uint64, pt func(i int) []byte) (*pendingWrite, error) {
	w := newPendingWrite(p, kind, lbas)
	if kind == sector.BlockPlaced {
		if err := forRuns(len(lbas), func(i int) uint64 { return lbas[i] }, func(i, j int) error {
			ents, _, err := p.entries(p.ents[:0], lbas[i], j-i)
			p.ents = ents
			for k, e := range ents {
				w.ents[i+k].Old = e
			}
			return err
		}); err != nil {
			w.free()
			return nil, err
		}
	}
	for i, lba := range lbas {
		p.d.sess.Seal(lba, w.data(i), pt(i), &w.ents[i].Entry)
	}
	return w, nil
}

// appendWrite appends w to the journal and applies its entries, under d.ckpt shared so that a
// commit never sees one without the other; a full journal is checkpointed first. The pages are
// read (and checked against the tree) before the append, so an unreadable page fails the
// write-back cleanly; should applying the entries still fail after the append, the disk's
// memory no longer matches its journal and it stops committing (Disk.broken). A write it
// returns an error for without appending it is freed.
func (p *part) appendWrite(w *pendingWrite) (err error) {
	d := p.d
	defer func() {
		if err != nil && w.end == 0 { // not appended
			w.free()
		}
	}()
	for i := 0; i < len(w.ents); {
		idx := w.ents[i].LBA / entriesPerPage
		j := i
		for j < len(w.ents) && w.ents[j].LBA/entriesPerPage == idx {
			j++
		}
		if uint64(j-i) < p.pageSectors(idx) { // a page replaced whole is not read (setEntries)
			if _, err := p.page(idx); err != nil {
				return err
			}
		}
		i = j
	}
	for {
		d.ckpt.RLock()
		err := d.jr.append(w)
		var full uint64 // the epoch found full (d.ckpt held: no checkpoint ends it meanwhile)
		if errors.Is(err, errJournalFull) {
			full = d.jr.epochNow()
		}
		if err == nil {
			if serr := p.setEntries(w.ents); serr != nil {
				d.breaks(serr)
				err = serr
			}
			p.pending = append(p.pending, w)
			p.pendingBytes += len(w.buf)
		}
		d.ckpt.RUnlock()
		if errors.Is(err, errJournalFull) {
			if err = p.d.checkpointOf(full); err == nil {
				continue
			}
		}
		return err
	}
}

// relieve commits and applies the part's appends when they hold more than their share of the
// cache (or always, with force): the cache's pressure, not each write-back, decides when the
// journal is synced. Past their share the background committer is asked (the shard goes on
// writing; the part applies what it committed at its next write-back); past twice their
// share the part commits itself and waits. Too many metadata pages changed since the
// checkpoint start a checkpoint.
func (p *part) relieve(force bool) error {
	d := p.d
	if d.meta.len() > d.e.opts.MaxChangedPages {
		if err := d.checkpoint(); err != nil {
			return err
		}
	}
	// Placed appends already in place wait only for the next sync to free their memory: they
	// ask the background committer for it, and count against the hard bound only past twice
	// the part's share.
	waiting := p.pendingBytes - p.heldBytes + max(p.heldBytes-2*p.maxPending, 0)
	if !force && waiting <= p.maxPending {
		if p.heldBytes > p.maxPending {
			d.requestCommit()
		}
		return nil
	}
	if !force && waiting <= 2*p.maxPending {
		d.requestCommit()
		return p.applyCommitted()
	}
	if err := d.commit(false); err != nil {
		return err
	}
	return p.applyCommitted()
}
