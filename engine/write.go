package engine

import (
	"errors"
	"fmt"
	"time"

	"github.com/sealdisk/sealdisk/dma"
	"github.com/sealdisk/sealdisk/sector"
)

// write copies buf (nil: zeros) into cached sectors: whole sectors without reading, partial
// ones read-modify-write; the line of a sub-sector write is loaded and changed by this part
// alone, so no other writer of the sector can interleave. With FUA the touched sectors are
// written back and committed (with the counter advanced) before it returns. Then the cache is
// shrunk to its bound.
func (p *part) write(desc *dma.Descriptor, buf []byte) error {
	if done, err := p.writeDirect(desc, buf); done {
		return err
	}
	ss := p.d.ss
	var touched, repair []*line
	now := time.Now()
	for i := int64(0); i < int64(desc.Count); i++ {
		lba := desc.LBA + uint64(i)
		sp := spanOf(desc, i, ss)
		var l *line
		if sp.len() == ss {
			if l = p.cached(lba); l == nil {
				idx := lba / entriesPerPage
				if _, err := p.page(idx); err != nil {
					// A page that fails verification is replaced only by a write of all its
					// sectors, written back at once, so no entry of it is ever read.
					if !errors.Is(err, ErrIntegrity) || !p.whole(idx, desc.LBA, uint64(desc.Count)) {
						return err
					}
					l = p.insert(p.newLine(lba))
					repair = append(repair, l)
				} else {
					l = p.insert(p.newLine(lba))
				}
			} else {
				p.lineLRU.touch(l)
			}
		} else {
			var err error
			if l, err = p.load(lba); err != nil {
				return err
			}
		}
		if buf != nil {
			copy(l.data[sp.off:], buf[sp.lo:sp.hi])
		} else {
			clear(l.data[sp.off : sp.off+sp.len()])
		}
		p.markDirty(l, now)
		if desc.Flags&dma.FUA != 0 {
			touched = append(touched, l)
		}
	}
	if len(repair) > 0 {
		if err := p.writeback(repair, false); err != nil {
			return err
		}
	}
	if len(touched) > 0 {
		if err := p.writeback(touched, false); err != nil {
			return err
		}
		if err := p.d.commit(true); err != nil {
			return fmt.Errorf("failed to commit FUA write: %w", err)
		}
	}
	return p.shrink()
}

// writeDirect seals a write of whole sectors, at least a placed run of them (Options.
// PlacedBytes) and without FUA, straight from the guest's buffer into one placed append, as
// the cache's pressure would write those sectors back later (writebackKind): no line is
// filled, so there is no copy into the cache, no eviction and no second pass over the bytes,
// and a stream of large writes does not push the cache's other lines out. The sectors' lines,
// if any, are dropped once the append has taken effect: it supersedes them, and reads open it
// until it is in place (p.slots.ref). done is false when the write must take the cache's
// path: not eligible, or a page of its sectors cannot be read (the cache's path repairs a page
// replaced whole, or fails the write with the page's error).
func (p *part) writeDirect(desc *dma.Descriptor, buf []byte) (done bool, err error) {
	d := p.d
	n := int(desc.Count)
	if d.placedRun == 0 || n < d.placedRun || buf == nil || desc.Flags&dma.FUA != 0 ||
		desc.Head != 0 || int64(desc.Len) != int64(n)*d.ss {
		return false, nil
	}
	if err := p.applyCommitted(); err != nil {
		return true, err
	}
	p.lbas = p.lbas[:0]
	for i := range n {
		p.lbas = append(p.lbas, desc.LBA+uint64(i))
	}
	ss := int(d.ss)
	w, err := p.sealWrite(sector.BlockPlaced, p.lbas, func(i int) []byte { return buf[i*ss : (i+1)*ss] })
	if err != nil {
		return false, nil // a page of the sectors cannot be read
	}
	if err := p.appendWrite(w); err != nil {
		return true, err
	}
	for i := range n {
		lba := desc.LBA + uint64(i)
		if l := p.cached(lba); l != nil {
			p.drop(l)
		}
		p.slots.setRef(lba, unappliedRef{w: w, i: i})
	}
	d.e.Stats.Placed.Add(uint64(n))
	d.e.Stats.Direct.Add(uint64(n))
	return true, p.relieve(false)
}
