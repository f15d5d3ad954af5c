package engine

import (
	"errors"
	"fmt"
	"io"
	"sync/atomic"

	"github.com/sealdisk/sealdisk/sector"
)

// Unsettled sectors (FORMAT.md §6, "A store error after step (1)"): a write-back or zeroing
// that failed after its journal record was durable leaves its sectors with data and entry that
// may disagree, and only the record says how to reconcile them. Each part keeps its unsettled
// sectors' records until settle does what recovery would; until then the disk refuses
// checkpoints, which would retire the records a crash needs. Every write-back and zeroing
// settles its part first, so a part holds at most one failed batch however long the store
// keeps failing. A sector unsettled by a write-back also keeps its dirty line.

// pending is the journal record of an unsettled sector: zero, or a write from old to new.
type pending struct {
	zero     bool
	old, new sector.Entry
}

// unsettledCount counts a disk's unsettled sectors over all its parts and keeps the store
// error that left the latest of them, for the checkpoint's refusal.
type unsettledCount struct {
	n     atomic.Int64
	cause atomic.Pointer[error]
}

// add adds n (negative: settled); cause, when set, is the store error behind it.
func (u *unsettledCount) add(n int64, cause error) {
	if cause != nil {
		u.cause.Store(&cause)
	}
	u.n.Add(n)
}

func (u *unsettledCount) count() int64 { return u.n.Load() }

// refusal is the checkpoint's error while any sector is unsettled, else nil.
func (u *unsettledCount) refusal() error {
	n := u.n.Load()
	if n <= 0 {
		return nil
	}
	cause := errors.New("a write-back failed")
	if c := u.cause.Load(); c != nil {
		cause = *c
	}
	return fmt.Errorf("journal kept: %d sectors not yet rewritten after a failed write-back: %w", n, cause)
}

// markUnsettled records that lba's journaled operation r failed part-way (cause). Write-backs
// and zeroings settle their part before journaling, so a sector is unsettled by one record at
// a time; were it not, the later record is the one recovery applies last.
func (p *part) markUnsettled(lba uint64, r pending, cause error) {
	if p.unsettled == nil {
		p.unsettled = map[uint64]pending{}
	}
	if _, ok := p.unsettled[lba]; !ok {
		p.d.unsettled.add(1, cause)
	}
	p.unsettled[lba] = r
}

// settle finishes what recovery would for every unsettled sector, in the cached page and on
// disk: a zeroing gets its zero entry and punched data; a write-back the entry that
// authenticates the data on disk (sector.Cipher.Authentic). The sector's record is still live
// (checkpoints wait for settling), so a crash in between recovers the same decision. A sector
// that authenticates with neither was damaged by more than a failed write: its entry is left
// alone and its reads fail until it is rewritten.
func (p *part) settle() error {
	if len(p.unsettled) == 0 {
		return nil
	}
	d := p.d
	// not p.ct: settle runs in the middle of a write-back whose sealed batch is there
	ct := make([]byte, d.ss, d.ss+sector.TagSize)
	pt := make([]byte, d.ss, d.ss+sector.TagSize)
	defer clear(pt)
	for lba, r := range p.unsettled {
		pg, err := p.page(lba / entriesPerPage)
		if err != nil {
			return err
		}
		e := &pg.e[lba%entriesPerPage]
		if r.zero {
			*e = sector.Entry{}
		} else {
			n, err := d.st.ReadAt(ct, d.h.DataPos(lba))
			if err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("failed to read sector %d to settle it: %w", lba, err)
			}
			clear(ct[n:])
			if v, ok := d.c.Authentic(lba, pt, ct, &r.old, &r.new); ok {
				*e = v
			} else {
				d.e.opts.Logger.Error("sector authenticates with neither entry of its failed write-back", "asid", d.asid, "lba", lba)
			}
		}
		if err := p.writePage(pg); err != nil {
			return err
		}
		if r.zero {
			p.gate.Lock()
			err := d.punch(d.h.DataPos(lba), d.ss)
			p.gate.Unlock()
			if err != nil {
				return err
			}
		}
		p.settled(lba)
	}
	return nil
}

// settled drops lba from the unsettled set: its operation is complete on disk.
func (p *part) settled(lba uint64) {
	if _, ok := p.unsettled[lba]; ok {
		delete(p.unsettled, lba)
		p.d.unsettled.add(-1, nil)
	}
}
