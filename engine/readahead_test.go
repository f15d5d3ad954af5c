package engine

import (
	"slices"
	"sync"
	"testing"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/store"
	"github.com/sealdisk/sealdisk/store/storetest"
)

// readAheadStore records the store's read-ahead hints.
type readAheadStore struct {
	store.Store
	mu    sync.Mutex
	hints [][2]int64
}

func (s *readAheadStore) ReadAhead(off, n int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.hints = append(s.hints, [2]int64{off, n})
}

// TestMetadataPagesReadAhead: reading a metadata page from the image first hints to the store
// (store.File.ReadAhead) its aligned group of metaAhead pages, the last group cut at the disk's
// end, so that a disk whose image pages are not cached reads its pages one group per I/O, not
// one page per I/O on the shard.
func TestMetadataPagesReadAhead(t *testing.T) {
	const ss = 4096
	sectors := uint64(metaAhead*entriesPerPage*2 + 3*entriesPerPage + 5) // two whole groups, then 3 pages and a bit
	im := newTestImage(t, sectors*ss, ss, 1<<20)
	mem := storetest.NewMem(0)
	im.create(t, mem)
	st := &readAheadStore{Store: mem}
	e := New(Options{Shards: 1, Logger: quietLog})
	defer e.Close()
	d := im.attach(t, e, 1, st)
	got := make([]byte, ss)
	for _, c := range []struct {
		lba   uint64
		first uint64 // the group's first page
	}{
		{lba: 17 * entriesPerPage, first: metaAhead},
		{lba: sectors - 1, first: 2 * metaAhead},
	} {
		st.mu.Lock()
		st.hints = nil
		st.mu.Unlock()
		must(t, d.ReadAt(ctx, got, int64(c.lba)*ss))
		lo := c.first * entriesPerPage
		hi := min(lo+metaAhead*entriesPerPage, sectors)
		want := [2]int64{d.h.EntryPos(lo), int64(hi-lo) * format.MetaEntrySize}
		st.mu.Lock()
		hints := st.hints
		st.mu.Unlock()
		if !slices.Contains(hints, want) {
			t.Fatalf("reading sector %d hinted %v; want [offset, bytes] %v among them", c.lba, hints, want)
		}
	}
	must(t, d.Close())
}
