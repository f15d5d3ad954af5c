package engine

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/sealdisk/sealdisk/dma"
	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/sector"
	"github.com/sealdisk/sealdisk/store"
)

// entriesPerPage is the number of 64-byte entries in one 4 KiB metadata page.
const entriesPerPage = 4096 / format.MetaEntrySize

// maxWriteback bounds one writeback batch (journal records appended and synced at once).
const maxWriteback = 1024

// line is one cached plaintext sector.
type line struct {
	lruLinks[line] // most recent at head
	lba            uint64
	data           []byte // sector bytes; cap sector+TagSize
	dirty          bool
	dirtyAt        time.Time
}

func (l *line) links() *lruLinks[line] { return &l.lruLinks }

// metaPage is one cached metadata page.
type metaPage struct {
	lruLinks[metaPage]
	idx uint64
	e   [entriesPerPage]sector.Entry
}

func (pg *metaPage) links() *lruLinks[metaPage] { return &pg.lruLinks }

// part is one disk's state on one shard. Only the goroutine holding the shard (its worker,
// or a submitter running a descriptor inline) touches it, so it has no lock of its own: this
// is what makes read-modify-write race-free.
type part struct {
	d     *Disk
	shard int

	lines    map[uint64]*line
	lineLRU  lru[line, *line]
	maxLines int
	dirty    int
	spare    []*line // dropped lines kept with their buffers for reuse; zeroised at detach

	pages             map[uint64]*metaPage
	pageLRU           lru[metaPage, *metaPage]
	maxPages          int
	ct, recs, pagebuf []byte // scratch
	jrecs             []sector.JournalRecord
	ents              []sector.Entry
	wb                []*line

	// unsettled: sectors whose write-back or zeroing failed after its journal record was
	// durable. A write-back's sector may hold the old or the new ciphertext under either
	// entry; a zeroing's may have a zero entry over data never punched (recovery takes a
	// zero old entry only over zero data). Each keeps its record until settle finishes what
	// recovery would; until then the disk refuses checkpoints, which would retire the record
	// a crash needs. A sector unsettled by a write-back also keeps its dirty line.
	unsettled map[uint64]pending
}

// pending is the journal record of an unsettled sector: zero, or a write from old to new.
type pending struct {
	zero     bool
	old, new sector.Entry
}

func newPart(d *Disk, shard, maxLines, maxPages int) *part {
	return &part{
		d: d, shard: shard, lines: map[uint64]*line{}, maxLines: maxLines,
		pages: map[uint64]*metaPage{}, maxPages: maxPages,
		ct:      make([]byte, maxWriteback*int(d.ss)+sector.TagSize),
		recs:    make([]byte, maxWriteback*sector.JournalRecordSize),
		pagebuf: make([]byte, 4096),
	}
}

// --- LRU lists ---

// lruLinks are the list pointers a cached item embeds.
type lruLinks[T any] struct{ prev, next *T }

// lruItem is a pointer to an item that embeds its lruLinks.
type lruItem[T any] interface {
	*T
	links() *lruLinks[T]
}

// lru is an intrusive doubly linked list, most recently used at head: one implementation
// for the sector lines and the metadata pages.
type lru[T any, P lruItem[T]] struct{ head, tail *T }

func (q *lru[T, P]) touch(x *T) {
	if q.head == x {
		return
	}
	q.unlink(x)
	P(x).links().next = q.head
	if q.head != nil {
		P(q.head).links().prev = x
	}
	q.head = x
	if q.tail == nil {
		q.tail = x
	}
}

func (q *lru[T, P]) unlink(x *T) {
	l := P(x).links()
	if l.prev != nil {
		P(l.prev).links().next = l.next
	} else if q.head == x {
		q.head = l.next
	}
	if l.next != nil {
		P(l.next).links().prev = l.prev
	} else if q.tail == x {
		q.tail = l.prev
	}
	l.prev, l.next = nil, nil
}

// newLine returns an unused line for lba, not yet in the cache: a spare one with its buffer
// when there is one. Its data is whatever the buffer last held; the caller overwrites it.
func (p *part) newLine(lba uint64) *line {
	if n := len(p.spare); n > 0 {
		l := p.spare[n-1]
		p.spare = p.spare[:n-1]
		l.lba = lba
		return l
	}
	return &line{lba: lba, data: make([]byte, p.d.ss, p.d.ss+sector.TagSize)}
}

// drop removes a line from the cache and keeps it spare. Its plaintext is not cleared here:
// the next newLine overwrites it, and zeroise clears every spare buffer at detach, so a spare
// line holds nothing the cache could not hold.
func (p *part) drop(l *line) {
	p.lineLRU.unlink(l)
	delete(p.lines, l.lba)
	if l.dirty {
		l.dirty = false
		p.dirty--
	}
	p.spare = append(p.spare, l)
}

// insert caches l (from newLine) as most recently used.
func (p *part) insert(l *line) *line {
	p.lines[l.lba] = l
	p.lineLRU.touch(l)
	return l
}

func (p *part) markDirty(l *line, now time.Time) {
	if !l.dirty {
		l.dirty = true
		p.dirty++
	}
	l.dirtyAt = now
}

// --- metadata pages ---

func (p *part) page(idx uint64) (*metaPage, error) {
	if pg := p.pageLRU.head; pg != nil && pg.idx == idx {
		return pg, nil // runs of sectors ask for one page many times in a row
	}
	if pg := p.pages[idx]; pg != nil {
		p.pageLRU.touch(pg)
		return pg, nil
	}
	for len(p.pages) >= p.maxPages && p.pageLRU.tail != nil {
		old := p.pageLRU.tail
		p.pageLRU.unlink(old)
		delete(p.pages, old.idx)
	}
	pg := &metaPage{idx: idx}
	n := min(entriesPerPage, p.d.sectors-idx*entriesPerPage)
	buf := p.pagebuf[:n*format.MetaEntrySize]
	if _, err := p.d.st.ReadAt(buf, p.d.h.EntryPos(idx*entriesPerPage)); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("failed to read metadata: %w", err)
	}
	for i := range n {
		copy(pg.e[i][:], buf[i*format.MetaEntrySize:])
	}
	p.pages[idx] = pg
	p.pageLRU.touch(pg)
	return pg, nil
}

func (p *part) entry(lba uint64) (*sector.Entry, error) {
	pg, err := p.page(lba / entriesPerPage)
	if err != nil {
		return nil, err
	}
	return &pg.e[lba%entriesPerPage], nil
}

// writePage writes a cached page back (or punches it when every entry is zero).
func (p *part) writePage(pg *metaPage) error {
	n := min(entriesPerPage, p.d.sectors-pg.idx*entriesPerPage)
	pos := p.d.h.EntryPos(pg.idx * entriesPerPage)
	buf := p.pagebuf[:n*format.MetaEntrySize]
	for i := range n {
		copy(buf[i*format.MetaEntrySize:], pg.e[i][:])
	}
	if allZero(buf) && n == entriesPerPage {
		return punch(p.d.st, pos, 4096)
	}
	if _, err := p.d.st.WriteAt(buf, pos); err != nil {
		return fmt.Errorf("failed to write metadata: %w", err)
	}
	return nil
}

// --- sectors ---

// load returns the cached line for lba, reading and authenticating it on a miss.
func (p *part) load(lba uint64) (*line, error) {
	if l := p.lines[lba]; l != nil {
		p.d.e.Stats.CacheHits.Add(1)
		p.lineLRU.touch(l)
		return l, nil
	}
	if err := p.loadRun(lba, lba+1); err != nil {
		return nil, err
	}
	return p.lines[lba], nil
}

// loadRun reads the uncached sectors [a, b) with one pread and caches them.
func (p *part) loadRun(a, b uint64) error {
	d := p.d
	p.d.e.Stats.CacheMisses.Add(b - a)
	ss := d.ss
	ct := p.ct[:int64(b-a)*ss]
	// Skip the pread entirely when every entry in the run is zero (never written).
	ents, any, err := p.entries(a, int(b-a))
	if err != nil {
		return err
	}
	if any {
		if _, err := d.st.ReadAt(ct, d.h.DataPos(a)); err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("failed to read sectors %d-%d: %w", a, b-1, err)
		}
	}
	for lba := a; lba < b; lba++ {
		l := p.newLine(lba)
		if err := d.c.Open(lba, l.data, ct[int64(lba-a)*ss:int64(lba-a+1)*ss], &ents[lba-a]); err != nil {
			p.spare = append(p.spare, l)
			if errors.Is(err, sector.ErrAuth) {
				d.e.Stats.AuthFailures.Add(1)
				d.e.opts.Logger.Error("sector failed authentication", "asid", d.asid, "lba", lba, "error", err)
				return fmt.Errorf("%w: %v", ErrIntegrity, err)
			}
			return err
		}
		p.insert(l)
	}
	return nil
}

// readDirect decrypts the uncached sectors i..j-1 of a read descriptor into the guest
// buffer. A run of whole sectors is read with one pread straight into the guest buffer and
// opened there in place; a run with a partial head or tail sector goes through p.ct.
func (p *part) readDirect(desc *dma.Descriptor, i, j int64) error {
	d := p.d
	ss := d.ss
	a := desc.LBA + uint64(i)
	n := j - i
	d.e.Stats.CacheMisses.Add(uint64(n))
	ents, any, err := p.entries(a, int(n))
	if err != nil {
		return err
	}
	bLo, _, sLo := span(desc, i, ss)
	_, bHi, _ := span(desc, j-1, ss)
	run := p.ct[:n*ss]
	direct := bHi-bLo == n*ss // whole sectors only
	if direct {
		run = desc.Buf[bLo:bHi]
	}
	if any {
		if _, err := d.st.ReadAt(run, d.h.DataPos(a)); err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("failed to read sectors %d-%d: %w", a, a+uint64(n)-1, err)
		}
	}
	err = d.c.OpenSectors(a, run, ents)
	if err == nil && !direct {
		copy(desc.Buf[bLo:bHi], run[sLo:])
	}
	if !direct {
		clear(run)
	}
	if err != nil {
		clear(desc.Buf)
		if errors.Is(err, sector.ErrAuth) {
			d.e.Stats.AuthFailures.Add(1)
			d.e.opts.Logger.Error("sector failed authentication", "asid", d.asid, "error", err)
			return fmt.Errorf("%w: %v", ErrIntegrity, err)
		}
		return err
	}
	return nil
}

// entries copies the entries of sectors [a, a+n) into p.ents, looking each metadata page up
// once, and reports whether any is non-zero (written).
func (p *part) entries(a uint64, n int) (ents []sector.Entry, any bool, err error) {
	ents = slices.Grow(p.ents[:0], n)[:n]
	p.ents = ents
	for k := 0; k < n; {
		lba := a + uint64(k)
		pg, err := p.page(lba / entriesPerPage)
		if err != nil {
			return nil, false, err
		}
		m := copy(ents[k:], pg.e[lba%entriesPerPage:])
		for _, e := range ents[k : k+m] {
			any = any || !e.IsZero()
		}
		k += m
	}
	return ents, any, nil
}

// batchMax is the most records one batch may reserve: a batch larger than the whole journal
// would wait for room forever.
func (p *part) batchMax() int {
	return int(min(maxWriteback, p.d.jr.capacity))
}

// writeback encrypts and writes the given dirty lines: journal first (durable), then data and
// metadata in place (FORMAT.md §6).
func (p *part) writeback(ls []*line) error {
	if err := p.settle(); err != nil {
		return err
	}
	for len(ls) > 0 {
		n := min(len(ls), p.batchMax())
		if err := p.writebackBatch(ls[:n]); err != nil {
			return err
		}
		ls = ls[n:]
	}
	return nil
}

func (p *part) writebackBatch(ls []*line) error {
	d := p.d
	if d.sess == nil {
		panic("BUG: engine: writeback on a read-only disk")
	}
	slices.SortFunc(ls, func(a, b *line) int { return cmpU64(a.lba, b.lba) })
	ss := d.ss
	// Seal first: the records need the new entries, not their journal slots.
	recs := p.jrecs[:0]
	for i, l := range ls {
		old, err := p.entry(l.lba)
		if err != nil {
			return err
		}
		r := sector.JournalRecord{Kind: sector.RecordWrite, LBA: l.lba, Old: *old}
		d.sess.Seal(l.lba, p.ct[int64(i)*ss:int64(i+1)*ss], l.data, &r.New)
		recs = append(recs, r)
	}
	p.jrecs = recs
	d.ckpt.RLock()
	defer d.ckpt.RUnlock()
	if err := p.journal(recs); err != nil {
		return err
	}
	if err := p.inPlace(ls, recs); err != nil {
		// Some of the batch may be on disk, data or entries: each sector is unsettled until
		// settle (or a trim) makes its entry match its data. Marked while ckpt is held, so no
		// checkpoint retires these records in between.
		for i, l := range ls {
			p.markUnsettled(l.lba, pending{old: recs[i].Old, new: recs[i].New}, err)
		}
		return err
	}
	for _, l := range ls {
		if l.dirty {
			l.dirty = false
			p.dirty--
		}
	}
	d.e.Stats.Writebacks.Add(uint64(len(ls)))
	return nil
}

// inPlace writes a journaled batch's data (contiguous runs in one pwrite each), then its
// entries (each touched page once).
func (p *part) inPlace(ls []*line, recs []sector.JournalRecord) error {
	d := p.d
	ss := d.ss
	for i := 0; i < len(ls); {
		j := i + 1
		for j < len(ls) && ls[j].lba == ls[j-1].lba+1 {
			j++
		}
		if _, err := d.st.WriteAt(p.ct[int64(i)*ss:int64(j)*ss], d.h.DataPos(ls[i].lba)); err != nil {
			return fmt.Errorf("failed to write data: %w", err)
		}
		i = j
	}
	var last *metaPage
	for i, l := range ls {
		pg, err := p.page(l.lba / entriesPerPage)
		if err != nil {
			return err
		}
		pg.e[l.lba%entriesPerPage] = recs[i].New
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

// markUnsettled records that lba's journaled operation r failed part-way (cause). Write-backs
// and zeroings settle their part before journaling, so a sector is unsettled by one record at
// a time; were it not, the later record is the one recovery applies last.
func (p *part) markUnsettled(lba uint64, r pending, cause error) {
	if p.unsettled == nil {
		p.unsettled = map[uint64]pending{}
	}
	if _, ok := p.unsettled[lba]; !ok {
		p.d.noteUnsettled(1, cause)
	}
	p.unsettled[lba] = r
}

// settle finishes what recovery would for every unsettled sector, in the cached page and on
// disk: a zeroing gets its zero entry and punched data; a write-back the entry that
// authenticates the data on disk (Disk.authentic). The sector's record is still live
// (checkpoints wait for settling), so a crash in between recovers the same decision. A sector
// that authenticates with neither was damaged by more than a failed write: its entry is left
// alone and its reads fail until it is rewritten.
func (p *part) settle() error {
	if len(p.unsettled) == 0 {
		return nil
	}
	d := p.d
	// not p.ct: settle runs in the middle of a write-back whose sealed batch is there
	ct := make([]byte, d.ss, d.ss+sector.TagSize)
	pt := make([]byte, d.ss, d.ss+sector.TagSize)
	defer clear(pt)
	for lba, r := range p.unsettled {
		pg, err := p.page(lba / entriesPerPage)
		if err != nil {
			return err
		}
		e := &pg.e[lba%entriesPerPage]
		if r.zero {
			*e = sector.Entry{}
		} else {
			if _, err := d.st.ReadAt(ct, d.h.DataPos(lba)); err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("failed to read sector %d to settle it: %w", lba, err)
			}
			if v, ok := d.authentic(lba, pt, ct, &r.old, &r.new); ok {
				*e = v
			} else {
				d.e.opts.Logger.Error("sector authenticates with neither entry of its failed write-back", "asid", d.asid, "lba", lba)
			}
		}
		if err := p.writePage(pg); err != nil {
			return err
		}
		if r.zero {
			if err := punch(d.st, d.h.DataPos(lba), d.ss); err != nil {
				return err
			}
		}
		p.settled(lba)
	}
	return nil
}

// settled drops lba from the unsettled set: its operation is complete on disk.
func (p *part) settled(lba uint64) {
	if _, ok := p.unsettled[lba]; ok {
		delete(p.unsettled, lba)
		p.d.noteUnsettled(-1, nil)
	}
}

// journal appends recs (epoch and seq are filled in) and makes them durable, checkpointing
// first when the journal is full. The caller holds d.ckpt shared; it is released while a
// checkpoint runs.
func (p *part) journal(recs []sector.JournalRecord) error {
	d := p.d
	buf := p.recs[:len(recs)*sector.JournalRecordSize]
	fill := func(start, epoch uint64) {
		for i := range recs {
			recs[i].Epoch, recs[i].Seq = epoch, start+uint64(i)
			d.c.MarshalJournalRecord(&recs[i], buf[i*sector.JournalRecordSize:(i+1)*sector.JournalRecordSize])
		}
	}
	for {
		ok, err := d.jr.append(buf, fill)
		if err != nil || ok {
			return err
		}
		d.ckpt.RUnlock()
		if err = p.settle(); err == nil {
			err = d.checkpoint()
		}
		d.ckpt.RLock()
		if err != nil {
			return err
		}
	}
}

// zeroSectors turns whole sectors into holes: journal zero records, then zero entries and
// punched data. The caller (shard.zero) has settled the part.
func (p *part) zeroSectors(lbas []uint64) error {
	d := p.d
	for len(lbas) > 0 {
		n := min(len(lbas), p.batchMax())
		batch := lbas[:n]
		lbas = lbas[n:]
		recs := p.jrecs[:0]
		for _, lba := range batch {
			old, err := p.entry(lba)
			if err != nil {
				return err
			}
			recs = append(recs, sector.JournalRecord{Kind: sector.RecordZero, LBA: lba, Old: *old})
		}
		p.jrecs = recs
		d.ckpt.RLock()
		err := func() error {
			if err := p.journal(recs); err != nil {
				return err
			}
			if err := p.zeroInPlace(batch); err != nil {
				// The zero records are durable: recovery would finish them, so settle must.
				for _, lba := range batch {
					p.markUnsettled(lba, pending{zero: true}, err)
				}
				return err
			}
			return nil
		}()
		d.ckpt.RUnlock()
		if err != nil {
			return err
		}
		for _, lba := range batch {
			p.settled(lba)
		}
	}
	return nil
}

// zeroInPlace gives journaled sectors zero entries (each touched page written once), then
// punches their data (contiguous runs at once).
func (p *part) zeroInPlace(batch []uint64) error {
	d := p.d
	var last *metaPage
	for _, lba := range batch {
		pg, err := p.page(lba / entriesPerPage)
		if err != nil {
			return err
		}
		pg.e[lba%entriesPerPage] = sector.Entry{}
		if last != nil && last != pg {
			if err := p.writePage(last); err != nil {
				return err
			}
		}
		last = pg
	}
	if last != nil {
		if err := p.writePage(last); err != nil {
			return err
		}
	}
	for i := 0; i < len(batch); {
		j := i + 1
		for j < len(batch) && batch[j] == batch[j-1]+1 {
			j++
		}
		if err := punch(d.st, d.h.DataPos(batch[i]), int64(j-i)*d.ss); err != nil {
			return err
		}
		i = j
	}
	return nil
}

// shrink evicts least recently used lines beyond the cache bound, writing back dirty ones.
func (p *part) shrink() error {
	for len(p.lines) > p.maxLines {
		p.wb = p.wb[:0]
		var victims []*line
		for l := p.lineLRU.tail; l != nil && len(victims) < min(64, len(p.lines)-p.maxLines+32); l = l.prev {
			victims = append(victims, l)
			if l.dirty {
				p.wb = append(p.wb, l)
			}
		}
		if err := p.writeback(p.wb); err != nil {
			return err
		}
		for _, l := range victims {
			p.drop(l)
		}
	}
	return nil
}

// flushDirty writes back every dirty line (older than cutoff, when cutoff is set).
func (p *part) flushDirty(cutoff time.Time) error {
	if err := p.settle(); err != nil {
		return err
	}
	if p.dirty == 0 {
		return nil
	}
	p.wb = p.wb[:0]
	for l := p.lineLRU.head; l != nil; l = l.next {
		if l.dirty && (cutoff.IsZero() || l.dirtyAt.Before(cutoff)) {
			p.wb = append(p.wb, l)
		}
	}
	return p.writeback(p.wb)
}

// zeroise drops every line and page (detach).
func (p *part) zeroise() {
	for l := p.lineLRU.head; l != nil; {
		n := l.next
		p.drop(l)
		l = n
	}
	for _, l := range p.spare {
		clear(l.data[:cap(l.data)])
	}
	p.spare = nil
	p.d.noteUnsettled(-int64(len(p.unsettled)), nil)
	p.unsettled = nil
	clear(p.ct)
	p.pages = map[uint64]*metaPage{}
	p.pageLRU = lru[metaPage, *metaPage]{}
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// punch deallocates a range; filesystems without hole punching get zeros written instead.
func punch(st store.Store, off, n int64) error {
	err := st.Punch(off, n)
	if errors.Is(err, store.ErrPunchUnsupported) {
		_, err = st.WriteAt(make([]byte, n), off)
	}
	if err != nil {
		return fmt.Errorf("failed to punch: %w", err)
	}
	return nil
}
