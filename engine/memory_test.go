package engine

import (
	"math/rand"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
)

func rss(t *testing.T) int64 {
	runtime.GC()
	debug.FreeOSMemory()
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		t.Skip("no /proc/self/statm")
	}
	f := strings.Fields(string(b))
	pages, _ := strconv.ParseInt(f[1], 10, 64)
	return pages * int64(os.Getpagesize())
}

// TestMemoryBoundedOn100GiB writes 4 KiB at random across a 100 GiB sparse image: resident
// memory must stay within the cache size plus a fixed bound, however large the image
// (metadata is paged through a bounded cache, never loaded whole).
func TestMemoryBoundedOn100GiB(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector's shadow memory makes RSS meaningless; make test runs this without -race")
	}
	const size, cache = 100 << 30, 16 << 20
	im := newTestImage(t, size, 4096, 0)
	st, _ := fileStore(t, im)
	e := New(Options{Shards: 2, CacheBytes: cache, MetaPages: 256})
	defer e.Close()
	d := im.attach(t, e, 1, st)
	before := rss(t)
	r := rand.New(rand.NewSource(1))
	buf := make([]byte, 4096)
	writes := 15000
	if testing.Short() {
		writes = 5000
	}
	var peak int64
	for i := 0; i < writes; i++ {
		r.Read(buf[:16])
		must(t, d.WriteAt(ctx, buf, r.Int63n(size/4096)*4096, false))
		if i%5000 == 4999 {
			peak = max(peak, rss(t))
		}
	}
	must(t, d.Flush(ctx))
	peak = max(peak, rss(t))
	growth := peak - before
	t.Logf("100 GiB image, %d random 4 KiB writes (%d MiB), cache %d MiB: RSS %d MiB before, peak %d MiB, growth %d MiB",
		writes, writes*4096>>20, cache>>20, before>>20, peak>>20, growth>>20)
	if bound := int64(cache + 48<<20); growth > bound {
		t.Fatalf("resident memory grew %d MiB, above cache + 48 MiB = %d MiB", growth>>20, bound>>20)
	}
}
