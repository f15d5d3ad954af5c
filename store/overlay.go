package store

import (
	"errors"
	"fmt"
	"io"
	"sync"
)

// overlayPage is the unit an Overlay keeps written data in.
const overlayPage = 4096

// Overlay is a Store that reads from a base store and keeps every write, punch and truncate
// in memory, never changing the base: the offline tools run the engine's own recovery of a
// crashed image (which writes) over an image they must leave as it is. Its memory grows with
// what is written (for a recovery, the committed journal).
type Overlay struct {
	base Store

	mu    sync.RWMutex
	pages map[int64][]byte // page-aligned offset → overlayPage bytes
	size  int64
}

var _ Store = (*Overlay)(nil)

// NewOverlay is an overlay over base, of base's size.
func NewOverlay(base Store) (*Overlay, error) {
	size, err := base.Size()
	if err != nil {
		return nil, err
	}
	return &Overlay{base: base, pages: map[int64][]byte{}, size: size}, nil
}

// ReadAt reads the overlay's pages where written, the base elsewhere; past the size it
// returns io.EOF, as a file does.
func (o *Overlay) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("overlay: negative offset %d", off)
	}
	o.mu.RLock()
	defer o.mu.RUnlock()
	n := len(p)
	if off >= o.size {
		return 0, io.EOF
	}
	if int64(n) > o.size-off {
		n = int(o.size - off)
	}
	for done := 0; done < n; {
		pos := off + int64(done)
		base := pos - pos%overlayPage
		k := min(n-done, int(base+overlayPage-pos))
		if pg := o.pages[base]; pg != nil {
			copy(p[done:done+k], pg[pos-base:])
		} else {
			got, err := o.base.ReadAt(p[done:done+k], pos)
			if err != nil && !errors.Is(err, io.EOF) {
				return done + got, err
			}
			clear(p[done+got : done+k]) // past the base's end: a grown hole
		}
		done += k
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// WriteAt writes into the overlay's pages (a page's other bytes come from the base first).
func (o *Overlay) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("overlay: negative offset %d", off)
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	for done := 0; done < len(p); {
		pos := off + int64(done)
		base := pos - pos%overlayPage
		pg, err := o.pageLocked(base)
		if err != nil {
			return done, err
		}
		done += copy(pg[pos-base:], p[done:])
	}
	o.size = max(o.size, off+int64(len(p)))
	return len(p), nil
}

// pageLocked is the overlay's page at base, copied from the base store on first use.
func (o *Overlay) pageLocked(base int64) ([]byte, error) {
	if pg := o.pages[base]; pg != nil {
		return pg, nil
	}
	pg := make([]byte, overlayPage)
	if base < o.size {
		n := min(int64(overlayPage), o.size-base)
		if _, err := o.base.ReadAt(pg[:n], base); err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
	}
	o.pages[base] = pg
	return pg, nil
}

// Punch makes [off, off+n) read as zeros.
func (o *Overlay) Punch(off, n int64) error {
	if off < 0 || n < 0 {
		return fmt.Errorf("overlay: punch offset %d length %d", off, n)
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	end := min(off+n, o.size)
	for pos := off; pos < end; {
		base := pos - pos%overlayPage
		k := min(end-pos, base+overlayPage-pos)
		pg, err := o.pageLocked(base)
		if err != nil {
			return err
		}
		clear(pg[pos-base : pos-base+k])
		pos += k
	}
	return nil
}

// Truncate sets the size; what lies past a smaller size reads as zeros if it grows again.
func (o *Overlay) Truncate(size int64) error {
	if size < 0 {
		return fmt.Errorf("overlay: negative size %d", size)
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if size < o.size {
		for base := range o.pages {
			if base >= size {
				delete(o.pages, base)
			}
		}
		// Base bytes past the new size must not show through when the overlay grows again.
		if tail := size % overlayPage; tail != 0 {
			pg, err := o.pageLocked(size - tail)
			if err != nil {
				return err
			}
			clear(pg[tail:])
		}
		for base := size + (overlayPage-size%overlayPage)%overlayPage; base < o.size; base += overlayPage {
			o.pages[base] = make([]byte, overlayPage)
		}
	}
	o.size = size
	return nil
}

// Sync does nothing: the overlay is memory, and the base is never written.
func (o *Overlay) Sync() error { return nil }

// Size is the overlay's size.
func (o *Overlay) Size() (int64, error) {
	o.mu.RLock()
	defer o.mu.RUnlock()
	return o.size, nil
}

// Close drops the overlay's pages; the base stays open (its owner closes it).
func (o *Overlay) Close() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, pg := range o.pages {
		clear(pg)
	}
	o.pages = nil
	return nil
}
