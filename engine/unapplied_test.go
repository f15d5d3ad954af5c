package engine

import (
	"bytes"
	"context"
	"testing"

	"github.com/sealdisk/sealdisk/store/storetest"
)

// TestEvictedBeforeApplied: a sector whose line is evicted while its journal append waits
// for a commit reads its latest data from the append in memory (the data region is stale),
// both whole (read) and through a read-modify-write (load); a zeroing after that forgets the
// append, so the sector reads zeros, not the append's older data.
func TestEvictedBeforeApplied(t *testing.T) {
	const ss = 4096
	im := newTestImage(t, 8<<20, ss, 0)
	st := storetest.NewCrash()
	im.create(t, st)
	// One shard, 1024 lines: an eviction writes back ~33 lines, well under the 256 sectors of
	// appends that force a commit, so the evicted sectors stay unapplied.
	e := New(Options{Shards: 1, CacheBytes: 1024 * ss, DirtyBytes: 1024 * ss})
	defer e.Close()
	d := im.attach(t, e, 1, st)
	ctx := context.Background()
	a := bytes.Repeat([]byte{0x11}, ss)
	must(t, d.WriteAt(ctx, a, 0, false))
	for i := int64(1); i <= 1100; i++ {
		must(t, d.WriteAt(ctx, bytes.Repeat([]byte{byte(i)}, ss), i*ss, false))
	}
	p := d.parts[0]
	if p.cached(0) != nil {
		t.Fatal("sector 0 is still cached: the test did not evict it")
	}
	if _, ok := p.slots.ref(0); !ok {
		t.Fatal("sector 0's append was applied already: the test does not cover an unapplied one")
	}
	got := make([]byte, ss)
	must(t, d.ReadAt(ctx, got, 0))
	if !bytes.Equal(got, a) {
		t.Fatalf("evicted unapplied sector read %x…, want 11…", got[:4])
	}
	// A partial write: read-modify-write from the append.
	must(t, d.WriteAt(ctx, bytes.Repeat([]byte{0x22}, 512), 0, false))
	want := bytes.Clone(a)
	copy(want, bytes.Repeat([]byte{0x22}, 512))
	must(t, d.ReadAt(ctx, got, 0))
	if !bytes.Equal(got, want) {
		t.Fatalf("read-modify-write of an unapplied sector read %x…%x, want 22…11", got[:4], got[600:604])
	}
	must(t, d.Trim(ctx, 0, ss, false))
	must(t, d.ReadAt(ctx, got, 0))
	if !bytes.Equal(got, make([]byte, ss)) {
		t.Fatalf("a trimmed sector read %x…, want zeros (an older append showed through)", got[:4])
	}
	must(t, d.Close())
}

// TestDirtyBound: past Options.DirtyBytes the cache writes its dirty lines back while the
// guest goes on, so a flush has at most that much to seal.
func TestDirtyBound(t *testing.T) {
	const ss = 4096
	im := newTestImage(t, 8<<20, ss, 0)
	st := storetest.NewCrash()
	im.create(t, st)
	e := New(Options{Shards: 1, CacheBytes: 256 * ss, DirtyBytes: 32 * ss})
	defer e.Close()
	d := im.attach(t, e, 1, st)
	for i := int64(0); i < 100; i++ {
		must(t, d.WriteAt(ctx, bytes.Repeat([]byte{byte(i)}, ss), i*ss, false))
	}
	if n := len(d.parts[0].dirtyLines); n > 32 {
		t.Fatalf("%d dirty lines after 100 writes, bound 32", n)
	}
	if got := d.parts[0].cached(0); got == nil {
		t.Fatal("written-back lines should stay cached (clean)")
	}
	must(t, d.Close())
}
