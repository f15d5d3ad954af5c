// Package dma models the disk controller's DMA interface: fixed descriptors, bounded
// submission and completion rings, and the completion "interrupt". Standard library only.
//
// A frontend fills a Descriptor and pushes it on a shard's submission ring; Push blocks while
// the ring is full, which is the backpressure the rest of the system relies on. The shard's
// coprocessor pops descriptors in batches, performs them and pushes them on the completion
// ring; the completion handler pops those and calls each descriptor's Complete, which wakes
// the waiting frontend.
package dma

import (
	"errors"
	"sync"
	"time"
)

// Op is a descriptor's operation.
type Op uint8

const (
	OpRead   Op = iota + 1 // decrypt sectors into the guest buffer
	OpWrite                // encrypt the guest buffer into sectors
	OpFlush                // write back everything dirty the shard holds for the device
	OpTrim                 // discard sectors (they read as zeros, take no space)
	OpZero                 // make sectors read as zeros (NoHole: keep them allocated)
	OpStatus               // report allocation: one byte per sector into Buf (1 = allocated)
)

func (o Op) String() string {
	switch o {
	case OpRead:
		return "read"
	case OpWrite:
		return "write"
	case OpFlush:
		return "flush"
	case OpTrim:
		return "trim"
	case OpZero:
		return "zero"
	case OpStatus:
		return "status"
	}
	return "op?"
}

// Flags modify a descriptor.
type Flags uint8

const (
	FUA    Flags = 1 << iota // the write is durable before completion
	NoHole                   // OpZero keeps the sectors allocated
)

// Descriptor is one DMA request. The submitter owns every field until Push; from Push until
// Complete the coprocessor owns it (it writes only Status and, for reads, Buf's bytes); after
// Complete the submitter owns it again. No field is shared, so none needs a lock.
type Descriptor struct {
	Op    Op
	ASID  uint32 // whose key slot encrypts this I/O
	LBA   uint64 // first sector
	Count uint32 // sectors touched
	Head  uint32 // byte offset of Buf's first byte inside sector LBA (unaligned I/O)
	Len   uint32 // bytes covered, starting Head bytes into sector LBA (= len(Buf) for reads and writes)
	Buf   []byte // guest buffer (bytes, not necessarily whole sectors); OpStatus: one byte per sector
	Flags Flags
	Tag   uint64 // the submitter's cookie
	// MemIV is Buf's memory-encryption IV when the MemCrypt stage is on; whoever sealed the
	// payload sets it (the submitter for writes, the coprocessor for reads).
	MemIV [16]byte

	// Target is the device the descriptor addresses (set by the submitter, read by the
	// coprocessor).
	Target any
	// Status is set by the coprocessor: nil or the failure.
	Status error
	// Complete is called once by the completion handler, with Status set.
	Complete func(*Descriptor)
}

// ErrClosed is returned by Push on a closed ring.
var ErrClosed = errors.New("dma ring closed")

// Ring is a bounded FIFO of descriptors: many producers, one consumer.
type Ring struct {
	mu     sync.Mutex // guards buf, head, n, closed
	buf    []*Descriptor
	head   int // index of the oldest descriptor
	n      int // descriptors queued
	closed bool

	ready chan struct{} // capacity 1: "the ring may be non-empty" (wakes the consumer)
	space chan struct{} // capacity 1: "the ring may have room" (wakes one producer)
}

// NewRing makes a ring of size slots.
func NewRing(size int) *Ring {
	if size <= 0 {
		panic("BUG: dma: ring size must be positive")
	}
	return &Ring{buf: make([]*Descriptor, size), ready: make(chan struct{}, 1), space: make(chan struct{}, 1)}
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// Push queues d, blocking while the ring is full.
func (r *Ring) Push(d *Descriptor) error {
	for {
		r.mu.Lock()
		if r.closed {
			r.mu.Unlock()
			signal(r.space) // wake the next blocked producer so it sees the close too
			return ErrClosed
		}
		if r.n < len(r.buf) {
			r.buf[(r.head+r.n)%len(r.buf)] = d
			r.n++
			room := r.n < len(r.buf)
			r.mu.Unlock()
			signal(r.ready)
			if room {
				signal(r.space) // pass the wake-up on to another waiting producer
			}
			return nil
		}
		r.mu.Unlock()
		<-r.space
	}
}

// PopBatch moves up to len(dst) descriptors into dst, waiting up to wait (forever when wait
// is 0) for the first one. It returns the descriptors and whether the ring is closed and
// drained.
func (r *Ring) PopBatch(dst []*Descriptor, wait time.Duration, timer *time.Timer) ([]*Descriptor, bool) {
	for {
		r.mu.Lock()
		k := min(r.n, len(dst))
		for i := 0; i < k; i++ {
			dst[i] = r.buf[r.head]
			r.buf[r.head] = nil
			r.head = (r.head + 1) % len(r.buf)
		}
		r.n -= k
		closed := r.closed && r.n == 0
		r.mu.Unlock()
		if k > 0 {
			signal(r.space)
			return dst[:k], false
		}
		if closed {
			return nil, true
		}
		if wait == 0 {
			<-r.ready
			continue
		}
		timer.Reset(wait)
		select {
		case <-r.ready:
			if !timer.Stop() {
				<-timer.C
			}
		case <-timer.C:
			return nil, false
		}
	}
}

// Len is the number of queued descriptors (ring occupancy, for metrics).
func (r *Ring) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n
}

// Cap is the ring size.
func (r *Ring) Cap() int { return len(r.buf) }

// Close refuses further pushes; queued descriptors are still popped.
func (r *Ring) Close() {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	signal(r.ready)
	signal(r.space)
}

// Interrupt runs the completion handler for cq until it is closed and drained: it pops
// completed descriptors in batches and calls their Complete.
func Interrupt(cq *Ring, batch int) {
	buf := make([]*Descriptor, batch)
	for {
		ds, closed := cq.PopBatch(buf, 0, nil)
		if closed {
			return
		}
		for i, d := range ds {
			d.Complete(d)
			ds[i] = nil
		}
	}
}
