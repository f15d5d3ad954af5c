package engine

// slots is what a part knows of each sector beyond its metadata page: its cache line, and
// its latest ciphertext in an append not yet applied in place (unappliedRef). They are kept
// in chunks of one metadata page's sectors, so that a run of sectors — a 1 MiB write is 256 —
// costs one map lookup per 64 sectors, not several per sector (lines, unapplied appends and
// their mask were three maps keyed by sector: a tenth of the server's cycles in 1 MiB writes).
type slots struct {
	chunks map[uint64]*slotChunk // by metadata page index
	last   *slotChunk            // the chunk looked up last (runs ask for one many times)
	spare  *slotChunk            // an emptied chunk, for the next new one
	lines  int                   // sectors with a line
}

// slotChunk is one metadata page's sectors. mask bit i is set when sector i has a line or an
// unapplied append; refd when it has the latter.
type slotChunk struct {
	idx        uint64
	mask, refd uint64
	lines      [entriesPerPage]*line
	refs       [entriesPerPage]unappliedRef
}

func newSlots() slots { return slots{chunks: map[uint64]*slotChunk{}} }

// get is lba's chunk, or nil.
func (s *slots) get(lba uint64) *slotChunk {
	idx := lba / entriesPerPage
	if c := s.last; c != nil && c.idx == idx {
		return c
	}
	c := s.chunks[idx]
	if c != nil {
		s.last = c
	}
	return c
}

// make is lba's chunk, created empty if it has none.
func (s *slots) make(lba uint64) *slotChunk {
	if c := s.get(lba); c != nil {
		return c
	}
	c := s.spare
	s.spare = nil
	if c == nil {
		c = new(slotChunk)
	}
	c.idx = lba / entriesPerPage
	s.chunks[c.idx] = c
	s.last = c
	return c
}

// release drops c if it holds nothing.
func (s *slots) release(c *slotChunk) {
	if c.mask != 0 {
		return
	}
	delete(s.chunks, c.idx)
	if s.last == c {
		s.last = nil
	}
	s.spare = c // empty: every line and ref in it is nil already
}

// line is lba's cache line, or nil.
func (s *slots) line(lba uint64) *line {
	if c := s.get(lba); c != nil {
		return c.lines[lba%entriesPerPage]
	}
	return nil
}

// setLine records l as its sector's line.
func (s *slots) setLine(l *line) {
	c, i := s.make(l.lba), l.lba%entriesPerPage
	if c.lines[i] == nil {
		s.lines++
	}
	c.lines[i] = l
	c.mask |= 1 << i
}

// dropLine forgets lba's line, if it has one.
func (s *slots) dropLine(lba uint64) {
	c := s.get(lba)
	if c == nil {
		return
	}
	i := lba % entriesPerPage
	if c.lines[i] != nil {
		c.lines[i] = nil
		s.lines--
	}
	if c.refd&(1<<i) == 0 {
		c.mask &^= 1 << i
		s.release(c)
	}
}

// ref is lba's unapplied append, if it has one.
func (s *slots) ref(lba uint64) (unappliedRef, bool) {
	c := s.get(lba)
	if c == nil {
		return unappliedRef{}, false
	}
	i := lba % entriesPerPage
	if c.refd&(1<<i) == 0 {
		return unappliedRef{}, false
	}
	return c.refs[i], true
}

// setRef records r as lba's latest unapplied ciphertext.
func (s *slots) setRef(lba uint64, r unappliedRef) {
	c, i := s.make(lba), lba%entriesPerPage
	c.refs[i] = r
	c.refd |= 1 << i
	c.mask |= 1 << i
}

// dropRef forgets lba's unapplied append, if it has one (and is r, when only is set).
func (s *slots) dropRef(lba uint64, r unappliedRef, only bool) {
	c := s.get(lba)
	if c == nil {
		return
	}
	i := lba % entriesPerPage
	if c.refd&(1<<i) == 0 || (only && c.refs[i] != r) {
		return
	}
	c.refs[i] = unappliedRef{}
	c.refd &^= 1 << i
	if c.lines[i] == nil {
		c.mask &^= 1 << i
		s.release(c)
	}
}

// maskAt is the mask of metadata page idx's sectors (0: none has a line or an append).
func (s *slots) maskAt(idx uint64) uint64 {
	if c := s.get(idx * entriesPerPage); c != nil {
		return c.mask
	}
	return 0
}

// reset forgets everything (detach: the lines are dropped by the caller first).
func (s *slots) reset() { *s = newSlots() }
