package engine

import (
	"sync"

	"github.com/sealdisk/sealdisk/dma"
	"github.com/sealdisk/sealdisk/sector"
)

// opening is the part of a read performed after its shard is released, by whoever performed
// the descriptor: runs of whole uncached sectors, each copied from the store straight into the
// guest buffer and opened there in place. Copying and AES are nearly all of a large read's
// cost; done outside the shard, they run on every core that has reads to do, while the shard
// serves other descriptors, so a burst of reads on one shard does not leave the other cores
// idle. The runs' entries are taken under the shard, and p.gate is read-held from then until
// release, so nothing changes those sectors' bytes in the store in between (part.gate).
type opening struct {
	p    *part
	buf  []byte // the descriptor's guest buffer
	runs []openRun
	ents []sector.Entry // runs' entries, back to back
}

// openRun is one run: guest buffer bytes [lo, hi) are whole sectors from lba on.
type openRun struct {
	lba    uint64
	lo, hi int64
	stored bool // some entry is non-zero, so the store is read (else the run is zeros)
}

var openingPool = sync.Pool{New: func() any { return new(opening) }}

// addOpening records sectors i..j-1 of desc, all whole and uncached (guest buffer bytes sp),
// for opening after the shard is released; o is nil for the descriptor's first run. On
// failure o is released. The shard is held.
func (p *part) addOpening(o *opening, desc *dma.Descriptor, i, j int64, sp span) (*opening, error) {
	a := desc.LBA + uint64(i)
	p.d.e.Stats.CacheMisses.Add(uint64(j - i))
	if o == nil {
		o = openingPool.Get().(*opening)
		o.p, o.buf = p, desc.Buf
		p.gate.RLock() // never waits: exclusive holders hold the shard, as the caller does
	}
	ents, any, err := p.entries(o.ents, a, int(j-i))
	o.ents = ents
	if err != nil {
		o.release()
		return nil, err
	}
	o.runs = append(o.runs, openRun{lba: a, lo: sp.lo, hi: sp.hi, stored: any})
	return o, nil
}

// run copies and opens every run, then releases o. The shard is not held.
func (o *opening) run() error {
	defer o.release()
	d := o.p.d
	ents := o.ents
	for _, r := range o.runs {
		// capped at the descriptor's end: OpenSectors may borrow bytes after a run, which
		// past the end belong to another descriptor
		buf := o.buf[r.lo:r.hi:len(o.buf)]
		n := (r.hi - r.lo) / d.ss
		if r.stored {
			if err := d.readSectors(buf, r.lba); err != nil {
				clear(o.buf)
				return err
			}
		}
		if err := d.c.OpenSectors(r.lba, buf, ents[:n]); err != nil {
			return d.openFailed(o.buf, r.lba, err)
		}
		ents = ents[n:]
	}
	return nil
}

// release ends the read's hold on the part and returns o to the pool.
func (o *opening) release() {
	o.p.gate.RUnlock()
	clear(o.ents)
	o.p, o.buf, o.runs, o.ents = nil, nil, o.runs[:0], o.ents[:0]
	openingPool.Put(o)
}
