package engine

import (
	"errors"
	"fmt"
	"io"
	"math/bits"
	"slices"
	"sync"
	"time"

	"github.com/sealdisk/sealdisk/dma"
	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/sector"
	"github.com/sealdisk/sealdisk/store"
)

// entriesPerPage is the number of 64-byte entries in one 4 KiB metadata page.
const entriesPerPage = 4096 / format.MetaEntrySize

var _ [64 - entriesPerPage]struct{} // a page's sectors fit one lineMask word

// maxWriteback bounds one writeback batch (journal records appended and synced at once).
const maxWriteback = 1024

// line is one cached plaintext sector.
type line struct {
	prev, next *line // LRU list, most recent at head
	lba        uint64
	data       []byte // sector bytes; cap sector+TagSize
	dirty      bool
	dirtyAt    time.Time
}

// metaPage is one cached metadata page. Pages are always clean: every change to an entry is
// written at once (inPlace, zeroInPlace, settle).
type metaPage struct {
	idx uint64
	ref bool // CLOCK reference bit: used since the hand last passed
	e   [entriesPerPage]sector.Entry
}

// part is one disk's state on one shard. Only the goroutine holding the shard (its worker,
// or a submitter running a descriptor inline) touches it, so it has no lock of its own: this
// is what makes read-modify-write race-free. The one exception is opening, which reads the
// store and the guest buffer outside the shard, ordered by gate.
type part struct {
	d     *Disk
	shard int

	lines    map[uint64]*line
	lineMask map[uint64]uint64 // metadata page index -> bit i set: its sector i has a line (absent: 0)
	lineLRU  lineList
	maxLines int
	dirty    int
	spare    []*line // dropped lines kept with their buffers for reuse; zeroised at detach

	pages             map[uint64]*metaPage
	pageRing          []*metaPage // every cached page, in CLOCK order; len ≤ maxPages
	hand              int         // the CLOCK hand: next index of pageRing to consider
	lastPage          *metaPage   // the page page() returned last: never the one evicted
	maxPages          int
	ct, recs, pagebuf []byte // scratch
	jrecs             []sector.JournalRecord
	ents              []sector.Entry
	wb, victims       []*line

	// gate orders reads that open sectors after the shard is released (opening) against
	// changes to those sectors' bytes in the store. Such a read holds it shared from taking the
	// sectors' entries, under the shard, until it has opened them; writing data in place or
	// punching it holds it exclusively. Both are taken only by the shard's holder, so a read
	// never waits for it, and a write-back waits only for reads already under way.
	gate sync.RWMutex

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
		d: d, shard: shard, lines: map[uint64]*line{}, lineMask: map[uint64]uint64{}, maxLines: maxLines,
		pages: map[uint64]*metaPage{}, maxPages: max(maxPages, 2),
		ct:      make([]byte, maxWriteback*int(d.ss)+sector.TagSize),
		recs:    make([]byte, maxWriteback*sector.JournalRecordSize),
		pagebuf: make([]byte, 4096),
	}
}

// --- sector lines ---

// lineList is the intrusive doubly linked LRU list of a part's lines, most recently used at
// head.
type lineList struct{ head, tail *line }

func (q *lineList) touch(x *line) {
	if q.head == x {
		return
	}
	q.unlink(x)
	x.next = q.head
	if q.head != nil {
		q.head.prev = x
	}
	q.head = x
	if q.tail == nil {
		q.tail = x
	}
}

func (q *lineList) unlink(x *line) {
	if x.prev != nil {
		x.prev.next = x.next
	} else if q.head == x {
		q.head = x.next
	}
	if x.next != nil {
		x.next.prev = x.prev
	} else if q.tail == x {
		q.tail = x.prev
	}
	x.prev, x.next = nil, nil
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
	if pg, m := l.lba/entriesPerPage, p.lineMask[l.lba/entriesPerPage]&^lineBit(l.lba); m == 0 {
		delete(p.lineMask, pg)
	} else {
		p.lineMask[pg] = m
	}
	if l.dirty {
		l.dirty = false
		p.dirty--
	}
	p.spare = append(p.spare, l)
}

// insert caches l (from newLine) as most recently used.
func (p *part) insert(l *line) *line {
	p.lines[l.lba] = l
	p.lineMask[l.lba/entriesPerPage] |= lineBit(l.lba)
	p.lineLRU.touch(l)
	return l
}

// lineBit is lba's bit in its page's lineMask.
func lineBit(lba uint64) uint64 { return 1 << (lba % entriesPerPage) }

// cached returns lba's line, or nil. Most sectors have none, and their page's mask says so
// without a lookup in lines.
func (p *part) cached(lba uint64) *line {
	if p.lineMask[lba/entriesPerPage]&lineBit(lba) == 0 {
		return nil
	}
	return p.lines[lba]
}

// uncached is how many sectors from lba on, at most n, have no line: one mask per metadata
// page's worth of sectors.
func (p *part) uncached(lba uint64, n int64) int64 {
	for k := int64(0); k < n; {
		a := lba + uint64(k)
		if m := p.lineMask[a/entriesPerPage] >> (a % entriesPerPage); m != 0 {
			return min(n, k+int64(bits.TrailingZeros64(m)))
		}
		k += int64(entriesPerPage - a%entriesPerPage)
	}
	return n
}

func (p *part) markDirty(l *line, now time.Time) {
	if !l.dirty {
		l.dirty = true
		p.dirty++
	}
	l.dirtyAt = now
}

// --- metadata pages ---

// page returns metadata page idx, reading it on a miss. A hit sets the page's reference bit
// and touches no other page's memory; a miss with the cache full evicts by CLOCK and reuses
// the evicted page's memory. The page returned by the previous call is never the one evicted,
// so a caller may hold one page while it asks for the next (inPlace, zeroInPlace); no caller
// holds more.
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
	ents, any, err := p.entries(p.ents[:0], a, int(b-a))
	p.ents = ents
	if err != nil {
		return err
	}
	if any {
		if err := d.readSectors(ct, a); err != nil {
			return err
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

// readDirect decrypts the uncached sectors i..j-1 of a read descriptor, at least one of them
// partial (an unaligned read), into the guest buffer through p.ct, under the shard. Runs of
// whole sectors are opened after the shard is released instead (opening).
func (p *part) readDirect(desc *dma.Descriptor, i, j int64) error {
	d := p.d
	ss := d.ss
	a := desc.LBA + uint64(i)
	n := j - i
	d.e.Stats.CacheMisses.Add(uint64(n))
	ents, any, err := p.entries(p.ents[:0], a, int(n))
	p.ents = ents
	if err != nil {
		return err
	}
	bLo, _, sLo := span(desc, i, ss)
	_, bHi, _ := span(desc, j-1, ss)
	run := p.ct[:n*ss]
	if any {
		if err := d.readSectors(run, a); err != nil {
			clear(run)
			return err
		}
	}
	err = d.c.OpenSectors(a, run, ents)
	if err == nil {
		copy(desc.Buf[bLo:bHi], run[sLo:])
	}
	clear(run)
	if err != nil {
		return p.openFailed(desc.Buf, err)
	}
	return nil
}

// readSectors reads the ciphertext of the len(buf)/ss sectors from a on. A file that ends
// inside them (never-written sectors at the end of a sparse image) is not an error: those
// sectors' zero entries make them read as zeros whatever buf holds.
func (d *Disk) readSectors(buf []byte, a uint64) error {
	if _, err := d.st.ReadAt(buf, d.h.DataPos(a)); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("failed to read sectors %d-%d: %w", a, a+uint64(int64(len(buf))/d.ss)-1, err)
	}
	return nil
}

// openFailed clears a read's guest buffer after a sector failed to open and returns the
// read's error: ErrIntegrity (counted and logged) for an authentication failure.
func (p *part) openFailed(buf []byte, err error) error {
	clear(buf)
	if errors.Is(err, sector.ErrAuth) {
		p.d.e.Stats.AuthFailures.Add(1)
		p.d.e.opts.Logger.Error("sector failed authentication", "asid", p.d.asid, "error", err)
		return fmt.Errorf("%w: %v", ErrIntegrity, err)
	}
	return err
}

// opening is the part of a read performed after its shard is released, by whoever performed
// the descriptor: runs of whole uncached sectors, each copied from the store straight into the
// guest buffer and opened there in place. Copying and AES are nearly all of a large read's
// cost; done outside the shard, they run on every core that has reads to do, while the shard
// serves other descriptors, so a burst of reads on one shard does not leave the other cores
// idle. The runs' entries are taken under the shard, and p.gate is read-held from then until
// release, so nothing changes those sectors' bytes in the store in between (part.gate).
type opening struct {
	p    *part
	buf  []byte // the descriptor's guest buffer
	runs []openRun
	ents []sector.Entry // runs' entries, back to back
}

// openRun is one run: guest buffer bytes [lo, hi) are whole sectors from lba on.
type openRun struct {
	lba    uint64
	lo, hi int64
	stored bool // some entry is non-zero, so the store is read (else the run is zeros)
}

var openingPool = sync.Pool{New: func() any { return new(opening) }}

// addOpening records sectors i..j-1 of desc, all whole and uncached (guest buffer bytes
// [bLo, bHi)), for opening after the shard is released; o is nil for the descriptor's first
// run. On failure o is released. The shard is held.
func (p *part) addOpening(o *opening, desc *dma.Descriptor, i, j int64, bLo, bHi int64) (*opening, error) {
	a := desc.LBA + uint64(i)
	p.d.e.Stats.CacheMisses.Add(uint64(j - i))
	if o == nil {
		o = openingPool.Get().(*opening)
		o.p, o.buf = p, desc.Buf
		p.gate.RLock() // never waits: exclusive holders hold the shard, as the caller does
	}
	ents, any, err := p.entries(o.ents, a, int(j-i))
	o.ents = ents
	if err != nil {
		o.release()
		return nil, err
	}
	o.runs = append(o.runs, openRun{lba: a, lo: bLo, hi: bHi, stored: any})
	return o, nil
}

// run copies and opens every run, then releases o. The shard is not held.
func (o *opening) run() error {
	defer o.release()
	p := o.p
	d := p.d
	ents := o.ents
	for _, r := range o.runs {
		// capped at the descriptor's end: OpenSectors may borrow bytes after a run, which
		// past the end belong to another descriptor
		buf := o.buf[r.lo:r.hi:len(o.buf)]
		n := (r.hi - r.lo) / d.ss
		if r.stored {
			if err := d.readSectors(buf, r.lba); err != nil {
				clear(o.buf)
				return err
			}
		}
		if err := d.c.OpenSectors(r.lba, buf, ents[:n]); err != nil {
			return p.openFailed(o.buf, err)
		}
		ents = ents[n:]
	}
	return nil
}

// release ends the read's hold on the part and returns o to the pool.
func (o *opening) release() {
	o.p.gate.RUnlock()
	clear(o.ents)
	o.p, o.buf, o.runs, o.ents = nil, nil, o.runs[:0], o.ents[:0]
	openingPool.Put(o)
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
	if err := p.writeData(ls); err != nil {
		return err
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

// writeData writes a sealed batch's data from p.ct, contiguous runs in one pwrite each, once no
// read is opening sectors of the part outside the shard.
func (p *part) writeData(ls []*line) error {
	d := p.d
	ss := d.ss
	p.gate.Lock()
	defer p.gate.Unlock()
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
			p.gate.Lock()
			err := punch(d.st, d.h.DataPos(lba), d.ss)
			p.gate.Unlock()
			if err != nil {
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
	p.gate.Lock()
	defer p.gate.Unlock()
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
		p.wb, p.victims = p.wb[:0], p.victims[:0]
		for l := p.lineLRU.tail; l != nil && len(p.victims) < min(64, len(p.lines)-p.maxLines+32); l = l.prev {
			p.victims = append(p.victims, l)
			if l.dirty {
				p.wb = append(p.wb, l)
			}
		}
		if err := p.writeback(p.wb); err != nil {
			return err
		}
		for _, l := range p.victims {
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
	p.spare, p.victims, p.wb = nil, nil, nil
	p.d.noteUnsettled(-int64(len(p.unsettled)), nil)
	p.unsettled = nil
	clear(p.ct)
	p.pages = map[uint64]*metaPage{}
	p.pageRing, p.hand, p.lastPage = nil, 0, nil
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
