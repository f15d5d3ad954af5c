package tree

import (
	"math/rand"
	"slices"
	"strings"
	"testing"

	"github.com/sealdisk/sealdisk/store/storetest"
)

// The builder's root and written nodes are the tree's: a Tree opened on the region it wrote
// verifies every leaf, and its root is the naive one.
func TestBuilderMatchesTree(t *testing.T) {
	for _, sectors := range []uint64{1, 64, 64 * 128, 64*128 + 1, 64 * 128 * 130} {
		h := header(sectors)
		st := storetest.NewMem(int64(h.TreeOffset + h.TreeSize))
		r := rand.New(rand.NewSource(int64(sectors)))
		leaves := map[uint64]Digest{}
		for range 300 {
			p := uint64(r.Int63n(int64(h.Pages())))
			leaves[p] = LeafDigest(h.UUID, p, page(r))
		}
		b := NewBuilder(h, st)
		pages := slices.Sorted(func(yield func(uint64) bool) {
			for p := range leaves {
				if !yield(p) {
					return
				}
			}
		})
		for _, p := range pages {
			if err := b.Add(p, leaves[p]); err != nil {
				t.Fatal(err)
			}
		}
		root, err := b.Root()
		if err != nil {
			t.Fatal(err)
		}
		if want := naive(h, leaves); root != want {
			t.Fatalf("%d sectors: builder root %x, naive %x", sectors, root, want)
		}
		fresh := New(h, st, root, 8)
		for p, d := range leaves {
			if err := fresh.Verify(p, d); err != nil {
				t.Fatalf("%d sectors, page %d: %v", sectors, p, err)
			}
		}
		if root, _ := NewBuilder(h, nil).Root(); root != (Digest{}) {
			t.Fatalf("empty build: root %x, want zero", root)
		}
	}
}

func TestBuilderRefusesDisorder(t *testing.T) {
	h := header(64 * 300)
	b := NewBuilder(h, nil)
	if err := b.Add(5, Digest{1}); err != nil {
		t.Fatal(err)
	}
	if err := b.Add(5, Digest{2}); err == nil || !strings.Contains(err.Error(), "page 5 added after page 5") {
		t.Fatalf("repeated page: %v", err)
	}
	if err := b.Add(h.Pages(), Digest{2}); err == nil || !strings.Contains(err.Error(), "beyond") {
		t.Fatalf("page past the end: %v", err)
	}
}
