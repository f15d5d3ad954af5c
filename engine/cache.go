package engine

import (
	"math/bits"
	"time"

	"github.com/sealdisk/sealdisk/sector"
)

// The plaintext write-back cache of a part: one line per cached sector, in an LRU list, with
// a bit mask per metadata page's worth of sectors (slots.go) saying which have a line or an unapplied
// journal append (apply.go) — the sectors a read must not take from the data region. Reads do
// not allocate lines (read.go); writes do (write.go); shrink evicts beyond the bound, writing
// dirty lines back first (writeback.go).

// line is one cached plaintext sector.
type line struct {
	prev, next *line // LRU list, most recent at head
	lba        uint64
	data       []byte // sector bytes; cap sector+TagSize
	dirty      bool
	dirtyAt    time.Time
	dirtyIdx   int // its index in part.dirtyLines while dirty
}

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
	p.slots.dropLine(l.lba)
	p.markClean(l)
	p.spare = append(p.spare, l)
}

// insert caches l (from newLine) as most recently used.
func (p *part) insert(l *line) *line {
	p.slots.setLine(l)
	p.lineLRU.touch(l)
	return l
}

// cached returns lba's line, or nil.
func (p *part) cached(lba uint64) *line { return p.slots.line(lba) }

// uncached is how many sectors from lba on, at most n, have no line and no unapplied append
// (their ciphertext is the data region's): one mask per metadata page's worth of sectors.
func (p *part) uncached(lba uint64, n int64) int64 {
	for k := int64(0); k < n; {
		a := lba + uint64(k)
		if m := p.slots.maskAt(a/entriesPerPage) >> (a % entriesPerPage); m != 0 {
			return min(n, k+int64(bits.TrailingZeros64(m)))
		}
		k += int64(entriesPerPage - a%entriesPerPage)
	}
	return n
}

func (p *part) markDirty(l *line, now time.Time) {
	if !l.dirty {
		l.dirty = true
		l.dirtyIdx = len(p.dirtyLines)
		p.dirtyLines = append(p.dirtyLines, l)
	}
	l.dirtyAt = now
}

// markClean records that l's content is on disk.
func (p *part) markClean(l *line) {
	if l.dirty {
		l.dirty = false
		last := p.dirtyLines[len(p.dirtyLines)-1]
		p.dirtyLines[l.dirtyIdx], last.dirtyIdx = last, l.dirtyIdx
		p.dirtyLines[len(p.dirtyLines)-1] = nil
		p.dirtyLines = p.dirtyLines[:len(p.dirtyLines)-1]
	}
}

// shrink evicts least recently used lines beyond the cache bound, writing back dirty ones.
// A line whose sector's append is not applied yet may go too: reads then open the append's
// ciphertext, kept in memory until it is applied (p.slots.ref).
func (p *part) shrink() error {
	for p.slots.lines > p.maxLines {
		p.wb, p.victims = p.wb[:0], p.victims[:0]
		want := min(64, p.slots.lines-p.maxLines+32)
		for l := p.lineLRU.tail; l != nil && len(p.victims) < want; l = l.prev {
			p.victims = append(p.victims, l)
			if l.dirty {
				p.wb = append(p.wb, l)
			}
		}
		if err := p.writeback(p.wb, true); err != nil {
			return err
		}
		for _, l := range p.victims {
			if p.slots.line(l.lba) == l { // a write-back's relieve may have dropped none, but be sure
				p.drop(l)
			}
		}
	}
	if len(p.dirtyLines) > p.maxDirty {
		// Write back an eighth of the bound, the cheap way (no sync), so dirty data stays
		// under it and a later flush seals little; a slice at a time, not every dirty line
		// at once, so the requests behind this one wait for a few hundred sectors' sealing,
		// not thousands. A failure fails no guest request — the lines stay dirty, and the
		// flush that needs them reports it.
		n := len(p.dirtyLines) - p.maxDirty + max(p.maxDirty/8, 1) // ≤ len: maxDirty ≥ 1
		p.wb = append(p.wb[:0], p.dirtyLines[:n]...)
		if err := p.writeback(p.wb, true); err != nil {
			p.d.e.opts.Logger.Debug("background write-back failed; the lines stay dirty", "asid", p.d.asid, "error", err)
		}
	}
	return nil
}
