package engine

import (
	"math/rand"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"

	"github.com/sealdisk/sealdisk/store/storetest"
)

// rss returns the process's resident anonymous memory (its heap, stacks and the engine's
// buffers) and its resident file and shared-memory pages (the mapped image: page cache).
func rss(t *testing.T) (anon, file int64) {
	runtime.GC()
	debug.FreeOSMemory()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skip("no /proc/self/status")
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) != 3 || f[2] != "kB" {
			continue
		}
		kb, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "RssAnon:":
			anon = kb << 10
		case "RssFile:", "RssShmem:":
			file += kb << 10
		}
	}
	return anon, file
}

// TestMemoryBoundedOn100GiB writes 4 KiB at random across a 100 GiB sparse image: resident
// memory must stay within the cache size plus a fixed bound, however large the image
// (metadata is paged through a bounded cache, never loaded whole). With the image mapped
// (the default) the image pages the engine touched are resident too, as page cache of the file
// (RssFile/RssShmem, shared and reclaimable): the bound is on anonymous memory. With NoMap
// (pread/pwrite) the bound holds for all of RSS.
func TestMemoryBoundedOn100GiB(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector's shadow memory makes RSS meaningless; make test runs this without -race")
	}
	for _, noMap := range []bool{false, true} {
		name := map[bool]string{false: "mapped", true: "pread"}[noMap]
		t.Run(name, func(t *testing.T) { memoryBounded(t, noMap) })
	}
}

func memoryBounded(t *testing.T, noMap bool) {
	const size, cache = 100 << 30, 16 << 20
	im := newTestImage(t, size, 4096, 0)
	st, _ := fileStore(t, im)
	e := New(Options{Shards: 2, CacheBytes: cache, MetaPages: 256, MaxChangedPages: 1024, NoMap: noMap})
	defer e.Close()
	d := im.attach(t, e, 1, st)
	if mapped := d.Mapped() > 0; mapped == noMap || d.Mapped() != st.Mapped() {
		t.Fatalf("NoMap %v but %d bytes mapped (store: %d)", noMap, d.Mapped(), st.Mapped())
	}
	anon0, file0 := rss(t)
	r := rand.New(rand.NewSource(1))
	buf := make([]byte, 4096)
	writes := 15000
	if testing.Short() {
		writes = 5000
	}
	var anonPeak, filePeak int64
	sample := func() {
		a, f := rss(t)
		anonPeak, filePeak = max(anonPeak, a), max(filePeak, f)
	}
	for i := 0; i < writes; i++ {
		r.Read(buf[:16])
		must(t, d.WriteAt(ctx, buf, r.Int63n(size/4096)*4096, false))
		if i%5000 == 4999 {
			sample()
		}
	}
	must(t, d.Flush(ctx))
	sample()
	growth := anonPeak - anon0
	if noMap {
		growth += filePeak - file0
	}
	t.Logf("100 GiB image, %d random 4 KiB writes (%d MiB), cache %d MiB: anonymous RSS %d MiB before, peak %d MiB; file/shmem RSS %d MiB before, peak %d MiB; counted growth %d MiB",
		writes, writes*4096>>20, cache>>20, anon0>>20, anonPeak>>20, file0>>20, filePeak>>20, growth>>20)
	if bound := int64(cache + 48<<20); growth > bound {
		t.Fatalf("resident memory grew %d MiB, above cache + 48 MiB = %d MiB", growth>>20, bound>>20)
	}
}

// TestDetachReleasesDisk attaches, writes and detaches a disk 100 times on one engine: nothing
// of a detached disk (parts, cache lines, metadata pages) may stay reachable, and no goroutine
// may stay behind, or a long-running service grows with every VM it has served.
func TestDetachReleasesDisk(t *testing.T) {
	im := newTestImage(t, 64<<20, 4096, 0)
	e := New(Options{Shards: 2, CacheBytes: 16 << 20})
	defer e.Close()
	buf := make([]byte, 1<<20)
	heap := func() uint64 {
		var ms runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	var heap0 uint64
	var g0 int
	for i := range 101 {
		st := storetest.NewMem(0)
		im.create(t, st)
		d := im.attach(t, e, 1, st)
		must(t, d.WriteAt(ctx, buf, int64(i%64)<<20, false)) // 1 MiB of dirty cache lines
		if err := e.ClearKey(1); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			heap0, g0 = heap(), runtime.NumGoroutine()
		}
	}
	heap1, g1 := heap(), runtime.NumGoroutine()
	t.Logf("heap after the first detach %d KiB, after the 101st %d KiB; goroutines %d, %d", heap0>>10, heap1>>10, g0, g1)
	if heap1 > heap0+16<<20 {
		t.Fatalf("heap grew by %d MiB over 100 attach/detach cycles: detached disks stay reachable", (heap1-heap0)>>20)
	}
	if g1 > g0 {
		t.Fatalf("%d goroutines after the first detach, %d after the 101st", g0, g1)
	}
}
