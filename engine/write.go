package engine

import (
	"errors"
	"fmt"
	"time"

	"github.com/sealdisk/sealdisk/dma"
)

// write copies buf (nil: zeros) into cached sectors: whole sectors without reading, partial
// ones read-modify-write; the line of a sub-sector write is loaded and changed by this part
// alone, so no other writer of the sector can interleave. With FUA the touched sectors are
// written back and committed (with the counter advanced) before it returns. Then the cache is
// shrunk to its bound.
func (p *part) write(desc *dma.Descriptor, buf []byte) error {
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
