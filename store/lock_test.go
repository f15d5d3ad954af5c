package store_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sealdisk/sealdisk/store"
	"github.com/sealdisk/sealdisk/store/storetest"
)

func TestMain(m *testing.M) {
	storetest.LockProcessMain()
	os.Exit(m.Run())
}

func newImageFile(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "vm.img")
	f, err := store.CreateFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return p
}

func mustLock(t *testing.T, path string, readOnly bool) *store.File {
	t.Helper()
	f, err := store.OpenLocked(path, readOnly)
	if err != nil {
		t.Fatalf("lock %s (read-only %v): %v", path, readOnly, err)
	}
	return f
}

func refused(t *testing.T, path string, readOnly bool, holder string) {
	t.Helper()
	f, err := store.OpenLocked(path, readOnly)
	if err == nil {
		f.Close()
		t.Fatalf("lock %s (read-only %v) was granted while %s holds it", path, readOnly, holder)
	}
	if !errors.Is(err, store.ErrLocked) || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "holds it "+holder) {
		t.Fatalf("lock %s (read-only %v): %v; want ErrLocked naming the path and a %s holder", path, readOnly, err, holder)
	}
}

// One writer or many readers, in one process, by any path to the file; Close and Unlock
// release.
func TestLockOneWriterOrReaders(t *testing.T) {
	p := newImageFile(t)
	link := filepath.Join(t.TempDir(), "hard.img")
	if err := os.Link(p, link); err != nil {
		t.Fatal(err)
	}
	sym := filepath.Join(t.TempDir(), "sym.img")
	if err := os.Symlink(p, sym); err != nil {
		t.Fatal(err)
	}

	w := mustLock(t, p, false)
	for _, other := range []string{p, link, sym} {
		refused(t, other, false, "read-write")
		refused(t, other, true, "read-write")
	}
	id1, err := w.ID()
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}

	r1 := mustLock(t, link, true)
	r2 := mustLock(t, sym, true)
	if id2, _ := r2.ID(); id2 != id1 {
		t.Fatalf("one file, two IDs: %v, %v", id1, id2)
	}
	refused(t, p, false, "read-only")
	r1.Close()
	refused(t, p, false, "read-only") // r2 still reads
	if err := r2.Unlock(); err != nil {
		t.Fatal(err)
	}
	w = mustLock(t, p, false)
	w.Close()
	r2.Close()
}

// A mapped file's lock goes with Close too: a mapping left behind would keep the open file
// description, and its lock, alive.
func TestLockReleasedByCloseOfMappedFile(t *testing.T) {
	p := newImageFile(t)
	w := mustLock(t, p, false)
	if err := w.SetMapped(true); err != nil {
		t.Fatal(err)
	}
	if w.Mapped() == 0 {
		t.Fatal("not mapped")
	}
	w.Close()
	mustLock(t, p, false).Close()
}

// A lock bars other processes, both ways, and goes when its holder exits.
func TestLockAcrossProcesses(t *testing.T) {
	p := newImageFile(t)

	// This process writes: another process can neither write nor read.
	w := mustLock(t, p, false)
	for _, mode := range []string{"rw", "ro"} {
		h := storetest.StartLockProcess(t, mode == "ro", p)
		if code := h.Stop(); code != 3 || !strings.Contains(h.Line, store.ErrLocked.Error()) || !strings.Contains(h.Line, "read-write") {
			t.Fatalf("%s lock in another process while this one writes: exit %d, %q", mode, code, h.Line)
		}
	}
	w.Close()

	// Another process writes: this one is refused until it exits.
	h := storetest.StartLockProcess(t, false, p)
	if h.Line != "locked" {
		t.Fatalf("helper: %q", h.Line)
	}
	refused(t, p, false, "read-write")
	refused(t, p, true, "read-write")
	if code := h.Stop(); code != 0 {
		t.Fatalf("helper exited %d", code)
	}
	mustLock(t, p, false).Close()

	// Readers share across processes; a writer is refused beside them.
	h = storetest.StartLockProcess(t, true, p)
	if h.Line != "locked" {
		t.Fatalf("helper: %q", h.Line)
	}
	r := mustLock(t, p, true)
	refused(t, p, false, "read-only")
	h.Stop()
	r.Close()
}

// A read-only open cannot take the writer's lock: the kernel needs write access for it, and
// the error says what failed instead of claiming a holder.
func TestLockExclusiveNeedsWritableFile(t *testing.T) {
	p := newImageFile(t)
	f, err := store.OpenFile(p, true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	err = f.Lock(true)
	if err == nil || errors.Is(err, store.ErrLocked) || !strings.Contains(err.Error(), "failed to lock "+p) {
		t.Fatalf("exclusive lock of a read-only open: %v", err)
	}
}
