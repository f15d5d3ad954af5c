package engine

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"unsafe"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/sector"
	"github.com/sealdisk/sealdisk/tree"
)

// metaPage is one cached metadata page: the entries the part works from. Version 2 writes
// pages in place only at checkpoints (dirtyPages keeps the changed ones meanwhile).
type metaPage struct {
	idx uint64
	ref bool // CLOCK reference bit: used since the hand last passed
	e   [entriesPerPage]sector.Entry
}

// page returns metadata page idx, reading it on a miss: from the disk's changed pages if it is
// one, else from the image, checked against the integrity tree. A hit sets the page's
// reference bit and touches no other page's memory; a miss with the cache full evicts by CLOCK
// and reuses the evicted page's memory. The page returned by the previous call is never the
// one evicted, so a caller may hold one page while it asks for the next (setEntries); no
// caller holds more.
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
	pg := p.spareMeta
	if pg == nil {
		pg = new(metaPage)
	}
	p.spareMeta = nil
	*pg = metaPage{idx: idx, ref: true}
	if err := p.readPage(pg); err != nil {
		p.spareMeta = pg
		return nil, err
	}
	if len(p.pageRing) < p.maxPages {
		p.pageRing = append(p.pageRing, pg)
	} else {
		old := p.evictPage()
		delete(p.pages, old.idx)
		*old = metaPage{}
		p.spareMeta = old
		p.pageRing[p.ringIndex(old)] = pg
	}
	p.pages[idx] = pg
	p.lastPage = pg
	return pg, nil
}

// ringIndex is the slot of pg in pageRing (the one the CLOCK hand just passed).
func (p *part) ringIndex(pg *metaPage) int {
	i := (p.hand + len(p.pageRing) - 1) % len(p.pageRing)
	if p.pageRing[i] != pg {
		panic("BUG: engine: evicted page is not behind the CLOCK hand")
	}
	return i
}

// readPage fills pg (idx set) from the disk's changed pages or from the image; a page read
// from the image must match its leaf in the tree, else its sectors fail with ErrIntegrity.
func (p *part) readPage(pg *metaPage) error {
	d := p.d
	if d.meta.get(pg.idx, pg) {
		return nil
	}
	n := min(entriesPerPage, d.sectors-pg.idx*entriesPerPage)
	buf := p.pagebuf[:format.MetaPageSize]
	clear(buf)
	d.readAheadPages(pg.idx)
	if _, err := d.st.ReadAt(buf[:n*format.MetaEntrySize], d.h.EntryPos(pg.idx*entriesPerPage)); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("failed to read metadata: %w", err)
	}
	if d.tree != nil {
		if err := d.tree.Verify(pg.idx, tree.LeafDigest(d.h.UUID, pg.idx, buf)); err != nil {
			return d.pageFailed(pg.idx, err)
		}
	}
	for i := range n {
		copy(pg.e[i][:], buf[i*format.MetaEntrySize:])
	}
	return nil
}

// metaAhead is how many metadata pages a read of one from the image asks the store to read
// ahead (64 KiB): a disk attached with its image's pages dropped, or written where it was not
// lately, otherwise reads each page with its own I/O, on the shard.
const metaAhead = 16

// readAheadPages hints to the store that the pages of idx's aligned group of metaAhead are
// about to be read (store.File.ReadAhead).
func (d *Disk) readAheadPages(idx uint64) {
	ra, ok := d.st.(interface{ ReadAhead(off, n int64) })
	if !ok {
		return
	}
	lo := idx &^ (metaAhead - 1)
	hi := min((lo+metaAhead)*entriesPerPage, d.sectors) // the sector after the group's last entry
	ra.ReadAhead(d.h.EntryPos(lo*entriesPerPage), int64(hi-lo*entriesPerPage)*format.MetaEntrySize)
}

// pageFailed counts and logs a metadata page that does not match the tree (or whose tree
// nodes do not) and returns the error of every request touching its sectors.
func (d *Disk) pageFailed(idx uint64, err error) error {
	if !errors.Is(err, tree.ErrMismatch) {
		return err // could not read the tree: an I/O error, not evidence of tampering
	}
	first := idx * entriesPerPage
	last := min(first+entriesPerPage, d.sectors) - 1
	d.e.Stats.AuthFailures.Add(1)
	d.e.opts.Logger.Error("metadata page failed verification against the integrity tree", "asid", d.asid, "lba", first, "last_lba", last, "error", err)
	return fmt.Errorf("%w: sectors %d-%d: %v", ErrIntegrity, first, last, err)
}

// bytes is the page's entries as the 4096 bytes they are on disk.
func (pg *metaPage) bytes() *[format.MetaPageSize]byte {
	return (*[format.MetaPageSize]byte)(unsafe.Pointer(&pg.e))
}

var _ [format.MetaPageSize - entriesPerPage*sector.EntrySize]struct{} // e is exactly one page

// pageSectors is the number of sectors of page idx (less than 64 only for the last page).
func (p *part) pageSectors(idx uint64) uint64 {
	return min(entriesPerPage, p.d.sectors-idx*entriesPerPage)
}

// freshPage is page idx, cached with zero entries without reading it: for a caller that sets
// every entry (a page that failed verification is replaced this way).
func (p *part) freshPage(idx uint64) *metaPage {
	if pg := p.pages[idx]; pg != nil {
		return pg
	}
	pg := &metaPage{idx: idx, ref: true}
	if len(p.pageRing) < p.maxPages {
		p.pageRing = append(p.pageRing, pg)
	} else {
		old := p.evictPage()
		delete(p.pages, old.idx)
		p.pageRing[p.ringIndex(old)] = pg
	}
	p.pages[idx] = pg
	p.lastPage = pg
	return pg
}

// whole reports whether sectors [lba, lba+n) hold every sector of lba's page.
func (p *part) whole(idx, lba, n uint64) bool {
	first := idx * entriesPerPage
	return lba <= first && lba+n >= first+p.pageSectors(idx)
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

// setEntries gives each sector of ents its new entry in the part's pages, records every
// changed page for the checkpoint (dirtyPages) and, with the tree, gives it its new leaf (ents
// ascending). The caller holds d.ckpt shared, so a commit sees entries and journal agree.
func (p *part) setEntries(ents []sector.LogEntry) error {
	var last *metaPage
	for i, e := range ents {
		idx := e.LBA / entriesPerPage
		var pg *metaPage
		var err error
		if last != nil && last.idx == idx {
			pg = last
		} else if n := p.pageSectors(idx); e.LBA%entriesPerPage == 0 && i+int(n) <= len(ents) && ents[i+int(n)-1].LBA == e.LBA+n-1 {
			pg = p.freshPage(idx) // every entry of the page is replaced: the old one is not read
		} else if pg, err = p.page(idx); err != nil {
			return err
		}
		if last != nil && last != pg {
			p.changed(last)
		}
		pg.e[e.LBA%entriesPerPage] = e.Entry
		last = pg
	}
	if last != nil {
		p.changed(last)
	}
	return nil
}

// changed records a page whose entries setEntries changed; with a tree, its leaf is set at
// the next commit's cut (Disk.hashLeaves).
func (p *part) changed(pg *metaPage) {
	p.d.meta.put(pg)
}

// hashLeaves sets the tree leaf of every page changed since it last ran. The cut calls it with
// d.ckpt held exclusively, so the root it then computes covers every entry appended; a commit
// calls it first with only commitMu held (which serialises the calls), so the cut hashes only
// the pages changed meanwhile. SetLeaf fails only on a read error of a tree node evicted
// since, after which the disk's memory no longer matches its journal (Disk.breaks).
func (d *Disk) hashLeaves() {
	if d.tree == nil {
		return
	}
	var buf [format.MetaPageSize]byte
	for idx := range d.meta.takeUnhashed() {
		if !d.meta.copyOf(idx, &buf) {
			panic("BUG: engine: a page waiting for its leaf is not among the changed pages")
		}
		if err := d.tree.SetLeaf(idx, tree.LeafDigest(d.h.UUID, idx, buf[:])); err != nil {
			d.breaks(fmt.Errorf("failed to update the integrity tree for metadata page %d: %w", idx, err))
		}
	}
}
