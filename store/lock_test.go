package store_test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sealdisk/sealdisk/store"
)

// lockHelperEnv makes the test binary a helper process (TestMain): it locks the file named in
// the variable ("rw:PATH" or "ro:PATH"), says "locked" or the error on stdout, and holds the
// lock until its stdin closes.
const lockHelperEnv = "SEALDISK_STORE_LOCK_HELPER"

func TestMain(m *testing.M) {
	if spec := os.Getenv(lockHelperEnv); spec != "" {
		mode, path, _ := strings.Cut(spec, ":")
		f, err := store.OpenLocked(path, mode == "ro")
		if err != nil {
			fmt.Println(err)
			if errors.Is(err, store.ErrLocked) {
				os.Exit(3)
			}
			os.Exit(1)
		}
		fmt.Println("locked")
		io.Copy(io.Discard, os.Stdin)
		f.Close()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// helper is another process holding (or trying to take) a lock.
type helper struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	line  string // its first line: "locked" or the error
}

func startHelper(t *testing.T, mode, path string) *helper {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), lockHelperEnv+"="+mode+":"+path)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h := &helper{cmd: cmd, stdin: stdin}
	t.Cleanup(func() { h.stop() })
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("lock helper said nothing: %v", err)
	}
	h.line = strings.TrimSpace(line)
	return h
}

// stop closes the helper's stdin (it releases its lock and exits) and returns its exit code.
func (h *helper) stop() int {
	h.stdin.Close()
	h.cmd.Wait()
	return h.cmd.ProcessState.ExitCode()
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
		h := startHelper(t, mode, p)
		if code := h.stop(); code != 3 || !strings.Contains(h.line, store.ErrLocked.Error()) || !strings.Contains(h.line, "read-write") {
			t.Fatalf("%s lock in another process while this one writes: exit %d, %q", mode, code, h.line)
		}
	}
	w.Close()

	// Another process writes: this one is refused until it exits.
	h := startHelper(t, "rw", p)
	if h.line != "locked" {
		t.Fatalf("helper: %q", h.line)
	}
	refused(t, p, false, "read-write")
	refused(t, p, true, "read-write")
	if code := h.stop(); code != 0 {
		t.Fatalf("helper exited %d", code)
	}
	mustLock(t, p, false).Close()

	// Readers share across processes; a writer is refused beside them.
	h = startHelper(t, "ro", p)
	if h.line != "locked" {
		t.Fatalf("helper: %q", h.line)
	}
	r := mustLock(t, p, true)
	refused(t, p, false, "read-only")
	h.stop()
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
