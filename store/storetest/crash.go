package storetest

import (
	"fmt"
	"io"
	"math/rand"
	"sync"

	"github.com/sealdisk/sealdisk/store"
)

// Crash is an in-memory Store that can simulate a crash: writes since the last Sync are
// pending, and Crash returns the storage as it might be found afterwards — everything synced,
// plus a random subset of the pending writes, applied in order, kept or lost in whole atomic
// units (FORMAT.md §6: a sector, a 64-byte entry, a journal record). Punches are pending
// writes of zeros. Tests use it to prove crash consistency; it is not for production.
type Crash struct {
	// Units gives the atomic unit size at an offset (a power of two dividing the offset's
	// alignment); nil means 512 bytes everywhere.
	Units func(off int64) int64
	// OnWrite, if set, sees every write (tests use it to check nonce uniqueness).
	OnWrite func(p []byte, off int64)

	mu      sync.Mutex // guards size, cur, durable, pending
	size    int64
	cur     pages // what reads see
	durable pages // what survives a crash for certain
	pending []pendingWrite
}

// pages is sparse storage: absent pages read as zeros, so a mostly empty image costs little.
type pages map[int64]*[pageSize]byte

const pageSize = 4096

func (p pages) write(b []byte, off int64) {
	for len(b) > 0 {
		idx, in := off/pageSize, off%pageSize
		pg := p[idx]
		if pg == nil {
			pg = new([pageSize]byte)
			p[idx] = pg
		}
		n := copy(pg[in:], b)
		b, off = b[n:], off+int64(n)
	}
}

func (p pages) read(b []byte, off int64) {
	for len(b) > 0 {
		idx, in := off/pageSize, off%pageSize
		var n int
		if pg := p[idx]; pg != nil {
			n = copy(b, pg[in:])
		} else {
			n = min(len(b), int(pageSize-in))
			clear(b[:n])
		}
		b, off = b[n:], off+int64(n)
	}
}

func (p pages) clone() pages {
	out := make(pages, len(p))
	for k, v := range p {
		c := *v
		out[k] = &c
	}
	return out
}

type pendingWrite struct {
	off  int64
	data []byte
}

var _ store.Store = (*Crash)(nil)

// NewCrash returns an empty crashable store.
func NewCrash() *Crash { return &Crash{cur: pages{}, durable: pages{}} }

func (c *Crash) init() {
	if c.cur == nil {
		c.cur, c.durable = pages{}, pages{}
	}
}

func (c *Crash) ReadAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.init()
	if off >= c.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), c.size-off))
	c.cur.read(p[:n], off)
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (c *Crash) WriteAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.init()
	if off < 0 {
		return 0, fmt.Errorf("negative offset %d", off)
	}
	c.size = max(c.size, off+int64(len(p)))
	c.cur.write(p, off)
	c.pending = append(c.pending, pendingWrite{off, append([]byte(nil), p...)})
	if c.OnWrite != nil {
		c.OnWrite(p, off)
	}
	return len(p), nil
}

func (c *Crash) Sync() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.init()
	for _, w := range c.pending {
		c.durable.write(w.data, w.off)
	}
	c.pending = c.pending[:0]
	return nil
}

func (c *Crash) Punch(off, n int64) error {
	c.mu.Lock()
	size := c.size
	c.mu.Unlock()
	n = min(n, size-off)
	if n <= 0 {
		return nil
	}
	_, err := c.WriteAt(make([]byte, n), off)
	return err
}

// Truncate sets the size of both views at once (image creation and tests only); shrinking
// drops nothing but the size.
func (c *Crash) Truncate(size int64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.init()
	c.size = size
	return nil
}

func (c *Crash) Size() (int64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.size, nil
}

func (c *Crash) Close() error { return nil }

// Crash returns a new store holding what a crash now could leave: the synced state plus each
// atomic unit of each pending write kept with probability keep, in write order.
func (c *Crash) Crash(r *rand.Rand, keep float64) *Crash {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.init()
	out := &Crash{Units: c.Units, size: c.size, durable: c.durable.clone()}
	for _, w := range c.pending {
		for pos := int64(0); pos < int64(len(w.data)); {
			off := w.off + pos
			u := int64(512)
			if c.Units != nil {
				u = c.Units(off)
			}
			n := min(u-off%u, int64(len(w.data))-pos)
			if r.Float64() < keep {
				out.durable.write(w.data[pos:pos+n], off)
			}
			pos += n
		}
	}
	out.cur = out.durable.clone()
	return out
}

// LoseUnsynced is what Linux may do when fdatasync fails: the writes since the last Sync stay
// visible to reads but are no longer pending, so no later Sync makes them durable and no
// crash keeps them. Tests call it from an injector that fails a sync (ErrStore).
func (c *Crash) LoseUnsynced() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.init()
	c.pending = c.pending[:0]
}

// Pending is the number of unsynced writes.
func (c *Crash) Pending() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.pending)
}
