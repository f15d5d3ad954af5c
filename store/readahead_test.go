package store

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestReadAheadBringsItsRangeIntoMemory: ReadAhead reads its range into the page cache in the
// background, mapped (MADV_WILLNEED) or not (POSIX_FADV_WILLNEED), and nothing beyond it. Needs
// a file system with a page cache of its own (tmpfs pages are the file: nothing to drop).
func TestReadAheadBringsItsRangeIntoMemory(t *testing.T) {
	for _, mapped := range []bool{true, false} {
		dir := diskDir(t)
		path := filepath.Join(dir, "img")
		if err := os.WriteFile(path, bytes.Repeat([]byte{0x5a}, 4<<20), 0o600); err != nil {
			t.Fatal(err)
		}
		s, err := OpenFile(path, false)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Sync(); err != nil {
			t.Fatal(err)
		}
		if err := s.SetMapped(mapped); err != nil {
			t.Fatal(err)
		}
		if err := s.DropCache(); err != nil {
			t.Fatal(err)
		}
		if in := residentIn(t, path, 0, 4<<20); in != 0 {
			t.Fatalf("mapped %v: %d pages cached after DropCache", mapped, in)
		}
		s.ReadAhead(1<<20, 1<<20)
		want := (1 << 20) / os.Getpagesize()
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
			in := residentIn(t, path, 1<<20, 1<<20)
			if in == want {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("mapped %v: %d of the %d pages read ahead are cached 5 s later", mapped, in, want)
			}
		}
		if in := residentIn(t, path, 3<<20, 1<<20); in != 0 {
			t.Fatalf("mapped %v: %d pages outside the range read ahead were read too", mapped, in)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// diskDir is a directory on a file system with a page cache: the test's own, or one under
// /var/tmp when that is tmpfs.
func diskDir(t *testing.T) string {
	dir := t.TempDir()
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		t.Fatal(err)
	}
	if fs.Type != unix.TMPFS_MAGIC {
		return dir
	}
	d, err := os.MkdirTemp("/var/tmp", "sealdisk-readahead-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// residentIn counts the pages of path's [off, off+n) in the page cache (mincore over a
// mapping of its own).
func residentIn(t *testing.T, path string, off, n int) int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := unix.Mmap(int(f.Fd()), int64(off), n, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, (n+os.Getpagesize()-1)/os.Getpagesize())
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(n), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		t.Fatal(errno)
	}
	in := 0
	for _, v := range vec {
		in += int(v & 1)
	}
	return in
}
