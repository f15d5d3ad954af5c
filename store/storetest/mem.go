package storetest

import (
	"fmt"
	"io"
	"sync"

	"github.com/sealdisk/sealdisk/store"
)

// memChunk is Mem's allocation unit: a chunk never written (or wholly punched) holds no
// memory, so a huge sparse image costs only what was written.
const memChunk = 64 << 10

// Mem is a sparse in-memory Store for tests and benchmarks: no durability model (Sync does
// nothing; see Crash for that), but bounded by what is written, whatever the size.
type Mem struct {
	mu     sync.RWMutex // guards size, chunks
	size   int64
	chunks map[int64][]byte // chunk index → memChunk bytes
}

var _ store.Store = (*Mem)(nil)

// NewMem returns an empty store of size bytes (all a hole).
func NewMem(size int64) *Mem { return &Mem{size: size, chunks: map[int64][]byte{}} }

func (m *Mem) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("failed to read: negative offset %d", off)
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if off >= m.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), m.size-off))
	for done := 0; done < n; {
		pos := off + int64(done)
		in := int(pos % memChunk)
		k := min(n-done, memChunk-in)
		if c := m.chunks[pos/memChunk]; c != nil {
			copy(p[done:done+k], c[in:])
		} else {
			clear(p[done : done+k])
		}
		done += k
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// WriteAt writes p at off, growing the store as a file would.
func (m *Mem) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("failed to write: negative offset %d", off)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for done := 0; done < len(p); {
		pos := off + int64(done)
		in := int(pos % memChunk)
		k := min(len(p)-done, memChunk-in)
		c := m.chunks[pos/memChunk]
		if c == nil {
			c = make([]byte, memChunk)
			m.chunks[pos/memChunk] = c
		}
		copy(c[in:], p[done:done+k])
		done += k
	}
	m.size = max(m.size, off+int64(len(p)))
	return len(p), nil
}

func (m *Mem) Sync() error { return nil }

// Punch zeroes [off, off+n) and frees every chunk it covers wholly.
func (m *Mem) Punch(off, n int64) error {
	if off < 0 || n < 0 {
		return fmt.Errorf("failed to punch [%d,+%d): negative range", off, n)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.zeroLocked(off, min(off+n, m.size))
	return nil
}

// zeroLocked zeroes [lo, hi), freeing whole chunks. Caller holds mu.
func (m *Mem) zeroLocked(lo, hi int64) {
	for pos := lo; pos < hi; {
		idx, in := pos/memChunk, pos%memChunk
		k := min(hi-pos, memChunk-in)
		if c := m.chunks[idx]; c != nil {
			if k == memChunk {
				delete(m.chunks, idx)
			} else {
				clear(c[in : in+k])
			}
		}
		pos += k
	}
}

func (m *Mem) Truncate(size int64) error {
	if size < 0 {
		return fmt.Errorf("failed to truncate to %d: negative size", size)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if size < m.size {
		// a later growth must read zeros past the cut, as with a file
		m.zeroLocked(size, min(m.size, (size+memChunk-1)/memChunk*memChunk))
		for idx := range m.chunks {
			if idx*memChunk >= size {
				delete(m.chunks, idx)
			}
		}
	}
	m.size = size
	return nil
}

func (m *Mem) Size() (int64, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.size, nil
}

// Allocated is the memory the store holds for data (bytes).
func (m *Mem) Allocated() int64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return int64(len(m.chunks)) * memChunk
}

func (m *Mem) Close() error { return nil }
