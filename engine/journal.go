package engine

import (
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/sealdisk/sealdisk/sector"
)

// journal is the writer of a version-2 image's data journal (FORMAT.md §6.2): write-backs and
// zeroings append blocks without a sync; commits (commit.go) make them durable; checkpoints
// (checkpoint.go) write them in place and start the next epoch. The blocks' bytes belong to
// package sector.
//
// Positions are LSNs: bytes appended since the disk was attached, across epochs, so that
// "committed up to" compares whatever epoch a write was appended in.
type journal struct {
	d    *Disk
	size uint64 // bytes of the journal region (Options.journalBytes in tests)

	mu     sync.Mutex // guards everything below; an append claims its place under it and writes after
	epoch  uint64
	head   uint64   // bytes appended in this epoch
	seq    uint64   // seq of the next block
	digest [32]byte // chain digest after the last block appended
	base   uint64   // LSN of this epoch's position 0
	// writes is this epoch's appends in order, for the checkpoint (applied or not).
	writes []*pendingWrite
	// unwritten are appends whose write to the journal failed: the next commit writes them
	// again from their buffers before its record (they are in the chain already).
	unwritten []*pendingWrite
	// placed is this epoch's placed appends, in order, that no good sync has vouched for yet
	// (settle.go).
	placed []*pendingWrite
}

// errJournalFull: the append does not fit before the end of the journal region; the caller
// checkpoints and appends again.
var errJournalFull = errors.New("journal full")

// epochNow is the journal's current epoch.
func (j *journal) epochNow() uint64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.epoch
}

// reset starts epoch at position 0 (after recovery or a checkpoint); LSNs go on growing.
func (j *journal) reset(epoch uint64) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.base += j.head
	j.epoch, j.head, j.seq = epoch, 0, 0
	j.digest = sector.ChainStart(j.d.h.UUID, epoch)
	j.writes, j.unwritten, j.placed = nil, nil, nil
}

// end is the LSN after the last block appended.
func (j *journal) end() uint64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.base + j.head
}

// append claims w's place at the journal's end, fills in its block headers (the chain) and
// writes it, without a sync. The place is claimed under mu and the bytes written after it is
// released, so the shards' appends write side by side: a commit's cut holds d.ckpt exclusively,
// which every append holds shared until it returns, so no append is half-written when a commit
// names the journal's end. A write that fails does not fail the append — its entries take
// effect and its bytes stay in w.buf — but the next commit writes it again first, and does not
// commit until that succeeds. errJournalFull (nothing claimed) when w does not fit.
func (j *journal) append(w *pendingWrite) error {
	j.mu.Lock()
	if j.head+uint64(w.jlen) > j.size {
		j.mu.Unlock()
		return errJournalFull
	}
	pos, seq, prev := j.head, j.seq, j.digest
	w.seq0 = seq
	for _, b := range w.blocks {
		hdr := w.buf[b.off : b.off+sector.BlockHeaderSize]
		prev = sector.MarshalBlockHeader(hdr, b.kind, j.epoch, seq, pos+uint64(b.off), prev, b.ents)
		seq++
	}
	j.head += uint64(w.jlen)
	j.seq, j.digest = seq, prev
	w.pos, w.end = pos, j.base+j.head
	j.writes = append(j.writes, w)
	if w.placed() {
		j.placed = append(j.placed, w)
	}
	filling, epoch := j.head > j.size/2, j.epoch
	j.mu.Unlock()
	if filling {
		j.d.requestCheckpoint(epoch)
	}
	if _, err := j.d.st.WriteAt(w.buf[:w.jlen], j.d.h.JournalPos(pos)); err != nil {
		j.d.e.opts.Logger.Warn("journal write failed; the next commit writes it again", "asid", j.d.asid, "error", err)
		j.mu.Lock()
		j.unwritten = append(j.unwritten, w)
		j.mu.Unlock()
	}
	return nil
}

// writeUnwritten writes the appends whose journal write failed again. The caller holds d.ckpt
// exclusively (no append runs).
func (j *journal) writeUnwritten() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	for len(j.unwritten) > 0 {
		w := j.unwritten[0]
		if _, err := j.d.st.WriteAt(w.buf[:w.jlen], j.d.h.JournalPos(w.pos)); err != nil {
			return fmt.Errorf("failed to write the journal: %w", err)
		}
		j.unwritten = j.unwritten[1:]
	}
	return nil
}

// cut is the state a commit records: the caller holds d.ckpt exclusively, so every append is
// whole and its entries are in the tree.
type cut struct {
	epoch, head uint64
	digest      [32]byte
	end         uint64 // LSN
}

func (j *journal) cutNow() cut {
	j.mu.Lock()
	defer j.mu.Unlock()
	return cut{epoch: j.epoch, head: j.head, digest: j.digest, end: j.base + j.head}
}

// rewrite writes the journal's bytes [from, to) of this epoch again, as reads see them: after
// a failed sync the page cache may hold blocks the disk never got, and no later sync writes
// them unless they are written again (syncs.go).
func (j *journal) rewrite(from, to uint64) error {
	if from >= to {
		return nil
	}
	buf := make([]byte, min(to-from, 1<<20))
	for pos := from; pos < to; {
		b := buf[:min(uint64(len(buf)), to-pos)]
		if _, err := j.d.st.ReadAt(b, j.d.h.JournalPos(pos)); err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("failed to read the journal to write it again: %w", err)
		}
		if _, err := j.d.st.WriteAt(b, j.d.h.JournalPos(pos)); err != nil {
			return fmt.Errorf("failed to write the journal again: %w", err)
		}
		pos += uint64(len(b))
	}
	return nil
}
