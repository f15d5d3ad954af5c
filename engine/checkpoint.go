package engine

import (
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"slices"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/sector"
)

// checkpoint commits what is appended, writes every committed append in place and every
// metadata page and tree node changed since the last checkpoint, syncs, and starts the next
// epoch with a record of its own, synced before any block of it overwrites the journal
// (FORMAT.md §6.2 (4)). Most of its in-place writes come first, while appends go on
// (checkpointIf); the rest, the pages, the tree and the new epoch's record with d.ckpt held
// exclusively, so no append, and no one else's writing in place, runs in between. On failure
// nothing is lost: the epoch's record and journal stay current, and the next checkpoint starts
// over.
func (d *Disk) checkpoint() error { return d.checkpointIf(nil) }

// checkpointOf checkpoints the journal's epoch ep, unless a checkpoint has ended it meanwhile:
// the parts that find the journal full while one runs, and the background committer asked
// for one, do not checkpoint again the epoch that follows.
func (d *Disk) checkpointOf(ep uint64) error {
	if d.jr.epochNow() != ep {
		return nil
	}
	return d.checkpointIf(func() bool { return d.jr.epochNow() == ep })
}

// checkpointIf is checkpoint, done only if still (when given) holds once commitMu is held.
func (d *Disk) checkpointIf(still func() bool) error {
	// Commit, write the committed appends in place and sync, all while appends go on: the bulk
	// of what the checkpoint would write and sync with appends stopped — the in-place writes
	// above all — is on the disk before it stops them, and it writes and syncs only what came
	// after. A failure here is left to the steps below, which do it all again: a failed sync
	// is counted (syncer) and found there, as any failure in the epoch is.
	for range aheadRounds {
		from := d.jr.end()
		if d.commit(false) != nil {
			break
		}
		_ = d.applyAhead(math.MaxUint64)     // a failure is the steps' below to report
		if d.jr.end()-from <= d.jr.size/16 { // what came meanwhile is left for the steps below
			break
		}
	}
	_ = d.syncs.since(d.syncs.mark())
	d.commitMu.Lock()
	defer d.commitMu.Unlock()
	if still != nil && !still() {
		return nil
	}
	d.hashLeaves()
	d.ckpt.Lock()
	defer d.ckpt.Unlock()
	mark := d.syncs.mark()
	c, root := d.cutLocked()
	if err := d.broken.Load(); err != nil {
		return fmt.Errorf("failed to checkpoint: the disk's state in memory no longer matches its journal (%w); detach and attach it again", *err)
	}
	if err := d.jr.writeUnwritten(); err != nil {
		return fmt.Errorf("failed to checkpoint: %w", err)
	}
	if d.committed.Load() < c.end {
		if _, err := d.publishLocked(c, root, false); err != nil {
			return fmt.Errorf("failed to checkpoint: %w", err)
		}
	}
	if mark != d.cs.epochMark {
		// A sync failed in this epoch: in-place writes since its start may be lost on disk
		// although reads see them; write the whole epoch's blocks in place again.
		if err := d.reapply(c); err != nil {
			return fmt.Errorf("failed to checkpoint: %w", err)
		}
	}
	for _, w := range d.jr.writes {
		if _, err := w.tryApply(d); err != nil { // no claim is held: every claimer holds d.ckpt
			return fmt.Errorf("failed to checkpoint: %w", err)
		}
	}
	if err := d.meta.writeBack(d); err != nil {
		return fmt.Errorf("failed to checkpoint: %w", err)
	}
	if d.tree != nil {
		if err := d.tree.WriteBack(); err != nil {
			return fmt.Errorf("failed to checkpoint: %w", err)
		}
	}
	if err := d.syncs.since(mark); err != nil {
		return fmt.Errorf("failed to checkpoint: %w", err)
	}
	if err := d.nextEpochLocked(c.epoch+1, root); err != nil {
		return fmt.Errorf("failed to checkpoint: %w", err)
	}
	d.meta.forget()
	d.syncs.checkpointed(mark)
	return nil
}

// aheadRounds bounds a checkpoint's rounds of committing and writing in place before it stops
// appends: each round takes what was appended during the one before.
const aheadRounds = 4

// applyAhead writes this epoch's committed appends that end by upTo in place, before a
// checkpoint stops appends or for a flush's placed appends (settleFor), each claimed
// (tryApply) with d.ckpt held shared, in journal order; a part's appends after one it cannot
// claim (its part is writing it) or failed to write are left to the part and the checkpoint.
// It returns the first failure.
func (d *Disk) applyAhead(upTo uint64) error {
	d.jr.mu.Lock()
	ws := slices.Clone(d.jr.writes)
	d.jr.mu.Unlock()
	committed := min(d.committed.Load(), upTo)
	var stopped map[*part]bool
	var first error
	for _, w := range ws {
		if w.end > committed {
			break
		}
		if stopped[w.p] {
			continue
		}
		d.ckpt.RLock()
		done, err := w.tryApply(d)
		d.ckpt.RUnlock()
		if err != nil || !done {
			if stopped == nil {
				stopped = make(map[*part]bool)
			}
			stopped[w.p] = true
			if first == nil {
				first = err
			}
		}
	}
	return first
}

// nextEpochLocked writes and syncs the record of a new, empty epoch (head 0), then lets the
// journal start over. The caller holds commitMu and d.ckpt, and everything before is in place
// and synced.
func (d *Disk) nextEpochLocked(epoch uint64, root [32]byte) error {
	mark := d.syncs.mark()
	rec := format.RootFor(d.h)
	rec.Auth, rec.Seq, rec.Counter = format.RootByPSP, d.cs.seq+1, d.cs.counter
	rec.Epoch, rec.HeadDigest, rec.Root = epoch, sector.ChainStart(d.h.UUID, epoch), root
	if err := d.writeRoot(rec, 1-d.cs.slot); err != nil {
		return err
	}
	d.cs.seq++
	if err := d.syncs.since(mark); err != nil {
		return err
	}
	d.cs.slot = 1 - d.cs.slot
	d.cs.goodMark, d.cs.goodHead, d.cs.epochMark, d.cs.settled = mark, 0, mark, 0
	d.jr.reset(epoch)
	d.settled.Store(d.jr.end()) // every append before is in place and synced
	return nil
}

// reapply writes every sector of the epoch up to c in place again, its last version in the
// journal: a data block's ciphertext read from the journal, a zero block's sector punched, a
// placed block's ciphertext from its append in memory unless a good sync made it durable. Every
// part's gate is held: no read opening a sector outside its shard sees an older version of it
// pass by. The caller holds d.ckpt exclusively and commitMu.
func (d *Disk) reapply(c cut) error {
	for _, p := range d.parts {
		p.gate.Lock()
		defer p.gate.Unlock()
	}
	blocks, err := d.c.ReadLog(d.st, d.h, c.epoch, c.head, c.digest)
	if err != nil {
		return err
	}
	bySeq := map[uint64]*pendingWrite{}
	for _, w := range d.jr.writes {
		if w.placed() {
			for k := range w.blocks {
				bySeq[w.seq0+uint64(k)] = w
			}
		}
	}
	return d.writeVersions(blocks, lastVersions(blocks), func(b *sector.Block, i int) ([]byte, error) {
		if b.Seq < uint64(d.cs.settled) {
			return nil, nil // in place and synced before any sync failed
		}
		w := bySeq[b.Seq]
		if w == nil || w.buf == nil {
			return nil, fmt.Errorf("BUG: engine: placed block %d of the epoch has no append in memory", b.Seq)
		}
		return w.data(int(b.Seq-w.seq0)*sector.PlacedEntries + i)[:d.ss], nil
	})
}

// version is the version of a sector kept in place: blocks[b].Ents[i] (data: its ciphertext
// is written from the journal; zero: punched; placed: written as the caller gives it, or in
// place already), and the entry the sector's page gets.
type version struct {
	b, i  int
	entry sector.Entry
}

// lastVersions is each sector's last version in blocks.
func lastVersions(blocks []sector.Block) map[uint64]version {
	vs := map[uint64]version{}
	for bi, b := range blocks {
		for i, e := range b.Ents {
			vs[e.LBA] = version{bi, i, e.Entry}
		}
	}
	return vs
}

// writeVersions writes each sector's given version in place, in LBA order: a data block's
// ciphertext read from the journal, a zero block's sector punched — consecutive sectors of one
// data block, and consecutive zeroed sectors, in one call each — a placed block's ciphertext as
// placed gives it (nil: it is in place already). Only the one version of each sector is
// written: an older one written after a newer placed one would leave the older ciphertext
// under the newer entry.
func (d *Disk) writeVersions(blocks []sector.Block, vs map[uint64]version, placed func(b *sector.Block, i int) ([]byte, error)) error {
	ss := d.ss
	lbas := slices.Sorted(maps.Keys(vs))
	var buf []byte
	for k := 0; k < len(lbas); {
		lba, v := lbas[k], vs[lbas[k]]
		b := &blocks[v.b]
		m := k + 1 // [k, m): a run of one kind written in one call
		for b.Kind != sector.BlockPlaced && m < len(lbas) && lbas[m] == lbas[m-1]+1 {
			w := vs[lbas[m]]
			if blocks[w.b].Kind != b.Kind || b.Kind == sector.BlockData && (w.b != v.b || w.i != v.i+m-k) {
				break
			}
			m++
		}
		pos, n := d.h.DataPos(lba), int64(m-k)*ss
		switch b.Kind {
		case sector.BlockZero:
			if err := d.punch(pos, n); err != nil {
				return err
			}
		case sector.BlockData:
			buf = slices.Grow(buf[:0], int(n))[:n]
			if _, err := d.st.ReadAt(buf, b.DataPos+int64(v.i)*ss); err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("failed to read journal block %d: %w", b.Seq, err)
			}
			if err := d.writeData(buf, lba); err != nil {
				return err
			}
		case sector.BlockPlaced:
			if placed == nil {
				break
			}
			ct, err := placed(b, v.i)
			if err != nil {
				return err
			}
			if ct != nil {
				if err := d.writeData(ct, lba); err != nil {
					return err
				}
			}
		}
		k = m
	}
	return nil
}
