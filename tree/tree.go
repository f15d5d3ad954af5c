// Package tree is the integrity tree of a version-2 image (FORMAT.md §7): a hash tree over the
// metadata pages whose root the PSP authenticates in the root record, so that a changed,
// zeroed, punched or rolled-back page of entries is caught even when each entry is itself an
// authentic old one. The tree never hashes data: each entry's AEAD tag binds its sector.
//
// Tree is the in-memory view: nodes are read from the image's tree region on demand and
// verified against their parent on the way down from the root; SetLeaf changes a leaf and
// marks its path; Root rehashes the marked nodes; WriteBack writes every changed node in place.
// The engine, the offline tools and scrub all use it, so the rules live in one place.
package tree

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/internal/zeros"
)

// Digest is a SHA-256 digest. The zero Digest stands for an empty subtree: a page of zero
// entries (never written or trimmed) or a node all of whose children are empty, so a new
// image's tree region is all holes.
type Digest [32]byte

// Node is one tree node: the digests of its TreeArity children (zero past the last child).
type Node [format.TreeArity]Digest

const (
	leafLabel = "sealdisk v2 leaf"
	nodeLabel = "sealdisk v2 node"
)

// LeafDigest is the digest of metadata page index page (page: format.MetaPageSize bytes):
// zero for an all-zero page, else SHA-256(label || image_uuid || u64(page) || page).
func LeafDigest(uuid [16]byte, page uint64, b []byte) Digest {
	if len(b) != format.MetaPageSize {
		panic("BUG: tree: leaf of a partial page")
	}
	if zeros.All(b) {
		return Digest{}
	}
	h := sha256.New()
	var pre [len(leafLabel) + 16 + 8]byte
	copy(pre[:], leafLabel)
	copy(pre[len(leafLabel):], uuid[:])
	binary.BigEndian.PutUint64(pre[len(leafLabel)+16:], page)
	h.Write(pre[:])
	h.Write(b)
	var d Digest
	h.Sum(d[:0])
	return d
}

// NodeDigest is the digest of node index at level (1 over the leaves): zero when every child
// is zero, else SHA-256(label || image_uuid || u16(level) || u64(index) || children).
func NodeDigest(uuid [16]byte, level int, index uint64, n *Node) Digest {
	if *n == (Node{}) {
		return Digest{}
	}
	h := sha256.New()
	var pre [len(nodeLabel) + 16 + 2 + 8]byte
	copy(pre[:], nodeLabel)
	copy(pre[len(nodeLabel):], uuid[:])
	binary.BigEndian.PutUint16(pre[len(nodeLabel)+16:], uint16(level))
	binary.BigEndian.PutUint64(pre[len(nodeLabel)+18:], index)
	h.Write(pre[:])
	for i := range n {
		h.Write(n[i][:])
	}
	var d Digest
	h.Sum(d[:0])
	return d
}

// ErrMismatch is wrapped by every verification failure: a page or node that does not match
// the digest its parent (or the root) holds.
var ErrMismatch = errors.New("integrity tree mismatch")

// MismatchError says where the tree did not verify.
type MismatchError struct {
	Level int    // 0: the leaf (the metadata page itself); ≥ 1: a node
	Index uint64 // page or node index at that level
}

func (e *MismatchError) Error() string {
	if e.Level == 0 {
		return fmt.Sprintf("%v: metadata page %d does not match its digest in the tree", ErrMismatch, e.Index)
	}
	return fmt.Sprintf("%v: tree node %d at level %d does not match its parent", ErrMismatch, e.Index, e.Level)
}

func (e *MismatchError) Unwrap() error { return ErrMismatch }

// Store is what the tree reads its nodes from and writes them back to.
type Store interface {
	io.ReaderAt
	io.WriterAt
}

type key struct {
	level int
	index uint64
}

type cached struct {
	n       Node
	stale   bool // a child changed since Root last ran: this node's digest in its parent is out of date
	changed bool // differs from the tree region: WriteBack writes it (pinned until then)
}

// Tree is an image's integrity tree in memory. It is safe for concurrent use.
type Tree struct {
	h      *format.Header
	st     Store
	levels []uint64 // node count per level, 1-based levels at [level-1]

	mu      sync.Mutex // guards everything below
	root    Digest
	trusted bool // nodes loaded are checked against their parents (false only while recovering)
	nodes   map[key]*cached
	stale   []map[uint64]bool // per level-1: nodes whose digest must be recomputed
	clean   int               // cached nodes that are neither stale nor changed
	max     int               // clean nodes kept before some are dropped
	buf     []byte
}

// New is the tree of the image with header h (h.Tree set) whose authenticated root is root.
// maxNodes bounds the clean nodes cached (changed nodes stay until WriteBack).
func New(h *format.Header, st Store, root Digest, maxNodes int) *Tree {
	if !h.Tree {
		panic("BUG: tree: image has no integrity tree")
	}
	ls := format.TreeLevels(h.Pages())
	return &Tree{h: h, st: st, levels: ls, root: root, trusted: true, nodes: map[key]*cached{},
		stale: make([]map[uint64]bool, len(ls)), max: max(maxNodes, 2*len(ls)), buf: make([]byte, format.TreeNodeSize)}
}

// Recovering is a tree whose nodes are taken from the tree region unchecked, for recovery:
// the caller replays the journal's leaves with SetLeaf, then compares Root with the root the
// committed root record holds, and calls Trust when they are equal.
func Recovering(h *format.Header, st Store, maxNodes int) (*Tree, error) {
	t := New(h, st, Digest{}, maxNodes)
	t.trusted = false
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, err := t.load(len(t.levels), 0); err != nil { // sets the root as the region holds it
		return nil, err
	}
	return t, nil
}

// Trust ends recovery: the root is now authenticated and every cached node matches it.
func (t *Tree) Trust() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.rootLocked()
	t.trusted = true
}

// Levels is the number of node levels.
func (t *Tree) Levels() int { return len(t.levels) }

// load returns node (level, index), reading it and checking it against its parent's digest
// (the root for the top node) on a miss. The caller holds mu.
func (t *Tree) load(level int, index uint64) (*cached, error) {
	k := key{level, index}
	if c := t.nodes[k]; c != nil {
		return c, nil
	}
	var want Digest
	top := level == len(t.levels)
	if top {
		want = t.root
	} else {
		p, err := t.load(level+1, index/format.TreeArity)
		if err != nil {
			return nil, err
		}
		want = p.n[index%format.TreeArity]
	}
	if _, err := t.st.ReadAt(t.buf, t.h.TreeNodePos(level, index)); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("failed to read tree node %d at level %d: %w", index, level, err)
	}
	c := &cached{}
	for i := range c.n {
		copy(c.n[i][:], t.buf[i*32:])
	}
	clear(t.buf)
	if t.trusted && NodeDigest(t.h.UUID, level, index, &c.n) != want {
		return nil, &MismatchError{Level: level, Index: index}
	}
	if top && !t.trusted {
		t.root = NodeDigest(t.h.UUID, level, index, &c.n)
	}
	t.trim() // before inserting c: the caller holds on to it
	t.nodes[k] = c
	t.clean++
	return c, nil
}

// trim drops clean nodes beyond the bound, keeping the top (it anchors every other load).
func (t *Tree) trim() {
	for k, c := range t.nodes {
		if t.clean < t.max {
			return
		}
		if !c.stale && !c.changed && k.level != len(t.levels) {
			delete(t.nodes, k)
			t.clean--
		}
	}
}

// Leaf returns the digest the tree holds for page.
func (t *Tree) Leaf(page uint64) (Digest, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	n, err := t.load(1, page/format.TreeArity)
	if err != nil {
		return Digest{}, err
	}
	return n.n[page%format.TreeArity], nil
}

// Verify checks that leaf, the digest of page as read, is the one the tree holds.
func (t *Tree) Verify(page uint64, leaf Digest) error {
	got, err := t.Leaf(page)
	if err != nil {
		return err
	}
	if got != leaf {
		return &MismatchError{Level: 0, Index: page}
	}
	return nil
}

// SetLeaf records page's new digest. Its path is marked for Root and WriteBack.
func (t *Tree) SetLeaf(page uint64, leaf Digest) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	n, err := t.load(1, page/format.TreeArity)
	if err != nil {
		return err
	}
	if n.n[page%format.TreeArity] == leaf {
		return nil
	}
	n.n[page%format.TreeArity] = leaf
	t.mark(n, 1, page/format.TreeArity) // before any other load, which may drop clean nodes
	// The whole path stays cached until WriteBack: Root needs each parent.
	idx := page / format.TreeArity / format.TreeArity
	for level := 2; level <= len(t.levels); level++ {
		c, err := t.load(level, idx)
		if err != nil {
			return err
		}
		t.mark(c, level, idx)
		idx /= format.TreeArity
	}
	return nil
}

func (t *Tree) mark(c *cached, level int, idx uint64) {
	if !c.stale && !c.changed {
		t.clean--
	}
	c.stale, c.changed = true, true
	if t.stale[level-1] == nil {
		t.stale[level-1] = map[uint64]bool{}
	}
	t.stale[level-1][idx] = true
}

// Root rehashes every marked node, bottom up, and returns the root digest.
func (t *Tree) Root() Digest {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.rootLocked()
}

func (t *Tree) rootLocked() Digest {
	for level := 1; level <= len(t.levels); level++ {
		for idx := range t.stale[level-1] {
			c := t.nodes[key{level, idx}]
			d := NodeDigest(t.h.UUID, level, idx, &c.n)
			c.stale = false
			if level == len(t.levels) {
				t.root = d
				continue
			}
			p := t.nodes[key{level + 1, idx / format.TreeArity}]
			p.n[idx%format.TreeArity] = d
		}
		clear(t.stale[level-1])
	}
	return t.root
}

// WriteBack rehashes (Root) and writes every changed node to the tree region. The nodes are
// durable after the caller's sync; until then the caller keeps whatever recovery needs.
func (t *Tree) WriteBack() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.rootLocked()
	for k, c := range t.nodes {
		if !c.changed {
			continue
		}
		c.n.encode(t.buf)
		_, err := t.st.WriteAt(t.buf, t.h.TreeNodePos(k.level, k.index))
		clear(t.buf)
		if err != nil {
			return fmt.Errorf("failed to write tree node %d at level %d: %w", k.index, k.level, err)
		}
		c.changed = false
		t.clean++
	}
	t.trim()
	return nil
}

// Changed is the number of nodes waiting for WriteBack.
func (t *Tree) Changed() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.nodes) - t.clean
}
