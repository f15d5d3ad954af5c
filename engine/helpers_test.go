package engine

import (
	"math/rand"
	"path/filepath"
	"testing"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/internal/fixture"
	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/store"
	"github.com/sealdisk/sealdisk/store/storetest"
)

func TestMain(m *testing.M) { fixture.Main(m) }

// testImage is a fresh sealed image of the shared test world (internal/fixture), with the
// fields the engine's tests use.
type testImage struct {
	*fixture.Image
	h   *format.Header
	key []byte
	b   psp.Binding
}

// newTestImage is a version-2 image of size bytes; journal 0 is the default journal size.
func newTestImage(t testing.TB, size uint64, ss uint32, journal uint64) *testImage {
	return newTestImageLayout(t, size, ss, format.Layout{JournalSize: journal})
}

// newTestImageLayout is newTestImage in a given layout (format version, journal size, tree).
func newTestImageLayout(t testing.TB, size uint64, ss uint32, l format.Layout) *testImage {
	im := fixture.Shared(t).Image(t, fixture.Spec{Size: size, SectorSize: ss, Layout: l})
	return &testImage{Image: im, h: im.Header, key: im.Key, b: im.Binding()}
}

// create writes the image's headers and first root record into st and sizes it, as a new image.
func (im *testImage) create(t testing.TB, st store.Store) {
	im.Create(t, st)
	im.SetCounter(t, 0) // a new image: whatever the PSP recorded of this UUID before is gone
}

// attach loads the key into e at asid and attaches st.
func (im *testImage) attach(t testing.TB, e *Engine, asid psp.ASID, st store.Store) *Disk {
	t.Helper()
	if err := e.LoadKey(asid, im.Binding()); err != nil {
		t.Fatal(err)
	}
	d, err := e.Attach(asid, st, false)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func fileStore(t testing.TB, im *testImage) (*store.File, string) {
	p := filepath.Join(t.TempDir(), "vm.img")
	return fileStoreAt(t, im, p), p
}

// fileStoreAt creates the image as a new file at path.
func fileStoreAt(t testing.TB, im *testImage, path string) *store.File {
	f, err := store.CreateFile(path)
	if err != nil {
		t.Fatal(err)
	}
	im.create(t, f)
	return f
}

func reopen(t testing.TB, p string) *store.File {
	f, err := store.OpenFile(p, false)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// abandon stops e's shard workers without writing anything back, as a crash would: the
// engine is marked closed (Close becomes a no-op) and its submission rings are closed, so
// the workers, their idle timers and the disks and caches they reference go away instead
// of piling up across a test's iterations.
func abandon(e *Engine) {
	e.closed.Store(true)
	for _, s := range e.shards {
		s.sq.Close()
	}
}

// crashAndAttach crashes st keeping nothing unsynced, abandons e as the crash would, and
// attaches what survived to a fresh one-shard engine at asid (closed with the test).
func crashAndAttach(t testing.TB, im *testImage, e *Engine, st *storetest.Crash, asid psp.ASID) *Disk {
	t.Helper()
	crashed := st.Crash(rand.New(rand.NewSource(1)), 0)
	abandon(e)
	e2 := New(Options{Shards: 1, Logger: quietLog})
	t.Cleanup(func() { e2.Close() })
	return im.attach(t, e2, asid, crashed)
}
