package engine

import (
	"fmt"
	"sync"
	"time"

	"github.com/sealdisk/sealdisk/dma"
)

// shard is one coprocessor: a submission ring, a worker that performs descriptors in
// batches, and a completion ring drained by the interrupt handler.
//
// A submitter that finds the shard free performs its descriptor itself (inline) instead of
// queueing it: the worker would do exactly the same work, but three goroutine hand-offs (to
// the worker, to the interrupt handler, back to the submitter) cost a core several
// microseconds per request. own makes the two exclusive, so a part is still touched by one
// goroutine at a time. A descriptor performed inline may overtake one still queued: both are
// in flight at once, and the block-device contract orders only a request against those that
// completed before it was submitted.
//
// A read holds the shard only to take its sectors' entries and serve cache hits; copying and
// opening the uncached sectors (opening) happens after own is released, so several cores
// can open one shard's reads at a time.
type shard struct {
	e   *Engine
	id  int
	sq  *dma.Ring  // submission
	cq  *dma.Ring  // completion
	own sync.Mutex // held while performing a descriptor or idle work; guards the shard's parts
}

const batchSize = 32

func (s *shard) run() {
	buf := make([]*dma.Descriptor, batchSize)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	tick := max(s.e.opts.IdleFlush/2, 10*time.Millisecond)
	for {
		ds, closed := s.sq.PopBatch(buf, tick, timer)
		if closed {
			s.cq.Close()
			return
		}
		if len(ds) == 0 {
			s.own.Lock()
			s.idle()
			s.own.Unlock()
			continue
		}
		for i, d := range ds {
			s.own.Lock()
			o, err := s.do(d)
			s.own.Unlock()
			d.Status = s.finish(d, o, err)
			if err := s.cq.Push(d); err != nil {
				panic("BUG: engine: completion ring closed under a running shard")
			}
			ds[i] = nil
		}
	}
}

// inline performs desc on the calling goroutine and completes it, if the shard is free; else
// it reports false and the caller queues desc.
func (s *shard) inline(desc *dma.Descriptor) bool {
	if !s.own.TryLock() {
		return false
	}
	o, err := s.do(desc)
	s.own.Unlock()
	desc.Status = s.finish(desc, o, err)
	desc.Complete(desc)
	return true
}

// finish completes a descriptor after the shard is released: a read's opening (nil: none),
// then, with the memory-encryption stage, the read's payload sealed into guest memory. err is
// what the part of the descriptor performed under the shard returned.
func (s *shard) finish(desc *dma.Descriptor, o *opening, err error) error {
	if o != nil {
		err = o.run()
	}
	if err == nil && s.e.mem != nil && desc.Op == dma.OpRead {
		// ... and encrypts what the coprocessor writes into guest memory
		if err = s.e.mem.Seal(desc); err != nil {
			s.e.Stats.PermissionDenials.Add(1)
			err = fmt.Errorf("%w: %v", ErrPermission, err)
		}
	}
	return err
}

// idle writes back sectors dirty for longer than the idle time.
func (s *shard) idle() {
	cutoff := time.Now().Add(-s.e.opts.IdleFlush)
	for _, d := range *s.e.live.Load() {
		if d.closing() {
			continue
		}
		p := d.parts[s.id]
		if err := p.flushDirty(cutoff); err != nil {
			d.e.opts.Logger.Error("idle write-back failed", "asid", d.asid, "error", err)
		}
	}
}

// do performs one descriptor under the shard, all but a read's opening, which it returns for
// finish (nil, unless err is nil). The operation runs only when the descriptor's ASID has a
// key loaded, the key is this disk's, and the operation is valid for the disk.
func (s *shard) do(desc *dma.Descriptor) (*opening, error) {
	d, ok := desc.Target.(*Disk)
	if !ok {
		panic("BUG: engine: descriptor without a disk")
	}
	p := d.parts[s.id]
	if desc.Op == opDetach {
		p.zeroise()
		return nil, nil
	}
	if s.e.observe != nil {
		s.e.observe(desc)
	}
	ks := s.e.slot(desc.ASID)
	if ks == nil || ks.cipher != d.c {
		s.e.Stats.PermissionDenials.Add(1)
		return nil, fmt.Errorf("%w (ASID %d)", ErrPermission, desc.ASID)
	}
	end := desc.LBA + uint64(desc.Count)
	if end > d.sectors || end < desc.LBA {
		return nil, fmt.Errorf("sectors %d+%d on a %d-sector disk: %w", desc.LBA, desc.Count, d.sectors, ErrOutOfRange)
	}
	write := desc.Op == dma.OpWrite || desc.Op == dma.OpTrim || desc.Op == dma.OpZero
	if write && d.readOnly {
		return nil, ErrReadOnly
	}
	mem := s.e.mem != nil && (desc.Op == dma.OpRead || desc.Op == dma.OpWrite)
	if mem && desc.Op == dma.OpWrite {
		// the memory controller decrypts the payload as the coprocessor reads guest memory
		if err := s.e.mem.Open(desc); err != nil {
			s.e.Stats.PermissionDenials.Add(1)
			return nil, fmt.Errorf("%w: %v", ErrPermission, err)
		}
	}
	var o *opening
	var err error
	switch desc.Op {
	case dma.OpRead:
		o, err = s.read(p, desc)
	case dma.OpWrite:
		err = s.write(p, desc, desc.Buf)
	case dma.OpFlush:
		err = p.flushDirty(time.Time{})
	case opSettle:
		err = p.settle()
	case dma.OpTrim, dma.OpZero:
		err = s.zero(p, desc)
	case dma.OpStatus:
		err = s.status(p, desc)
	default:
		panic(fmt.Sprintf("BUG: engine: unknown op %d", desc.Op))
	}
	if err == nil && write {
		err = p.shrink()
	}
	return o, err
}

// span is the part of sector i (0-based in the descriptor) covered by the guest buffer:
// buf[bLo:bHi] maps to sector bytes [sLo, sLo+bHi-bLo).
func span(desc *dma.Descriptor, i int64, ss int64) (bLo, bHi, sLo int64) {
	start := i*ss - int64(desc.Head) // sector i's first byte, relative to the buffer
	bLo = max(0, start)
	bHi = min(int64(desc.Len), start+ss)
	return bLo, bHi, bLo - start
}

// read serves cached sectors from the cache and decrypts the rest straight into the guest
// buffer: reads do not allocate cache lines (the cache is write-back, not read-allocate), so a
// large scan does not evict the dirty and recently written sectors that matter. Runs of whole
// uncached sectors are returned as an opening, performed after the shard is released.
func (s *shard) read(p *part, desc *dma.Descriptor) (*opening, error) {
	ss := p.d.ss
	var o *opening
	for i := int64(0); i < int64(desc.Count); {
		if l := p.cached(desc.LBA + uint64(i)); l != nil {
			p.d.e.Stats.CacheHits.Add(1)
			p.lineLRU.touch(l)
			bLo, bHi, sLo := span(desc, i, ss)
			copy(desc.Buf[bLo:bHi], l.data[sLo:])
			i++
			continue
		}
		j := i + 1 + p.uncached(desc.LBA+uint64(i+1), int64(desc.Count)-i-1)
		var err error
		bLo, _, _ := span(desc, i, ss)
		_, bHi, _ := span(desc, j-1, ss)
		if bHi-bLo == (j-i)*ss {
			o, err = p.addOpening(o, desc, i, j, bLo, bHi)
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

// write copies buf (nil: zeros) into cached sectors: whole sectors without reading,
// partial ones read-modify-write. With FUA the touched sectors are written back and synced.
func (s *shard) write(p *part, desc *dma.Descriptor, buf []byte) error {
	ss := p.d.ss
	var touched []*line
	now := time.Now()
	for i := int64(0); i < int64(desc.Count); i++ {
		lba := desc.LBA + uint64(i)
		bLo, bHi, sLo := span(desc, i, ss)
		var l *line
		if bHi-bLo == ss {
			if l = p.cached(lba); l == nil {
				l = p.insert(p.newLine(lba))
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
			copy(l.data[sLo:], buf[bLo:bHi])
		} else {
			clear(l.data[sLo : sLo+bHi-bLo])
		}
		p.markDirty(l, now)
		if desc.Flags&dma.FUA != 0 {
			touched = append(touched, l)
		}
	}
	if len(touched) > 0 {
		fails := p.d.syncFails.Load()
		if err := p.writeback(touched); err != nil {
			return err
		}
		if err := p.d.syncSince(fails); err != nil {
			return fmt.Errorf("failed to sync FUA write: %w", err)
		}
	}
	return nil
}

// zero handles trim and write-zeroes: whole sectors become holes (or, with NoHole, written
// zeros); partial sectors are zeroed by read-modify-write. Cached lines of whole sectors are
// dropped only once their holes are in place: a dirty line may be the only thing that can
// still repair its sector (a write-back that failed part-way), and a failed trim leaves its
// range as it was or zero, never unreadable.
func (s *shard) zero(p *part, desc *dma.Descriptor) error {
	ss := p.d.ss
	if desc.Flags&dma.NoHole != 0 {
		return s.write(p, desc, nil) // Buf is nil: zeros
	}
	// Settled first, like a write-back: an unsettled sector's entry is then the one on disk,
	// so the entries below say which sectors need a hole, and at most one failed batch is
	// ever unsettled per part however long the store keeps failing.
	if err := p.settle(); err != nil {
		return err
	}
	var holes []uint64
	for i := int64(0); i < int64(desc.Count); i++ {
		lba := desc.LBA + uint64(i)
		bLo, bHi, sLo := span(desc, i, ss)
		if bHi-bLo < ss {
			l, err := p.load(lba)
			if err != nil {
				return err
			}
			clear(l.data[sLo : sLo+bHi-bLo])
			p.markDirty(l, time.Now())
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
		if bLo, bHi, _ := span(desc, i, ss); bHi-bLo == ss {
			if l := p.lines[desc.LBA+uint64(i)]; l != nil {
				p.drop(l)
			}
		}
	}
	return nil
}

func (s *shard) status(p *part, desc *dma.Descriptor) error {
	for i := int64(0); i < int64(desc.Count); i++ {
		lba := desc.LBA + uint64(i)
		allocated := false
		if l := p.cached(lba); l != nil && l.dirty {
			allocated = true
		} else {
			e, err := p.entry(lba)
			if err != nil {
				return err
			}
			allocated = !e.IsZero()
		}
		if allocated {
			desc.Buf[i] = 1
		} else {
			desc.Buf[i] = 0
		}
	}
	return nil
}
