package engine

import (
	"context"
	"fmt"
	"sync"
)

// memChunk is the allocation unit of MemDevice: unallocated chunks read as zeros and are
// reported as holes, so BlockStatus has something real to describe.
const memChunk = 64 << 10

// MemDevice is a plain, unencrypted, sparse in-memory BlockDevice: the reference the
// conformance suite checks the engine against, and a test backend for frontends.
type MemDevice struct {
	size int64
	caps Caps

	mu     sync.RWMutex // guards chunks
	chunks map[int64][]byte
}

var _ BlockDevice = (*MemDevice)(nil)

// NewMemDevice returns a zero-filled device of size bytes.
func NewMemDevice(size int64, readOnly bool) *MemDevice {
	return &MemDevice{
		size: size,
		caps: Caps{
			ReadOnly: readOnly, FUA: true, Trim: true, WriteZeroes: true, FastZero: true,
			BlockStatus: true, MultiConn: true,
			MinBlock: 1, PreferredBlock: 4096, MaxBlock: 32 << 20,
		},
		chunks: make(map[int64][]byte),
	}
}

func (d *MemDevice) Size() int64 { return d.size }
func (d *MemDevice) Caps() Caps  { return d.caps }

func (d *MemDevice) check(off, n int64, write bool) error {
	if off < 0 || n < 0 || off > d.size || n > d.size-off {
		return fmt.Errorf("offset %d length %d on a %d-byte device: %w", off, n, d.size, ErrOutOfRange)
	}
	if n > int64(d.caps.MaxBlock) {
		return fmt.Errorf("length %d above the %d-byte maximum: %w", n, d.caps.MaxBlock, ErrTooLarge)
	}
	if write && d.caps.ReadOnly {
		return ErrReadOnly
	}
	return nil
}

func (d *MemDevice) ReadAt(_ context.Context, p []byte, off int64) error {
	if err := d.check(off, int64(len(p)), false); err != nil {
		return err
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	for done := 0; done < len(p); {
		pos := off + int64(done)
		base, in := pos/memChunk*memChunk, int(pos%memChunk)
		n := min(len(p)-done, memChunk-in)
		if c := d.chunks[base]; c != nil {
			copy(p[done:done+n], c[in:])
		} else {
			clear(p[done : done+n])
		}
		done += n
	}
	return nil
}

func (d *MemDevice) WriteAt(_ context.Context, p []byte, off int64, _ bool) error {
	if err := d.check(off, int64(len(p)), true); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for done := 0; done < len(p); {
		pos := off + int64(done)
		base, in := pos/memChunk*memChunk, int(pos%memChunk)
		n := min(len(p)-done, memChunk-in)
		c := d.chunks[base]
		if c == nil {
			c = make([]byte, memChunk)
			d.chunks[base] = c
		}
		copy(c[in:], p[done:done+n])
		done += n
	}
	return nil
}

func (d *MemDevice) Flush(context.Context) error { return nil }

// zero clears [off, off+n); whole chunks are deallocated unless keep is set.
func (d *MemDevice) zero(off, n int64, keep bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for done := int64(0); done < n; {
		pos := off + done
		base, in := pos/memChunk*memChunk, pos%memChunk
		k := min(n-done, memChunk-in)
		if c := d.chunks[base]; c != nil {
			if k == memChunk && !keep {
				delete(d.chunks, base)
			} else {
				clear(c[in : in+k])
			}
		} else if keep {
			d.chunks[base] = make([]byte, memChunk)
		}
		done += k
	}
}

func (d *MemDevice) Trim(_ context.Context, off, n int64, _ bool) error {
	if err := d.check(off, 0, true); err != nil {
		return err
	}
	if n < 0 || n > d.size-off {
		return fmt.Errorf("trim offset %d length %d on a %d-byte device: %w", off, n, d.size, ErrOutOfRange)
	}
	d.zero(off, n, false)
	return nil
}

func (d *MemDevice) WriteZeroes(_ context.Context, off, n int64, f ZeroFlags) error {
	if err := d.check(off, 0, true); err != nil {
		return err
	}
	if n < 0 || n > d.size-off {
		return fmt.Errorf("write-zeroes offset %d length %d on a %d-byte device: %w", off, n, d.size, ErrOutOfRange)
	}
	d.zero(off, n, f.NoHole)
	return nil
}

func (d *MemDevice) BlockStatus(_ context.Context, off, n int64) ([]Extent, error) {
	if off < 0 || n <= 0 || off >= d.size || n > d.size-off {
		return nil, fmt.Errorf("block status offset %d length %d on a %d-byte device: %w", off, n, d.size, ErrOutOfRange)
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	var out []Extent
	for done := int64(0); done < n; {
		pos := off + done
		base := pos / memChunk * memChunk
		k := min(n-done, base+memChunk-pos)
		hole := d.chunks[base] == nil
		if len(out) > 0 && out[len(out)-1].Hole == hole {
			out[len(out)-1].Length += k
		} else {
			out = append(out, Extent{Length: k, Hole: hole, Zero: hole})
		}
		done += k
	}
	return out, nil
}
