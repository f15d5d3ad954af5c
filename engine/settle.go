package engine

import (
	"cmp"
	"fmt"
	"math"
	"slices"
	"time"
)

// Placed writes (FORMAT.md §6.2): a write-back under the cache's pressure appends long runs of
// sectors as placed blocks — their new and old entries, no ciphertext — and writes their
// ciphertexts in the data region only, once a commit has made the blocks durable. Until a sync
// has made those ciphertexts durable too, a crash may leave a sector's old ciphertext in place
// under a committed new entry, so recovery falls back to the block's old entry for a sector
// whose new one does not authenticate what is in place. A root record names how many of the
// epoch's blocks are past that window (its `settled`): recovery accepts only the new entry of
// those, so an older ciphertext put back in place is an integrity error, not a silent
// rollback. A FLUSH settles every placed append before it (settleFor) before its record, so
// what a flush acknowledged is never what recovery may fall back from.
//
// A sync vouches for the placed appends written in place before it (vouchable), but only if
// no sync failed in the epoch: a failed fdatasync may have dropped any of them, and nothing is
// vouched for again until a checkpoint has written every sector of the epoch again (reapply)
// and synced.

// vouch is what a good sync will have made durable: the first idx of the journal's unvouched
// placed appends are in place; seq is the first block not covered (the record's `settled`),
// lsn its LSN (parts retire placed appends that end before it).
type vouch struct {
	idx int
	seq uint64
	lsn uint64
}

// vouchable is the vouch for the state now: the caller syncs next, and applies it if that
// succeeds with no sync failed in the epoch.
func (j *journal) vouchable() vouch {
	j.mu.Lock()
	defer j.mu.Unlock()
	for i, w := range j.placed {
		if w.state.Load() != writeApplied {
			return vouch{idx: i, seq: w.seq0, lsn: j.base + w.pos}
		}
	}
	return vouch{idx: len(j.placed), seq: j.seq, lsn: j.base + j.head}
}

// unvouchedBefore is the end of the last placed append before LSN want not yet vouched for
// (0: none).
func (j *journal) unvouchedBefore(want uint64) uint64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	var last uint64
	for _, w := range j.placed {
		if j.base+w.pos >= want {
			break
		}
		last = w.end
	}
	return last
}

// appliedUnvouched reports whether the first placed append not vouched for is in place: a
// sync would vouch for it.
func (j *journal) appliedUnvouched() bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	return len(j.placed) > 0 && j.placed[0].state.Load() == writeApplied
}

// placedIn reports whether an append of this epoch in the LSN range [from, to) is placed: a
// flush's record that names settled only what came before from does not cover it.
func (j *journal) placedIn(from, to uint64) bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	i, _ := slices.BinarySearchFunc(j.writes, from, func(w *pendingWrite, lsn uint64) int { return cmp.Compare(j.base+w.pos, lsn) })
	for _, w := range j.writes[i:] {
		if j.base+w.pos >= to {
			break
		}
		if w.placed() {
			return true
		}
	}
	return false
}

// appliedBefore reports whether every placed append before LSN want is written in place.
func (j *journal) appliedBefore(want uint64) bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	for _, w := range j.placed {
		if j.base+w.pos >= want {
			break
		}
		if w.state.Load() != writeApplied {
			return false
		}
	}
	return true
}

// canVouch: no sync failed in this epoch since mark was read at the epoch's start. The caller
// holds commitMu.
func (d *Disk) canVouch(mark uint64) bool { return mark == d.cs.epochMark }

// vouched records v after a good sync: the next record names v.seq settled, and the parts
// may retire the placed appends before v.lsn. The caller holds commitMu.
func (d *Disk) vouched(v vouch) {
	d.jr.mu.Lock() // commitMu held since vouchable: no checkpoint began another epoch
	d.jr.placed = d.jr.placed[v.idx:]
	d.jr.mu.Unlock()
	d.cs.settled = uint32(min(v.seq, math.MaxUint32))
	if v.lsn > d.settled.Load() {
		d.settled.Store(v.lsn)
	}
}

// settleFor settles every placed append before LSN want, for a flush: the appends are
// committed (so their blocks are durable before their ciphertexts are in place), written in
// place, and synced, so that the flush's record names them settled. After a sync failed in
// the epoch, a checkpoint does it, writing the epoch's sectors again.
func (d *Disk) settleFor(want uint64) error {
	upTo := d.jr.unvouchedBefore(want)
	if upTo == 0 {
		return nil
	}
	if err := d.commit(false); err != nil {
		return err
	}
	for !d.jr.appliedBefore(want) {
		// The placed appends and, on their parts, the appends before them (claimed in
		// order); the appends after wait, read from memory, as they would have.
		if err := d.applyAhead(upTo); err != nil {
			return fmt.Errorf("failed to write data in place for a flush: %w", err)
		}
		if !d.jr.appliedBefore(want) {
			time.Sleep(20 * time.Microsecond) // a part is writing one of them
		}
	}
	d.commitMu.Lock()
	mark := d.syncs.mark()
	if !d.canVouch(mark) {
		d.commitMu.Unlock()
		return d.checkpoint()
	}
	v := d.jr.vouchable()
	err := d.syncs.since(mark)
	if err == nil {
		d.vouched(v)
	}
	d.commitMu.Unlock()
	if err != nil {
		return fmt.Errorf("failed to flush: %w", err)
	}
	return nil
}
