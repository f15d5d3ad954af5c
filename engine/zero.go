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
// zeros), journaled as zero blocks and punched once committed; partial sectors are zeroed by
// read-modify-write. With FUA the range is committed on return.
func (p *part) zero(desc *dma.Descriptor) error {
	if desc.Flags&dma.NoHole != 0 {
		return p.write(desc, nil) // zeros
	}
	if err := p.applyCommitted(); err != nil {
		return err
	}
	ss := p.d.ss
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
		switch {
		case err != nil && errors.Is(err, ErrIntegrity) && p.whole(lba/entriesPerPage, desc.LBA, uint64(desc.Count)):
			holes = append(holes, lba) // the whole page is trimmed: it replaces one that fails verification
		case err != nil:
			return err
		case !e.IsZero() || p.cached(lba) != nil:
			holes = append(holes, lba)
		}
	}
	if err := p.zeroSectors(holes); err != nil {
		return err
	}
	if desc.Flags&dma.FUA != 0 {
		if err := p.writeback(partial, false); err != nil {
			return err
		}
		if err := p.d.commit(true); err != nil {
			return fmt.Errorf("failed to commit FUA zeroing: %w", err)
		}
	}
	return p.shrink()
}

// zeroSectors journals whole sectors as zero blocks and gives them zero entries; their lines
// are dropped and an earlier unapplied append of theirs forgotten, so they read as zeros (a
// zero entry is never opened from data).
func (p *part) zeroSectors(lbas []uint64) error {
	for len(lbas) > 0 {
		n := min(len(lbas), maxWriteback)
		batch := lbas[:n]
		lbas = lbas[n:]
		w := newPendingWrite(p, sector.BlockZero, batch)
		if err := p.appendWrite(w); err != nil {
			return err
		}
		for _, lba := range batch {
			p.slots.dropRef(lba, unappliedRef{}, false)
			if l := p.slots.line(lba); l != nil {
				p.drop(l)
			}
		}
	}
	return nil
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
