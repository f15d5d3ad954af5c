package tree

import (
	"errors"
	"math/rand"
	"testing"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/store/storetest"
)

var testUUID = [16]byte{0x5e, 0xa1, 0xd1, 0x5c, 6: 0x40, 8: 0x80, 15: 1}

// header is a version-2 header with the tree, for a disk of the given sectors.
func header(sectors uint64) *format.Header {
	h := &format.Header{Version: 2, UUID: testUUID, SectorSize: 4096, VirtualSize: sectors * 4096, Tree: true, MetaSize: 1 << 20}
	h.TreeSize = format.TreeRegionSize(h.Pages())
	h.TreeOffset = 8 << 20
	return h
}

// naive recomputes the root from all leaves, level by level, with no cache.
func naive(h *format.Header, leaves map[uint64]Digest) Digest {
	cur := map[uint64]Digest{}
	for p, d := range leaves {
		cur[p] = d
	}
	for level := 1; ; level++ {
		nodes := map[uint64]*Node{}
		for i, d := range cur {
			if nodes[i/format.TreeArity] == nil {
				nodes[i/format.TreeArity] = &Node{}
			}
			nodes[i/format.TreeArity][i%format.TreeArity] = d
		}
		next := map[uint64]Digest{}
		for i, n := range nodes {
			next[i] = NodeDigest(h.UUID, level, i, n)
		}
		if level == len(format.TreeLevels(h.Pages())) {
			return next[0]
		}
		cur = next
	}
}

func page(r *rand.Rand) []byte {
	b := make([]byte, format.MetaPageSize)
	r.Read(b[:64*(1+r.Intn(8))])
	return b
}

func TestTreeAgainstNaive(t *testing.T) {
	for _, sectors := range []uint64{1, 64, 64 * 128, 64*128 + 1, 64 * 128 * 130} {
		h := header(sectors)
		st := storetest.NewMem(int64(h.TreeOffset + h.TreeSize))
		r := rand.New(rand.NewSource(int64(sectors)))
		tr := New(h, st, Digest{}, 8) // a tiny cache: nodes are dropped and read back
		leaves := map[uint64]Digest{}
		for range 300 {
			p := uint64(r.Int63n(int64(h.Pages())))
			d := LeafDigest(h.UUID, p, page(r))
			if r.Intn(5) == 0 {
				d = Digest{} // trimmed
			}
			leaves[p] = d
			if err := tr.SetLeaf(p, d); err != nil {
				t.Fatal(err)
			}
			if r.Intn(10) == 0 {
				if got, want := tr.Root(), naive(h, leaves); got != want {
					t.Fatalf("%d sectors: root %x, naive %x", sectors, got, want)
				}
			}
			if r.Intn(20) == 0 {
				if err := tr.WriteBack(); err != nil {
					t.Fatal(err)
				}
			}
		}
		root := tr.Root()
		if root != naive(h, leaves) {
			t.Fatalf("%d sectors: final root differs from the naive one", sectors)
		}
		if err := tr.WriteBack(); err != nil {
			t.Fatal(err)
		}
		// A fresh tree over the written region verifies every leaf, and no other digest.
		fresh := New(h, st, root, 8)
		for p, d := range leaves {
			if err := fresh.Verify(p, d); err != nil {
				t.Fatalf("page %d: %v", p, err)
			}
			if d != (Digest{}) {
				if err := fresh.Verify(p, Digest{}); !errors.Is(err, ErrMismatch) {
					t.Fatalf("page %d verified as empty: %v", p, err)
				}
			}
		}
		// Recovery's view of the same region computes the same root.
		rec, err := Recovering(h, st, 8)
		if err != nil || rec.Root() != root {
			t.Fatalf("recovering tree: root %x, %v; want %x", rec.Root(), err, root)
		}
	}
}

func TestTreeDetectsChangedNodes(t *testing.T) {
	h := header(64 * 128 * 3)
	st := storetest.NewMem(int64(h.TreeOffset + h.TreeSize))
	tr := New(h, st, Digest{}, 64)
	r := rand.New(rand.NewSource(1))
	for p := uint64(0); p < h.Pages(); p += 7 {
		if err := tr.SetLeaf(p, LeafDigest(h.UUID, p, page(r))); err != nil {
			t.Fatal(err)
		}
	}
	if err := tr.WriteBack(); err != nil {
		t.Fatal(err)
	}
	root := tr.Root()
	for _, level := range []int{1, 2} {
		pos := h.TreeNodePos(level, 0)
		b := make([]byte, 1)
		st.ReadAt(b, pos+33)
		st.WriteAt([]byte{b[0] ^ 1}, pos+33)
		_, err := New(h, st, root, 64).Leaf(7)
		var me *MismatchError
		if !errors.As(err, &me) || me.Level != level {
			t.Fatalf("changed node at level %d: %v", level, err)
		}
		st.WriteAt(b, pos+33)
	}
	// a punched node reads as zeros: a mismatch, not an empty subtree
	st.Punch(h.TreeNodePos(1, 0), format.TreeNodeSize)
	if _, err := New(h, st, root, 64).Leaf(0); !errors.Is(err, ErrMismatch) {
		t.Fatalf("punched node: %v", err)
	}
}

func TestEmptyDigests(t *testing.T) {
	if LeafDigest(testUUID, 3, make([]byte, format.MetaPageSize)) != (Digest{}) || NodeDigest(testUUID, 1, 0, &Node{}) != (Digest{}) {
		t.Fatal("empty page or node does not have the zero digest")
	}
	b := make([]byte, format.MetaPageSize)
	b[100] = 1
	if LeafDigest(testUUID, 3, b) == LeafDigest(testUUID, 4, b) {
		t.Fatal("a leaf digest does not bind its page index")
	}
}
