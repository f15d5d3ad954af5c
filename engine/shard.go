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
		if err := d.parts[s.id].idle(cutoff); err != nil {
			d.e.opts.Logger.Error("idle write-back failed", "asid", d.asid, "error", err)
		}
	}
}

// do performs one descriptor under the shard, all but a read's opening, which it returns for
// finish (nil, unless err is nil). It runs only descriptors check admits.
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
	if err := s.check(d, desc); err != nil {
		return nil, err
	}
	switch desc.Op {
	case dma.OpRead:
		return p.read(desc)
	case dma.OpWrite:
		return nil, p.write(desc, desc.Buf)
	case dma.OpTrim, dma.OpZero:
		return nil, p.zero(desc)
	case dma.OpStatus:
		return nil, p.status(desc)
	case dma.OpFlush:
		return nil, p.flushDirty(time.Time{})
	}
	panic(fmt.Sprintf("BUG: engine: unknown op %d", desc.Op))
}

// check is the coprocessor's admission of a descriptor: its ASID has a key loaded and the key
// is this disk's (else ErrPermission: it is never processed with another key), its sectors
// are on the disk, a write-class op is on a writable disk; with the memory-encryption stage,
// a write's payload is decrypted from guest memory here, as the coprocessor reads it.
func (s *shard) check(d *Disk, desc *dma.Descriptor) error {
	ks := s.e.slot(desc.ASID)
	if ks == nil || ks.cipher != d.c {
		s.e.Stats.PermissionDenials.Add(1)
		return fmt.Errorf("%w (ASID %d)", ErrPermission, desc.ASID)
	}
	end := desc.LBA + uint64(desc.Count)
	if end > d.sectors || end < desc.LBA {
		return fmt.Errorf("sectors %d+%d on a %d-sector disk: %w", desc.LBA, desc.Count, d.sectors, ErrOutOfRange)
	}
	if (desc.Op == dma.OpWrite || desc.Op == dma.OpTrim || desc.Op == dma.OpZero) && d.readOnly {
		return ErrReadOnly
	}
	if s.e.mem != nil && desc.Op == dma.OpWrite {
		if err := s.e.mem.Open(desc); err != nil {
			s.e.Stats.PermissionDenials.Add(1)
			return fmt.Errorf("%w: %v", ErrPermission, err)
		}
	}
	return nil
}

// idle writes back lines dirty since before cutoff, commits what the part appended that no
// commit covers yet, and applies what is committed: data does not wait in memory for the
// cache's pressure or a flush that may never come.
func (p *part) idle(cutoff time.Time) error {
	if err := p.flushDirty(cutoff); err != nil {
		return err
	}
	if len(p.pending) == 0 {
		return nil
	}
	if p.pending[len(p.pending)-1].end > p.d.committed.Load() {
		if err := p.d.commit(false); err != nil {
			return err
		}
	}
	if err := p.applyAll(); err != nil || p.heldBytes == 0 {
		return err
	}
	// Placed appends now in place: a sync vouches for them, and they are retired.
	if err := p.d.commit(false); err != nil {
		return err
	}
	return p.applyAll()
}
