package engine

import (
	"fmt"
	"sync"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/internal/zeros"
)

// dirtyPages holds every metadata page changed since the last checkpoint, as its current bytes.
// Version 2 writes pages in place only at checkpoints (FORMAT.md §6.2), so between two of them
// the page on disk is the checkpoint's and this copy is the truth: a part that evicts the page
// reads it back from here, and the checkpoint writes it from here without asking the shards.
type dirtyPages struct {
	mu    sync.Mutex // guards pages and unhashed
	pages map[uint64]*[format.MetaPageSize]byte
	// unhashed is the changed pages whose leaf in the integrity tree is behind their bytes,
	// when hashed is set (images with a tree): a commit's cut sets their leaves
	// (Disk.hashLeaves), not every write-back, so a page changed many times between two
	// commits is hashed once.
	unhashed map[uint64]struct{}
	hashed   bool
}

// put records page idx's current entries.
func (m *dirtyPages) put(pg *metaPage) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.pages == nil {
		m.pages = map[uint64]*[format.MetaPageSize]byte{}
	}
	b := m.pages[pg.idx]
	if b == nil {
		b = new([format.MetaPageSize]byte)
		m.pages[pg.idx] = b
	}
	*b = *pg.bytes()
	if m.hashed {
		if m.unhashed == nil {
			m.unhashed = map[uint64]struct{}{}
		}
		m.unhashed[pg.idx] = struct{}{}
	}
}

// takeUnhashed returns the pages whose leaves are behind their bytes, and forgets them: a put
// after it records the page again.
func (m *dirtyPages) takeUnhashed() map[uint64]struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	u := m.unhashed
	m.unhashed = nil
	return u
}

// copyOf copies page idx's current bytes into dst (false: not changed since the checkpoint).
func (m *dirtyPages) copyOf(idx uint64, dst *[format.MetaPageSize]byte) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	b := m.pages[idx]
	if b == nil {
		return false
	}
	*dst = *b
	return true
}

// get fills pg with page idx's entries if it changed since the checkpoint.
func (m *dirtyPages) get(idx uint64, pg *metaPage) bool { return m.copyOf(idx, pg.bytes()) }

func (m *dirtyPages) len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.pages)
}

// writeBack writes every page in place (the caller holds d.ckpt exclusively: no page changes);
// they stay recorded until forget, after the sync that makes them durable.
func (m *dirtyPages) writeBack(d *Disk) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for idx, b := range m.pages {
		if err := d.writePage(idx, b[:]); err != nil {
			return err
		}
	}
	return nil
}

// forget drops every page (they are durable in place), zeroising them.
func (m *dirtyPages) forget() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, b := range m.pages {
		clear(b[:])
	}
	m.pages = nil
}

// writePage writes page idx's bytes in place, or punches the page when they are all zero.
func (d *Disk) writePage(idx uint64, b []byte) error {
	pos := d.h.EntryPos(idx * entriesPerPage)
	n := min(entriesPerPage, d.sectors-idx*entriesPerPage) * format.MetaEntrySize
	if zeros.All(b) && n == format.MetaPageSize {
		return d.punch(pos, format.MetaPageSize)
	}
	if _, err := d.st.WriteAt(b[:n], pos); err != nil {
		return fmt.Errorf("failed to write metadata page %d: %w", idx, err)
	}
	return nil
}
