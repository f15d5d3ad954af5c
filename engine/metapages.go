package engine

import (
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/internal/zeros"
	"github.com/sealdisk/sealdisk/sector"
)

// metaPage is one cached metadata page. Pages are always clean: every change to an entry is
// written at once (writeback.go, zero.go, unsettled.go).
type metaPage struct {
	idx uint64
	ref bool // CLOCK reference bit: used since the hand last passed
	e   [entriesPerPage]sector.Entry
}

// page returns metadata page idx, reading it on a miss. A hit sets the page's reference bit
// and touches no other page's memory; a miss with the cache full evicts by CLOCK and reuses
// the evicted page's memory. The page returned by the previous call is never the one evicted,
// so a caller may hold one page while it asks for the next (setEntries); no caller holds
// more.
func (p *part) page(idx uint64) (*metaPage, error) {
	if pg := p.lastPage; pg != nil && pg.idx == idx {
		return pg, nil // runs of sectors ask for one page many times in a row
	}
	if pg := p.pages[idx]; pg != nil {
		if !pg.ref {
			pg.ref = true
		}
		p.lastPage = pg
		return pg, nil
	}
	n := min(entriesPerPage, p.d.sectors-idx*entriesPerPage)
	buf := p.pagebuf[:n*format.MetaEntrySize]
	if _, err := p.d.st.ReadAt(buf, p.d.h.EntryPos(idx*entriesPerPage)); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("failed to read metadata: %w", err)
	}
	var pg *metaPage
	if len(p.pageRing) < p.maxPages {
		pg = new(metaPage)
		p.pageRing = append(p.pageRing, pg)
	} else {
		pg = p.evictPage()
		delete(p.pages, pg.idx)
		*pg = metaPage{}
	}
	pg.idx, pg.ref = idx, true
	for i := range n {
		copy(pg.e[i][:], buf[i*format.MetaEntrySize:])
	}
	p.pages[idx] = pg
	p.lastPage = pg
	return pg, nil
}

// evictPage advances the CLOCK hand to a page not used since it last passed, other than
// lastPage, and returns it. maxPages ≥ 2, so there is one.
func (p *part) evictPage() *metaPage {
	for {
		pg := p.pageRing[p.hand]
		p.hand = (p.hand + 1) % len(p.pageRing)
		switch {
		case pg == p.lastPage:
		case pg.ref:
			pg.ref = false
		default:
			return pg
		}
	}
}

func (p *part) entry(lba uint64) (*sector.Entry, error) {
	pg, err := p.page(lba / entriesPerPage)
	if err != nil {
		return nil, err
	}
	return &pg.e[lba%entriesPerPage], nil
}

// entries appends the entries of sectors [a, a+n) to dst, looking each metadata page up
// once, and reports whether any of them is non-zero (written).
func (p *part) entries(dst []sector.Entry, a uint64, n int) (ents []sector.Entry, any bool, err error) {
	k := len(dst)
	ents = slices.Grow(dst, n)[:k+n]
	for i := 0; i < n; {
		lba := a + uint64(i)
		pg, err := p.page(lba / entriesPerPage)
		if err != nil {
			return ents[:k], false, err
		}
		m := copy(ents[k+i:], pg.e[lba%entriesPerPage:])
		for _, e := range ents[k+i : k+i+m] {
			any = any || !e.IsZero()
		}
		i += m
	}
	return ents, any, nil
}

// setEntries gives each record's sector its new entry (zero for a zero record), in the
// cached pages and on disk, each touched page written once (records in ascending LBA order).
func (p *part) setEntries(recs []sector.JournalRecord) error {
	var last *metaPage
	for i := range recs {
		r := &recs[i]
		pg, err := p.page(r.LBA / entriesPerPage)
		if err != nil {
			return err
		}
		pg.e[r.LBA%entriesPerPage] = r.New
		if last != nil && last != pg {
			if err := p.writePage(last); err != nil {
				return err
			}
		}
		last = pg
	}
	if last != nil {
		return p.writePage(last)
	}
	return nil
}

// writePage writes a cached page back (or punches it when every entry is zero).
func (p *part) writePage(pg *metaPage) error {
	n := min(entriesPerPage, p.d.sectors-pg.idx*entriesPerPage)
	pos := p.d.h.EntryPos(pg.idx * entriesPerPage)
	buf := p.pagebuf[:n*format.MetaEntrySize]
	for i := range n {
		copy(buf[i*format.MetaEntrySize:], pg.e[i][:])
	}
	if zeros.All(buf) && n == entriesPerPage {
		return p.d.punch(pos, 4096)
	}
	if _, err := p.d.st.WriteAt(buf, pos); err != nil {
		return fmt.Errorf("failed to write metadata: %w", err)
	}
	return nil
}
