package engine

import (
	"math/rand"
	"testing"
)

// TestSlotsModel: slots against two plain maps (lines, unapplied appends) under random
// operations on four sectors of each of a few pages: every lookup, the line count and each page's mask agree,
// and a page with neither lines nor appends keeps no chunk.
func TestSlotsModel(t *testing.T) {
	r := rand.New(rand.NewSource(1))
	s := newSlots()
	lines := map[uint64]*line{}
	refs := map[uint64]unappliedRef{}
	ws := []*pendingWrite{{}, {}, {}}
	const pages = 5
	const sectors = pages * entriesPerPage
	for step := 0; step < 400000; step++ {
		// Four sectors of each page (its first, second, third and last), so that pages empty
		// often.
		lba := uint64(r.Intn(pages))*entriesPerPage + []uint64{0, 1, 2, entriesPerPage - 1}[r.Intn(4)]
		switch op := r.Intn(5); op {
		case 0:
			l := &line{lba: lba}
			s.setLine(l)
			lines[lba] = l
		case 1:
			s.dropLine(lba)
			delete(lines, lba)
		case 2:
			ref := unappliedRef{w: ws[r.Intn(len(ws))], i: r.Intn(3)}
			s.setRef(lba, ref)
			refs[lba] = ref
		case 3, 4:
			ref := unappliedRef{w: ws[r.Intn(len(ws))], i: r.Intn(3)}
			only := op == 3
			s.dropRef(lba, ref, only)
			if got, ok := refs[lba]; ok && (!only || got == ref) {
				delete(refs, lba)
			}
		}
		if r.Intn(8) > 0 {
			continue // checked every few steps, so that runs of operations meet no lookup between them
		}
		if s.lines != len(lines) {
			t.Fatalf("step %d: %d lines counted, want %d", step, s.lines, len(lines))
		}
		for k := uint64(0); k < sectors; k += uint64(1 + r.Intn(8)) {
			if s.line(k) != lines[k] {
				t.Fatalf("step %d: sector %d's line differs", step, k)
			}
			got, ok := s.ref(k)
			want, wok := refs[k]
			if ok != wok || got != want {
				t.Fatalf("step %d: sector %d's append %v %v, want %v %v", step, k, got, ok, want, wok)
			}
		}
		for idx := uint64(0); idx*entriesPerPage < sectors; idx++ {
			var want uint64
			for i := uint64(0); i < entriesPerPage; i++ {
				k := idx*entriesPerPage + i
				_, ref := refs[k]
				if lines[k] != nil || ref {
					want |= 1 << i
				}
			}
			if got := s.maskAt(idx); got != want {
				t.Fatalf("step %d: page %d's mask %#x, want %#x", step, idx, got, want)
			}
			if _, kept := s.chunks[idx]; kept != (want != 0) {
				t.Fatalf("step %d: page %d holds nothing but keeps its chunk (%v)", step, idx, kept)
			}
		}
	}
}
