package engine

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"testing"

	"github.com/sealdisk/sealdisk/format"
)

// TestTamperEvidence modifies one sector's bytes on disk in every way an attacker with the
// image file can — data, nonce counter, salt, tag, reserved bytes, moving sectors, splicing a
// sector from another image under the same key — and checks that reading it is an
// ErrIntegrity, never plaintext, and is counted. A changed data sector fails alone; a changed
// entry fails its whole metadata page, which no longer matches the integrity tree (all 16
// written sectors here share page 0).
func TestTamperEvidence(t *testing.T) {
	const ss = 4096
	pattern := func(lba int) []byte { return bytes.Repeat([]byte{byte(lba + 1)}, ss) }
	// setup returns a fresh image with sectors 0..15 written (each its own byte) and flushed
	setup := func(t *testing.T) (*testImage, string) {
		im := newTestImage(t, 1<<20, ss, 0)
		st, path := fileStore(t, im)
		e := New(Options{Shards: 2, StripeSectors: 64})
		d := im.attach(t, e, 1, st)
		for lba := 0; lba < 16; lba++ {
			must(t, d.WriteAt(ctx, pattern(lba), int64(lba)*ss, false))
		}
		must(t, e.Close())
		return im, path
	}
	flip := func(path string, off int64) func(t *testing.T) {
		return func(t *testing.T) {
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			must(t, err)
			defer f.Close()
			b := make([]byte, 1)
			f.ReadAt(b, off)
			b[0] ^= 0x10
			f.WriteAt(b, off)
		}
	}
	copyBytes := func(path string, from, to, n int64) {
		f, _ := os.OpenFile(path, os.O_RDWR, 0)
		defer f.Close()
		b := make([]byte, n)
		f.ReadAt(b, from)
		f.WriteAt(b, to)
	}
	const victim = 5
	page0 := make([]int, 16)
	for i := range page0 {
		page0[i] = i
	}
	cases := []struct {
		name   string
		tamper func(t *testing.T, im *testImage, path string)
		bad    []int // sectors that must fail
	}{
		{"data byte", func(t *testing.T, im *testImage, p string) { flip(p, im.h.DataPos(victim)+100)(t) }, []int{victim}},
		{"last data byte", func(t *testing.T, im *testImage, p string) { flip(p, im.h.DataPos(victim)+ss-1)(t) }, []int{victim}},
		{"salt", func(t *testing.T, im *testImage, p string) { flip(p, im.h.EntryPos(victim)+3)(t) }, page0},
		{"nonce counter", func(t *testing.T, im *testImage, p string) { flip(p, im.h.EntryPos(victim)+23)(t) }, page0},
		{"tag", func(t *testing.T, im *testImage, p string) { flip(p, im.h.EntryPos(victim)+30)(t) }, page0},
		{"reserved", func(t *testing.T, im *testImage, p string) { flip(p, im.h.EntryPos(victim)+60)(t) }, page0},
		{"sector moved with its entry", func(t *testing.T, im *testImage, p string) {
			copyBytes(p, im.h.DataPos(2), im.h.DataPos(victim), ss)
			copyBytes(p, im.h.EntryPos(2), im.h.EntryPos(victim), format.MetaEntrySize)
		}, page0},
		{"two sectors swapped", func(t *testing.T, im *testImage, p string) {
			f, _ := os.OpenFile(p, os.O_RDWR, 0)
			defer f.Close()
			swap := func(a, b int64, n int) {
				x, y := make([]byte, n), make([]byte, n)
				f.ReadAt(x, a)
				f.ReadAt(y, b)
				f.WriteAt(y, a)
				f.WriteAt(x, b)
			}
			swap(im.h.DataPos(victim), im.h.DataPos(victim+1), ss)
			swap(im.h.EntryPos(victim), im.h.EntryPos(victim+1), format.MetaEntrySize)
		}, page0},
		{"data only moved", func(t *testing.T, im *testImage, p string) {
			copyBytes(p, im.h.DataPos(9), im.h.DataPos(victim), ss)
		}, []int{victim}},
		{"entry only moved", func(t *testing.T, im *testImage, p string) {
			copyBytes(p, im.h.EntryPos(9), im.h.EntryPos(victim), format.MetaEntrySize)
		}, page0},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			im, path := setup(t)
			c.tamper(t, im, path)
			// Every other case with placed runs on: the repairing write of a whole page then
			// tries writeDirect first, which must leave a page that fails to the cache's path.
			e := New(Options{Shards: 2, StripeSectors: 64, PlacedBytes: int64(i%2) * 16 * ss})
			defer e.Close()
			d := im.attach(t, e, 1, reopen(t, path))
			checkTampered(t, e, d, c.bad, pattern)
		})
	}

	// A sector spliced in from another image that shares the key (and so the salt's session
	// key would be the same): the AAD's image UUID refuses it.
	t.Run("sector from another image under the same key", func(t *testing.T) {
		im, path := setup(t)
		other := newTestImage(t, 1<<20, ss, 0)
		other.key = im.key
		ost, opath := fileStore(t, other)
		e := New(Options{Shards: 2, StripeSectors: 64})
		d := other.attach(t, e, 2, ost)
		must(t, d.WriteAt(ctx, bytes.Repeat([]byte{0xee}, ss), victim*ss, false))
		must(t, e.Close())
		src, _ := os.ReadFile(opath)
		f, _ := os.OpenFile(path, os.O_RDWR, 0)
		f.WriteAt(src[other.h.DataPos(victim):other.h.DataPos(victim)+ss], im.h.DataPos(victim))
		f.WriteAt(src[other.h.EntryPos(victim):other.h.EntryPos(victim)+format.MetaEntrySize], im.h.EntryPos(victim))
		f.Close()
		e2 := New(Options{Shards: 2, StripeSectors: 64})
		defer e2.Close()
		d2 := im.attach(t, e2, 1, reopen(t, path))
		checkTampered(t, e2, d2, page0, pattern)
	})
}

// checkTampered: each bad sector fails with ErrIntegrity and yields no plaintext, alone and
// inside a larger read; every other sector reads its pattern; failures are counted.
func checkTampered(t *testing.T, e *Engine, d *Disk, bad []int, pattern func(int) []byte) {
	t.Helper()
	const ss = 4096
	isBad := map[int]bool{}
	for _, b := range bad {
		isBad[b] = true
	}
	before := e.Stats.AuthFailures.Load()
	for lba := 0; lba < 16; lba++ {
		got := bytes.Repeat([]byte{0x99}, ss)
		err := d.ReadAt(ctx, got, int64(lba)*ss)
		if isBad[lba] {
			if !errors.Is(err, ErrIntegrity) {
				t.Fatalf("sector %d: %v, want ErrIntegrity", lba, err)
			}
			for i := range got {
				if got[i] != 0x99 && got[i] != 0 {
					t.Fatalf("sector %d: the failed read returned bytes (%#x at %d)", lba, got[i], i)
				}
			}
			continue
		}
		if err != nil || !bytes.Equal(got, pattern(lba)) {
			t.Fatalf("untouched sector %d: %v", lba, err)
		}
	}
	// a read spanning a bad sector fails as a whole and returns none of the bad sector
	span := make([]byte, 16*ss)
	if err := d.ReadAt(ctx, span, 0); !errors.Is(err, ErrIntegrity) {
		t.Fatalf("read spanning a tampered sector: %v", err)
	}
	for _, b := range bad {
		if bytes.Equal(span[b*ss:(b+1)*ss], pattern(b)) && pattern(b)[0] != 0 {
			t.Fatalf("sector %d: plaintext returned from a tampered sector", b)
		}
	}
	// a sub-sector write cannot read-modify-write a bad sector either
	if err := d.WriteAt(ctx, []byte{1}, int64(bad[0])*ss+7, false); !errors.Is(err, ErrIntegrity) {
		t.Fatalf("RMW of a tampered sector: %v", err)
	}
	if n := e.Stats.AuthFailures.Load() - before; n < uint64(len(bad)) {
		t.Fatalf("%d authentication failures counted for %d bad sectors", n, len(bad))
	}
	// overwriting the whole metadata page's sectors (64) in one write repairs them: no entry
	// of the page that failed is read again
	page := make([]byte, 64*ss)
	for lba := 0; lba < 16; lba++ {
		copy(page[lba*ss:], pattern(lba))
	}
	must(t, d.WriteAt(ctx, page, 0, false))
	must(t, d.Flush(ctx))
	for lba := 0; lba < 16; lba++ {
		got := make([]byte, ss)
		if err := d.ReadAt(ctx, got, int64(lba)*ss); err != nil || !bytes.Equal(got, pattern(lba)) {
			t.Fatalf("sector %d after repair: %v", lba, fmt.Sprint(err))
		}
	}
}
