package engine

import (
	"bytes"
	"testing"
)

// TestDetachZeroisesLineBuffers: detaching a disk (ClearKey) clears the plaintext in every
// cache line buffer its parts held, both the cached lines and the spare ones kept for reuse
// after eviction, not only the maps that point at them: a buffer referenced before the detach
// is all zeros after it.
func TestDetachZeroisesLineBuffers(t *testing.T) {
	im := newTestImage(t, 4<<20, 4096, 0)
	st, _ := fileStore(t, im)
	// a small cache, so writing 1 MiB evicts lines into the spare lists
	e := New(Options{Shards: 2, StripeSectors: 64, CacheBytes: 128 << 10})
	defer e.Close()
	d := im.attach(t, e, 5, st)
	marker := []byte("PLAINTEXT-IN-THE-CACHE ")
	data := bytes.Repeat(marker, (1<<20)/len(marker)+1)[:1<<20]
	must(t, d.WriteAt(ctx, data, 0, false))
	must(t, d.ReadAt(ctx, make([]byte, 256<<10), 512<<10))
	must(t, d.WriteAt(ctx, data[:64<<10], 2<<20, false)) // left dirty for Close to write back

	// Every line buffer the parts hold, taken under each shard (which owns its part).
	var bufs [][]byte
	cached, spare := 0, 0
	for i, s := range e.shards {
		s.own.Lock()
		p := d.parts[i]
		for l := p.lineLRU.head; l != nil; l = l.next {
			bufs = append(bufs, l.data[:cap(l.data)])
			cached++
		}
		for _, l := range p.spare {
			bufs = append(bufs, l.data[:cap(l.data)])
			spare++
		}
		s.own.Unlock()
	}
	if cached == 0 || spare == 0 {
		t.Fatalf("test setup: %d cached and %d spare lines; want both", cached, spare)
	}
	withMarker := 0
	for _, b := range bufs {
		if bytes.Contains(b, marker[:16]) {
			withMarker++
		}
	}
	if withMarker == 0 {
		t.Fatal("test setup: no line buffer holds the written plaintext")
	}

	must(t, e.ClearKey(5))
	left := 0
	for _, b := range bufs {
		if !bytes.Equal(b, make([]byte, len(b))) {
			left++
		}
	}
	if left != 0 {
		t.Fatalf("%d of %d line buffers (%d cached, %d spare; %d held plaintext) not zeroised after detach",
			left, len(bufs), cached, spare, withMarker)
	}
}
