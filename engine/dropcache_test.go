package engine

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/sealdisk/sealdisk/internal/pagecachetest"
)

// TestAttachDropsTheImagesCachedPages: a read-write attach drops the image's clean cached
// pages (store.File.DropCache), which a writer of the whole file leaves as large folios that
// make every one-sector write in place walk the folio; a read-only attach keeps them. Needs a
// file system with a page cache of its own (tmpfs pages are the file: nothing to drop).
func TestAttachDropsTheImagesCachedPages(t *testing.T) {
	dir := pagecachetest.DiskDir(t)
	im := newTestImage(t, 16<<20, 4096, 1<<20)
	path := filepath.Join(dir, "vm.img")
	st := fileStoreAt(t, im, path)
	e := New(Options{Shards: 2, CacheBytes: 1 << 20})
	d := im.attach(t, e, 1, st)
	buf := make([]byte, 16<<20)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	must(t, d.WriteAt(ctx, buf, 0, false))
	must(t, d.Flush(ctx))
	must(t, e.ClearKey(1)) // detach: checkpointed, in place, synced
	warm := func() {
		if _, err := os.ReadFile(path); err != nil { // as cp or seal leave it: cached, clean
			t.Fatal(err)
		}
	}
	warm()
	size := resident(t, path)
	if size.of < 16<<20/4096 || size.in < size.of*9/10 {
		t.Fatalf("image not cached before the attach: %d of %d pages", size.in, size.of)
	}

	d = im.attach(t, e, 1, reopen(t, path))
	after := resident(t, path)
	if after.in > after.of/10 {
		t.Fatalf("read-write attach kept %d of %d cached pages; want them dropped", after.in, after.of)
	}
	got := make([]byte, len(buf))
	must(t, d.ReadAt(ctx, got, 0))
	if string(got) != string(buf) {
		t.Fatal("image reads differently after its pages were dropped")
	}
	must(t, e.ClearKey(1))

	warm()
	if err := e.LoadKey(1, im.Binding()); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Attach(1, reopen(t, path), true); err != nil {
		t.Fatal(err)
	}
	if ro := resident(t, path); ro.in < ro.of*9/10 {
		t.Fatalf("read-only attach dropped cached pages: %d of %d left", ro.in, ro.of)
	}
	must(t, e.ClearKey(1))
	must(t, e.Close())
}

type pages struct{ in, of int }

// resident counts the file's pages in the page cache.
func resident(t *testing.T, path string) pages {
	t.Helper()
	in, of := pagecachetest.Resident(t, path, 0, 0)
	return pages{in: in, of: of}
}
