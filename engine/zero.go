package engine

import (
	"errors"
	"fmt"
	"time"

	"github.com/sealdisk/sealdisk/dma"
	"github.com/sealdisk/sealdisk/sector"
	"github.com/sealdisk/sealdisk/store"
)

// zero handles trim and write-zeroes: whole sectors become holes (or, with NoHole, written
// zeros); partial sectors are zeroed by read-modify-write. Cached lines of whole sectors are
// dropped only once their holes are in place: a dirty line may be the only thing that can
// still repair its sector (a write-back that failed part-way), and a failed trim leaves its
// range as it was or zero, never unreadable. With FUA the range is durable on return.
func (p *part) zero(desc *dma.Descriptor) error {
	if desc.Flags&dma.NoHole != 0 {
		return p.write(desc, nil) // zeros
	}
	ss := p.d.ss
	// Settled first, like a write-back: an unsettled sector's entry is then the one on disk,
	// so the entries below say which sectors need a hole.
	if err := p.settle(); err != nil {
		return err
	}
	mark := p.d.syncs.mark()
	var holes []uint64
	var partial []*line
	for i := int64(0); i < int64(desc.Count); i++ {
		lba := desc.LBA + uint64(i)
		sp := spanOf(desc, i, ss)
		if sp.len() < ss {
			l, err := p.load(lba)
			if err != nil {
				return err
			}
			clear(l.data[sp.off : sp.off+sp.len()])
			p.markDirty(l, time.Now())
			partial = append(partial, l)
			continue
		}
		e, err := p.entry(lba)
		if err != nil {
			return err
		}
		if !e.IsZero() {
			holes = append(holes, lba)
		}
	}
	if err := p.zeroSectors(holes); err != nil {
		return err
	}
	for i := int64(0); i < int64(desc.Count); i++ {
		if spanOf(desc, i, ss).len() == ss {
			if l := p.lines[desc.LBA+uint64(i)]; l != nil {
				p.drop(l)
			}
		}
	}
	if desc.Flags&dma.FUA != 0 {
		if err := p.writeback(partial); err != nil {
			return err
		}
		if err := p.d.syncs.since(mark); err != nil {
			return fmt.Errorf("failed to sync FUA zeroing: %w", err)
		}
	}
	return p.shrink()
}

// zeroSectors turns whole sectors into holes: journal zero records, then zero entries and
// punched data. The caller (zero) has settled the part.
func (p *part) zeroSectors(lbas []uint64) error {
	d := p.d
	for len(lbas) > 0 {
		n := min(len(lbas), p.batchMax())
		batch := lbas[:n]
		lbas = lbas[n:]
		recs := p.jrecs[:0]
		for _, lba := range batch {
			old, err := p.entry(lba)
			if err != nil {
				return err
			}
			recs = append(recs, sector.JournalRecord{Kind: sector.RecordZero, LBA: lba, Old: *old})
		}
		p.jrecs = recs
		d.ckpt.RLock()
		err := func() error {
			if err := p.journal(recs); err != nil {
				return err
			}
			if err := p.zeroInPlace(recs); err != nil {
				// The zero records are durable: recovery would finish them, so settle must.
				for _, lba := range batch {
					p.markUnsettled(lba, pending{zero: true}, err)
				}
				return err
			}
			return nil
		}()
		d.ckpt.RUnlock()
		if err != nil {
			return err
		}
		for _, lba := range batch {
			p.settled(lba)
		}
	}
	return nil
}

// zeroInPlace gives journaled sectors zero entries (each touched page written once), then
// punches their data (contiguous runs at once).
func (p *part) zeroInPlace(recs []sector.JournalRecord) error {
	d := p.d
	if err := p.setEntries(recs); err != nil {
		return err
	}
	p.gate.Lock()
	defer p.gate.Unlock()
	return forRuns(len(recs), func(i int) uint64 { return recs[i].LBA }, func(i, j int) error {
		return d.punch(d.h.DataPos(recs[i].LBA), int64(j-i)*d.ss)
	})
}

// punch deallocates a range; filesystems without hole punching get zeros written instead.
func (d *Disk) punch(off, n int64) error {
	err := d.st.Punch(off, n)
	if errors.Is(err, store.ErrPunchUnsupported) {
		_, err = d.st.WriteAt(make([]byte, n), off)
	}
	if err != nil {
		return fmt.Errorf("failed to punch: %w", err)
	}
	return nil
}
