package store

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/internal/pagecachetest"
)

// TestReadAheadBringsItsRangeIntoMemory: ReadAhead reads its range into the page cache in the
// background, mapped (MADV_WILLNEED) or not (POSIX_FADV_WILLNEED), and nothing beyond it. Needs
// a file system with a page cache of its own (tmpfs pages are the file: nothing to drop).
func TestReadAheadBringsItsRangeIntoMemory(t *testing.T) {
	for _, mapped := range []bool{true, false} {
		dir := pagecachetest.DiskDir(t)
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
		if in := resident(t, path, 0, 4<<20); in != 0 {
			t.Fatalf("mapped %v: %d pages cached after DropCache", mapped, in)
		}
		s.ReadAhead(1<<20, 1<<20)
		want := (1 << 20) / os.Getpagesize()
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
			in := resident(t, path, 1<<20, 1<<20)
			if in == want {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("mapped %v: %d of the %d pages read ahead are cached 5 s later", mapped, in, want)
			}
		}
		if in := resident(t, path, 3<<20, 1<<20); in != 0 {
			t.Fatalf("mapped %v: %d pages outside the range read ahead were read too", mapped, in)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// resident counts the pages of path's [off, off+n) in the page cache.
func resident(t *testing.T, path string, off, n int64) int {
	t.Helper()
	in, _ := pagecachetest.Resident(t, path, off, n)
	return in
}
