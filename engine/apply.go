package engine

import (
	"sync"
	"sync/atomic"

	"github.com/sealdisk/sealdisk/sector"
)

// A pendingWrite is one append to the journal by one part: its blocks as written (headers and
// ciphertexts), kept until they are applied in place — written to the data region, trims
// punched — which may happen only once a commit has made them durable (FORMAT.md §6.2). Until
// then the part records each of its sectors (p.slots.ref): a read of one without a cache line
// opens the append's ciphertext here, never the data region, which is stale.
type pendingWrite struct {
	p      *part
	buf    []byte // block headers and ciphertexts, as appended; placed: headers, then ciphertexts
	jlen   int    // bytes of buf that go to the journal (placed: the headers only)
	blocks []pendingBlock
	ents   []sector.LogEntry // every block's entries, back to back (the blocks' are views)
	pos    uint64            // its offset in its epoch's journal, set by journal.append
	end    uint64            // the LSN after it, set by journal.append
	// state is pending, applying or applied (tryApply): the part, a checkpoint before it
	// stops appends, or the checkpoint with appends stopped writes it in place, whoever claims
	// it; the part retires it once applied.
	state atomic.Int32
	seq0  uint64 // seq of its first block, set by journal.append
}

// placed: the write's ciphertexts go to the data region only, its journal blocks name the
// sectors' new and old entries (FORMAT.md §6.2).
func (w *pendingWrite) placed() bool { return w.blocks[0].kind == sector.BlockPlaced }

// A pendingWrite's states: whoever moves it from pending to applying writes it in place
// (with d.ckpt held shared, or exclusively by a checkpoint), then marks it applied, or pending
// again if that failed.
const (
	writePending int32 = iota
	writeApplying
	writeApplied
)

// pendingBlock is one block of a pendingWrite: header at buf[off:], then (kind data) the
// ciphertexts of ents, in order (ascending LBA).
type pendingBlock struct {
	off  int
	kind uint8
	ents []sector.LogEntry
}

var writeBufs = sync.Pool{New: func() any { return new([]byte) }}

// newPendingWrite lays out blocks for the given sectors (ascending): one block per
// sector.Entries(kind) sectors, a header then (data) the sectors' ciphertexts; placed, the
// headers back to back, then every ciphertext, so that contiguous sectors are one write in
// place. The caller seals into data(i) and sets ents[i].Entry (and, placed, ents[i].Old).
func newPendingWrite(p *part, kind uint8, lbas []uint64) *pendingWrite {
	ss := int(p.d.ss)
	per := sector.Entries(kind)
	n := 0
	for i := 0; i < len(lbas); i += per {
		n += sector.BlockLen(kind, min(per, len(lbas)-i), ss)
	}
	jlen := n
	if kind == sector.BlockPlaced {
		n += len(lbas) * ss
	}
	bp := writeBufs.Get().(*[]byte)
	if cap(*bp) < n+sector.TagSize { // the last sector seals its tag into the slack
		*bp = make([]byte, n+sector.TagSize)
	}
	ents := make([]sector.LogEntry, len(lbas))
	w := &pendingWrite{p: p, buf: (*bp)[:n], jlen: jlen, ents: ents}
	off := 0
	for i := 0; i < len(lbas); i += per {
		k := min(per, len(lbas)-i)
		for j := range k {
			ents[i+j].LBA = lbas[i+j]
		}
		w.blocks = append(w.blocks, pendingBlock{off: off, kind: kind, ents: ents[i : i+k]})
		off += sector.BlockLen(kind, k, ss)
	}
	return w
}

// data is the ciphertext slot of the write's i-th sector (kind data or placed), with TagSize
// bytes of capacity past it for sealing in place.
func (w *pendingWrite) data(i int) []byte {
	ss := int(w.p.d.ss)
	var lo int
	if w.placed() {
		lo = w.jlen + i*ss
	} else {
		b := w.blocks[i/sector.BlockEntries]
		lo = b.off + sector.BlockHeaderSize + (i%sector.BlockEntries)*ss
	}
	return w.buf[lo : lo+ss : lo+ss+sector.TagSize] // a tag spills into the next header, the next sector or the slack, all written later
}

// free returns the buffer to the pool (after applied, or when the append failed).
func (w *pendingWrite) free() {
	if w.buf != nil {
		b := w.buf[:0]
		writeBufs.Put(&b)
		w.buf = nil
	}
}

// tryApply writes w in place unless it is applied (true) or someone else is writing it (false):
// the claim keeps two writers from writing one append, or its buffer from being freed under the
// one writing it. The caller holds d.ckpt (shared or exclusively) and claims a part's appends in
// their order, stopping at one it cannot claim: the later of two appends of one sector must
// reach the data region last.
func (w *pendingWrite) tryApply(d *Disk) (bool, error) {
	if !w.state.CompareAndSwap(writePending, writeApplying) {
		return w.state.Load() == writeApplied, nil
	}
	if err := w.applyTo(d); err != nil {
		w.state.Store(writePending)
		return false, err
	}
	w.state.Store(writeApplied)
	return true, nil
}

// applyTo writes the write's ciphertexts in place and punches its trims, with the part's gate
// held, so no read opening those sectors outside the shard sees data change under the entry it
// took. Contiguous sectors go in one system call. The caller has claimed w (tryApply).
func (w *pendingWrite) applyTo(d *Disk) error {
	p := w.p
	p.gate.Lock()
	defer p.gate.Unlock()
	ss := d.ss
	if w.placed() {
		return forRuns(len(w.ents), func(i int) uint64 { return w.ents[i].LBA }, func(i, j int) error {
			return d.writeData(w.buf[w.jlen+i*int(ss):w.jlen+j*int(ss)], w.ents[i].LBA)
		})
	}
	for _, b := range w.blocks {
		ents := b.ents
		lba := func(i int) uint64 { return ents[i].LBA }
		var err error
		if b.kind == sector.BlockData {
			base := b.off + sector.BlockHeaderSize
			err = forRuns(len(ents), lba, func(i, j int) error {
				return d.writeData(w.buf[base+i*int(ss):base+j*int(ss)], ents[i].LBA)
			})
		} else {
			err = forRuns(len(ents), lba, func(i, j int) error {
				return d.punch(d.h.DataPos(ents[i].LBA), int64(j-i)*ss)
			})
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// applyCommitted applies the part's committed writes, oldest first, once its appends hold
// more than their bound (maxPending), and retires every applied one (a checkpoint applies
// them too). Below the bound they wait, read from memory: a commit's sync then writes the
// journal blocks and the record only, not the in-place writes since the last commit as well —
// with a guest that flushes every few writes, one sync per flush of half the bytes. A failure
// leaves the write pending (its sectors read from it), to be tried again: the journal holds
// it, and the checkpoint writes it in place before the journal is reused.
func (p *part) applyCommitted() error { return p.applyIf(p.pendingBytes-p.heldBytes > p.maxPending) }

// applyAll applies every committed write of the part (an idle part: nothing waits in memory
// for the next burst).
func (p *part) applyAll() error { return p.applyIf(true) }

// applyIf applies the committed writes, in order, when apply is set and retires the applied
// ones; a placed one stays (its ciphertexts in memory, p.heldBytes) until a sync has vouched
// for it, while the ones after it retire: retiring needs no order, only applying does.
func (p *part) applyIf(apply bool) error {
	d := p.d
	committed, settled := d.committed.Load(), d.settled.Load()
	var err error
	i, kept, held := 0, 0, 0
	for ; i < len(p.pending) && p.pending[i].end <= committed; i++ {
		w := p.pending[i]
		if w.state.Load() != writeApplied {
			if !apply {
				break
			}
			d.ckpt.RLock()
			done, aerr := w.tryApply(d)
			d.ckpt.RUnlock()
			if aerr != nil || !done { // !done: a checkpoint is writing it; retired later
				err = aerr
				break
			}
		}
		if w.placed() && w.end > settled {
			p.pending[kept] = w
			kept++
			held += len(w.buf)
			continue
		}
		p.retire(w)
	}
	if kept < i {
		n := copy(p.pending[kept:], p.pending[i:])
		clear(p.pending[kept+n:])
		p.pending = p.pending[:kept+n]
	}
	p.heldBytes = held
	return err
}

// retire forgets an applied write's sectors (those no later append or zeroing took over) and
// frees its buffer: their ciphertext is the data region's now.
func (p *part) retire(w *pendingWrite) {
	for i, e := range w.ents {
		p.slots.dropRef(e.LBA, unappliedRef{w: w, i: i}, true)
	}
	p.pendingBytes -= len(w.buf)
	w.free()
}

// unappliedRef is a sector's latest ciphertext in a journal append not yet applied in place:
// the i-th sector of w.
type unappliedRef struct {
	w *pendingWrite
	i int
}

// openUnapplied decrypts lba's sector from its unapplied append into dst (sector size, with
// TagSize bytes of capacity). The entry is the append's own, which the part's pages hold.
func (p *part) openUnapplied(r unappliedRef, lba uint64, dst []byte) error {
	p.d.e.Stats.CacheHits.Add(1)
	if err := p.d.c.Open(lba, dst, r.w.data(r.i), &r.w.ents[r.i].Entry); err != nil {
		return p.d.openFailed(nil, lba, err)
	}
	return nil
}
