package tree

import (
	"fmt"

	"github.com/sealdisk/sealdisk/format"
)

// Builder computes a tree from its leaves in one ordered pass, holding one node per level:
// for the offline tools, which build a new image's tree (seal) or recompute an image's root
// from its metadata region (scrub) in memory independent of the image's size.
type Builder struct {
	h     *format.Header
	st    Store // nil: compute only
	cur   []*building
	buf   []byte
	last  uint64
	added bool
}

type building struct {
	index uint64
	n     Node
}

// NewBuilder starts a build for the image with header h; a non-nil st receives every
// non-empty node (empty nodes are the region's holes and are not written).
func NewBuilder(h *format.Header, st Store) *Builder {
	return &Builder{h: h, st: st, cur: make([]*building, len(format.TreeLevels(h.Pages()))), buf: make([]byte, format.TreeNodeSize)}
}

// Add sets page's leaf; pages come in increasing order, and a page not added is empty.
func (b *Builder) Add(page uint64, leaf Digest) error {
	if page >= b.h.Pages() {
		return fmt.Errorf("tree: page %d beyond the image's %d metadata pages", page, b.h.Pages())
	}
	if b.added && page <= b.last {
		return fmt.Errorf("tree: page %d added after page %d", page, b.last)
	}
	b.last, b.added = page, true
	if leaf == (Digest{}) {
		return nil
	}
	return b.set(1, page/format.TreeArity, page%format.TreeArity, leaf)
}

// set puts d in child slot of node (level, index), finishing the level's previous node when
// index moves past it.
func (b *Builder) set(level int, index, slot uint64, d Digest) error {
	c := b.cur[level-1]
	if c != nil && c.index != index {
		if _, err := b.finish(level); err != nil {
			return err
		}
		c = nil
	}
	if c == nil {
		c = &building{index: index}
		b.cur[level-1] = c
	}
	c.n[slot] = d
	return nil
}

// finish writes the level's current node and carries its digest up (returned for the top).
func (b *Builder) finish(level int) (Digest, error) {
	c := b.cur[level-1]
	b.cur[level-1] = nil
	d := NodeDigest(b.h.UUID, level, c.index, &c.n)
	if b.st != nil && d != (Digest{}) {
		c.n.encode(b.buf)
		if _, err := b.st.WriteAt(b.buf, b.h.TreeNodePos(level, c.index)); err != nil {
			return Digest{}, fmt.Errorf("failed to write tree node %d at level %d: %w", c.index, level, err)
		}
	}
	if level == len(b.cur) {
		return d, nil
	}
	return d, b.set(level+1, c.index/format.TreeArity, c.index%format.TreeArity, d)
}

// Root finishes every level and returns the root digest (zero for a tree with no leaves).
// The Builder is spent afterwards.
func (b *Builder) Root() (Digest, error) {
	for level := 1; level <= len(b.cur); level++ {
		if b.cur[level-1] == nil {
			continue
		}
		d, err := b.finish(level)
		if err != nil || level == len(b.cur) {
			return d, err
		}
	}
	return Digest{}, nil
}

// encode writes n's digests, in child order, into buf (format.TreeNodeSize bytes).
func (n *Node) encode(buf []byte) {
	for i := range n {
		copy(buf[i*32:], n[i][:])
	}
}
