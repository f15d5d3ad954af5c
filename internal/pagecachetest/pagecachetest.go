// Package pagecachetest helps tests that look at a file's pages in the page cache: a
// directory on a file system that has one of its own, and which of a file's pages are in it.
package pagecachetest

import (
	"os"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// DiskDir is a directory on a file system with a page cache of its own: the test's temporary
// directory, or one under /var/tmp when that is tmpfs (whose pages are the file: nothing to
// drop or read ahead).
func DiskDir(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		t.Fatal(err)
	}
	if fs.Type != unix.TMPFS_MAGIC {
		return dir
	}
	d, err := os.MkdirTemp("/var/tmp", "sealdisk-pagecache-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// Resident counts the pages of path's [off, off+n) — to the file's end when n is 0 — that are
// in the page cache (mincore over a mapping of its own), and the pages of the range.
func Resident(t testing.TB, path string, off, n int64) (in, of int) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if n == 0 {
		fi, err := f.Stat()
		if err != nil {
			t.Fatal(err)
		}
		n = fi.Size() - off
	}
	m, err := unix.Mmap(int(f.Fd()), off, int(n), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, (len(m)+os.Getpagesize()-1)/os.Getpagesize())
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		t.Fatal(errno)
	}
	for _, v := range vec {
		in += int(v & 1)
	}
	return in, len(vec)
}
