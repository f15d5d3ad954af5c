package engine

import (
	"sync"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/sector"
)

// A part is one attached disk's state on one shard: the stripes of the disk that shard owns.
// Its concepts each have a file:
//
//	cache.go      plaintext sector lines (LRU, eviction)
//	metapages.go  cached metadata pages (CLOCK)
//	read.go       reads: cache hits, partial sectors; opening.go: whole sectors opened
//	              after the shard is released
//	write.go      guest writes into lines (read-modify-write, FUA)
//	writeback.go  sealing dirty lines and appending them to the journal
//	apply.go      writing committed journal appends in place
//	zero.go       trim and write-zeroes
//	status.go     block status

// entriesPerPage is the number of 64-byte entries in one 4 KiB metadata page.
const entriesPerPage = 4096 / format.MetaEntrySize

var _ [64 - entriesPerPage]struct{} // a page's sectors fit one slotChunk mask word

// maxWriteback bounds one writeback batch (sealed and appended to the journal at once).
const maxWriteback = 1024

// part is touched only by the goroutine holding its shard (the shard's worker, or a
// submitter running a descriptor inline), so it has no lock of its own: this is what makes
// read-modify-write race-free. The one exception is opening, which reads the store and the
// guest buffer outside the shard, ordered by gate.
type part struct {
	d     *Disk
	shard int

	slots    slots // each sector's line and unapplied append (slots.go)
	lineLRU  lineList
	maxLines int
	// dirtyLines is every dirty line, in no order (line.dirtyIdx), so a flush or an idle
	// write-back visits what is dirty, not the whole cache.
	dirtyLines []*line
	maxDirty   int     // dirty lines past which shrink writes them back (Options.DirtyBytes)
	spare      []*line // dropped lines kept with their buffers for reuse; zeroised at detach

	pages     map[uint64]*metaPage
	pageRing  []*metaPage // every cached page, in CLOCK order; len ≤ maxPages
	hand      int         // the CLOCK hand: next index of pageRing to consider
	lastPage  *metaPage   // the page page() returned last: never the one evicted
	spareMeta *metaPage   // an evicted page's memory, for the next miss
	maxPages  int

	// Journal appends not yet applied in place (apply.go), oldest first, and their bytes;
	// maxPending bounds the bytes before a commit is forced. Each of their sectors keeps its
	// latest ciphertext in slots (slots.ref), which reads use while the data region is stale.
	pending      []*pendingWrite
	pendingBytes int
	maxPending   int
	heldBytes    int // of pendingBytes, placed appends in place waiting for a sync (applyIf)

	// scratch
	ct, pagebuf []byte
	ents        []sector.Entry
	lbas        []uint64
	wb, victims []*line
	runs, rest  []*line // a write-back's placed runs and the rest (writebackBatch)

	// gate orders reads that open sectors after the shard is released (opening) against
	// changes to those sectors' bytes in the store. Such a read holds it shared from taking the
	// sectors' entries, under the shard, until it has opened them; writing data in place or
	// punching it holds it exclusively. Both are taken only by the shard's holder, so a read
	// never waits for it, and a write-back waits only for reads already under way.
	gate sync.RWMutex
}

func newPart(d *Disk, shard, maxLines, maxPages int) *part {
	return &part{
		d: d, shard: shard, slots: newSlots(), maxLines: maxLines,
		pages: map[uint64]*metaPage{}, maxPages: max(maxPages, 2),
		ct:      make([]byte, maxWriteback*int(d.ss)+sector.TagSize),
		pagebuf: make([]byte, 4096),
		// appends' ciphertexts wait in memory: commit once a quarter of the cache's worth waits
		maxPending: max(maxLines/4, 1) * int(d.ss),
	}
}

// zeroise drops every line and page and clears every buffer that held plaintext (detach).
func (p *part) zeroise() {
	for l := p.lineLRU.head; l != nil; {
		n := l.next
		p.drop(l)
		l = n
	}
	p.slots.reset() // the disk is closed: its appends are in place, or recovery's
	for _, l := range p.spare {
		clear(l.data[:cap(l.data)])
	}
	p.spare, p.victims, p.wb, p.dirtyLines, p.runs, p.rest = nil, nil, nil, nil, nil, nil
	for _, w := range p.pending {
		w.free()
	}
	p.pending, p.pendingBytes, p.heldBytes = nil, 0, 0
	clear(p.ct)
	p.pages = map[uint64]*metaPage{}
	p.pageRing, p.hand, p.lastPage = nil, 0, nil
}
