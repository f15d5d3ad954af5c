package engine

import (
	"errors"
	"fmt"
	"io"

	"github.com/sealdisk/sealdisk/dma"
	"github.com/sealdisk/sealdisk/sector"
)

// read serves cached sectors from the cache and decrypts the rest straight into the guest
// buffer: reads do not allocate cache lines (the cache is write-back, not read-allocate), so a
// large scan does not evict the dirty and recently written sectors that matter. Runs of whole
// uncached sectors are returned as an opening, performed after the shard is released.
func (p *part) read(desc *dma.Descriptor) (*opening, error) {
	ss := p.d.ss
	var o *opening
	for i := int64(0); i < int64(desc.Count); {
		if l := p.cached(desc.LBA + uint64(i)); l != nil {
			p.d.e.Stats.CacheHits.Add(1)
			p.lineLRU.touch(l)
			sp := spanOf(desc, i, ss)
			copy(desc.Buf[sp.lo:sp.hi], l.data[sp.off:])
			i++
			continue
		} else if r, ok := p.unappliedAt(desc.LBA + uint64(i)); ok {
			sp := spanOf(desc, i, ss)
			pt := p.ct[:ss]
			err := p.openUnapplied(r, desc.LBA+uint64(i), pt)
			if err == nil {
				copy(desc.Buf[sp.lo:sp.hi], pt[sp.off:])
			}
			clear(pt)
			if err != nil {
				if o != nil {
					o.release()
				}
				return nil, err
			}
			i++
			continue
		}
		j := i + 1 + p.uncached(desc.LBA+uint64(i+1), int64(desc.Count)-i-1)
		var err error
		if sp := runSpan(desc, i, j, ss); sp.len() == (j-i)*ss {
			o, err = p.addOpening(o, desc, i, j, sp)
		} else {
			err = p.readDirect(desc, i, j) // a partial sector: through p.ct, under the shard
		}
		if err != nil {
			if o != nil {
				o.release()
			}
			return nil, err
		}
		i = j
	}
	return o, nil
}

// load returns the cached line for lba, reading and authenticating it on a miss.
func (p *part) load(lba uint64) (*line, error) {
	if l := p.slots.line(lba); l != nil {
		p.d.e.Stats.CacheHits.Add(1)
		p.lineLRU.touch(l)
		return l, nil
	}
	d := p.d
	if r, ok := p.unappliedAt(lba); ok {
		l := p.newLine(lba)
		if err := p.openUnapplied(r, lba, l.data); err != nil {
			p.spare = append(p.spare, l)
			return nil, err
		}
		return p.insert(l), nil
	}
	d.e.Stats.CacheMisses.Add(1)
	// No read at all when the entry is zero (never written).
	ents, any, err := p.entries(p.ents[:0], lba, 1)
	p.ents = ents
	if err != nil {
		return nil, err
	}
	ct := p.ct[:d.ss]
	if any {
		if err := d.readSectors(ct, lba); err != nil {
			return nil, err
		}
	}
	l := p.newLine(lba)
	if err := d.c.Open(lba, l.data, ct, &ents[0]); err != nil {
		p.spare = append(p.spare, l)
		return nil, d.openFailed(nil, lba, err)
	}
	return p.insert(l), nil
}

// unappliedAt is lba's unapplied append, if it has one.
func (p *part) unappliedAt(lba uint64) (unappliedRef, bool) { return p.slots.ref(lba) }

// readDirect decrypts the uncached sectors i..j-1 of a read descriptor, at least one of them
// partial (an unaligned read), into the guest buffer through p.ct, under the shard. Runs of
// whole sectors are opened after the shard is released instead (opening).
func (p *part) readDirect(desc *dma.Descriptor, i, j int64) error {
	d := p.d
	a := desc.LBA + uint64(i)
	n := j - i
	d.e.Stats.CacheMisses.Add(uint64(n))
	ents, any, err := p.entries(p.ents[:0], a, int(n))
	p.ents = ents
	if err != nil {
		return err
	}
	sp := runSpan(desc, i, j, d.ss)
	run := p.ct[:n*d.ss]
	if any {
		if err := d.readSectors(run, a); err != nil {
			clear(run)
			return err
		}
	}
	err = d.c.OpenSectors(a, run, ents)
	if err == nil {
		copy(desc.Buf[sp.lo:sp.hi], run[sp.off:])
	}
	clear(run)
	if err != nil {
		return d.openFailed(desc.Buf, a, err)
	}
	return nil
}

// readSectors reads the ciphertext of the len(buf)/ss sectors from a on. A file that ends
// inside them (never-written sectors at the end of a sparse image) is not an error: those
// sectors' zero entries make them read as zeros whatever buf holds.
func (d *Disk) readSectors(buf []byte, a uint64) error {
	if _, err := d.st.ReadAt(buf, d.h.DataPos(a)); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("failed to read sectors %d-%d: %w", a, a+uint64(int64(len(buf))/d.ss)-1, err)
	}
	return nil
}

// openFailed clears a read's guest buffer (nil: none) after sectors from lba on failed to
// open and returns the read's error: ErrIntegrity, counted and logged, for an authentication
// failure (whose error names the sector).
func (d *Disk) openFailed(buf []byte, lba uint64, err error) error {
	clear(buf)
	if errors.Is(err, sector.ErrAuth) {
		d.e.Stats.AuthFailures.Add(1)
		d.e.opts.Logger.Error("sector failed authentication", "asid", d.asid, "lba", lba, "error", err)
		return fmt.Errorf("%w: %v", ErrIntegrity, err)
	}
	return err
}
