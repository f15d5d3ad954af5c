package engine

import (
	"bytes"
	"errors"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/psp"
)

// Freshness (FORMAT.md §7, §8): what an attacker with the image file and older copies of it can
// do, against a version-2 image with the integrity tree. Every case reads as an I/O error (or a
// refused attach), never zeros or old data; each is counted.

// freshImage is a file image with sectors 0..15 written (pattern 1), flushed, then sectors 0..3
// rewritten (pattern 2) and the disk detached: copies of the file after the first flush are
// "older authentic copies".
func freshImage(t *testing.T) (im *testImage, path string, older []byte) {
	t.Helper()
	const ss = 4096
	im = newTestImage(t, 1<<20, ss, 0)
	st, path := fileStore(t, im)
	e := New(Options{Shards: 2, StripeSectors: 64, Logger: quietLog})
	d := im.attach(t, e, 1, st)
	must(t, d.WriteAt(ctx, bytes.Repeat([]byte{1}, 16*ss), 0, false))
	must(t, d.Flush(ctx))
	must(t, d.checkpoint()) // everything in place, as an operator's copy would find it
	older, err := os.ReadFile(path)
	must(t, err)
	must(t, d.WriteAt(ctx, bytes.Repeat([]byte{2}, 4*ss), 0, false))
	must(t, e.Close())
	return im, path, older
}

// patch copies bytes [off, off+n) of src into the file at path (src nil: zeros).
func patch(t *testing.T, path string, src []byte, off, n int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	must(t, err)
	defer f.Close()
	b := make([]byte, n)
	if src != nil {
		copy(b, src[off:off+n])
	}
	_, err = f.WriteAt(b, off)
	must(t, err)
}

// wantUnreadable attaches the image and checks that every sector of page 0 (0..63) fails
// with ErrIntegrity, is counted, and returns none of its data.
func wantUnreadable(t *testing.T, im *testImage, path string) {
	t.Helper()
	e := New(Options{Shards: 2, StripeSectors: 64, Logger: quietLog})
	defer e.Close()
	d := im.attach(t, e, 1, reopen(t, path))
	before := e.Stats.AuthFailures.Load()
	for lba := int64(0); lba < 16; lba++ {
		got := bytes.Repeat([]byte{0x99}, 4096)
		err := d.ReadAt(ctx, got, lba*4096)
		if !errors.Is(err, ErrIntegrity) {
			t.Fatalf("sector %d: %v, want ErrIntegrity", lba, err)
		}
		if !bytes.Equal(got, make([]byte, 4096)) && !bytes.Equal(got, bytes.Repeat([]byte{0x99}, 4096)) {
			t.Fatalf("sector %d: the failed read returned data", lba)
		}
	}
	if e.Stats.AuthFailures.Load() == before {
		t.Fatal("no authentication failure counted")
	}
}

func TestZeroedEntryIsDetected(t *testing.T) {
	im, path, _ := freshImage(t)
	patch(t, path, nil, im.h.EntryPos(7), format.MetaEntrySize) // a written sector "never written"
	wantUnreadable(t, im, path)
}

func TestPunchedMetadataPageIsDetected(t *testing.T) {
	im, path, _ := freshImage(t)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	must(t, err)
	must(t, punchFile(f, im.h.EntryPos(0), 4096))
	f.Close()
	wantUnreadable(t, im, path)
}

func TestOlderSectorAndEntryIsDetected(t *testing.T) {
	im, path, older := freshImage(t)
	// sector 2 and its entry as they were after the first flush: each authentic, together stale
	patch(t, path, older, im.h.DataPos(2), 4096)
	patch(t, path, older, im.h.EntryPos(2), format.MetaEntrySize)
	wantUnreadable(t, im, path)
}

func TestOlderMetadataPageIsDetected(t *testing.T) {
	im, path, older := freshImage(t)
	patch(t, path, older, im.h.EntryPos(0), 4096)
	patch(t, path, older, im.h.DataPos(0), 4*4096) // with the data it authenticates
	wantUnreadable(t, im, path)
}

func TestChangedTreeNodeIsDetected(t *testing.T) {
	im, path, _ := freshImage(t)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	must(t, err)
	b := make([]byte, 1)
	f.ReadAt(b, im.h.TreeNodePos(1, 0)+5) // leaf digest of page 0
	f.WriteAt([]byte{b[0] ^ 1}, im.h.TreeNodePos(1, 0)+5)
	f.Close()
	wantUnreadable(t, im, path)
}

// TestOlderImageIsRefused: the whole file replaced by a copy taken before the last flush.
func TestOlderImageIsRefused(t *testing.T) {
	im, path, older := freshImage(t)
	must(t, os.WriteFile(path, older, 0o600))
	e := New(Options{Shards: 2, StripeSectors: 64, Logger: quietLog})
	defer e.Close()
	must(t, e.LoadKey(1, im.Binding()))
	_, err := e.Attach(1, reopen(t, path), false)
	if !errors.Is(err, psp.ErrRolledBack) || !strings.Contains(err.Error(), "image rolled back: counter 1, expected 2") {
		t.Fatalf("attach of an older copy: %v, want the rollback named with both counters", err)
	}
}

// TestRootSlots: swapped slots change nothing (a record does not depend on its slot); a zeroed
// current record falls back to the older one, which is refused once the PSP has counted past
// it; both zeroed is no committed state.
func TestRootSlots(t *testing.T) {
	t.Run("swapped", func(t *testing.T) {
		im, path, _ := freshImage(t)
		raw, err := os.ReadFile(path)
		must(t, err)
		s0, s1 := im.h.RootSlotPos(0), im.h.RootSlotPos(1)
		swapped := bytes.Clone(raw[s1 : s1+format.RootSlotSize])
		patch(t, path, raw, s0, format.RootSlotSize)
		copy(raw[s0:], swapped)
		patch(t, path, raw, s0, 2*format.RootSlotSize)
		e := New(Options{Shards: 2, StripeSectors: 64, Logger: quietLog})
		defer e.Close()
		d := im.attach(t, e, 1, reopen(t, path))
		got := make([]byte, 4096)
		must(t, d.ReadAt(ctx, got, 0))
		if got[0] != 2 {
			t.Fatal("swapped root records read other data")
		}
	})
	t.Run("current zeroed", func(t *testing.T) {
		// The detach's checkpoint left its new epoch's record current, the commit before it
		// (same counter, the same state) in the other slot: that one is used.
		im, path, _ := freshImage(t)
		patch(t, path, nil, im.h.RootSlotPos(currentSlot(t, im, path)), format.RootSlotSize)
		e := New(Options{Shards: 2, StripeSectors: 64, Logger: quietLog})
		defer e.Close()
		d := im.attach(t, e, 1, reopen(t, path))
		got := make([]byte, 4096)
		must(t, d.ReadAt(ctx, got, 0))
		if got[0] != 2 {
			t.Fatal("the older root record returned old data")
		}
	})
	t.Run("current zeroed after a flush", func(t *testing.T) {
		// A flush's record is the only one with its counter: without it, the other record is
		// behind the PSP and the attach is refused.
		im := newTestImage(t, 1<<20, 4096, 0)
		st, path := fileStore(t, im)
		e := New(Options{Shards: 2, StripeSectors: 64, Logger: quietLog})
		d := im.attach(t, e, 1, st)
		must(t, d.WriteAt(ctx, bytes.Repeat([]byte{3}, 4096), 0, false))
		must(t, d.Flush(ctx))
		abandon(e) // a crash: no detach, no checkpoint
		patch(t, path, nil, im.h.RootSlotPos(currentSlot(t, im, path)), format.RootSlotSize)
		e2 := New(Options{Shards: 2, StripeSectors: 64, Logger: quietLog})
		defer e2.Close()
		must(t, e2.LoadKey(1, im.Binding()))
		if _, err := e2.Attach(1, reopen(t, path), false); !errors.Is(err, psp.ErrRolledBack) {
			t.Fatalf("attach without the flush's record: %v, want a rollback", err)
		}
	})
	t.Run("both zeroed", func(t *testing.T) {
		im, path, _ := freshImage(t)
		patch(t, path, nil, im.h.RootSlotPos(0), 2*format.RootSlotSize)
		e := New(Options{Shards: 2, StripeSectors: 64, Logger: quietLog})
		defer e.Close()
		must(t, e.LoadKey(1, im.Binding()))
		if _, err := e.Attach(1, reopen(t, path), false); err == nil || !strings.Contains(err.Error(), "no committed state") {
			t.Fatalf("attach with no root record: %v", err)
		}
	})
}

func punchFile(f *os.File, off, n int64) error {
	return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

// currentSlot is the slot holding the image's current (highest seq) root record.
func currentSlot(t *testing.T, im *testImage, path string) int {
	t.Helper()
	raw, err := os.ReadFile(path)
	must(t, err)
	cur, best := -1, uint64(0)
	for i := range 2 {
		rec, _, _, err := format.ParseRootSlot(raw[im.h.RootSlotPos(i):][:format.RootSlotSize], im.h)
		if err == nil && (cur < 0 || rec.Seq > best) {
			cur, best = i, rec.Seq
		}
	}
	if cur < 0 {
		t.Fatal("no root record")
	}
	return cur
}

// TestRecoveryRefusesChangedTree: recovery rebuilds the tree over the pages the journal
// touches from the nodes on disk; a node changed beside them makes a root other than the
// committed one, and the attach is refused rather than trusting it.
func TestRecoveryRefusesChangedTree(t *testing.T) {
	im := newTestImage(t, 1<<20, 4096, 0)
	st, path := fileStore(t, im)
	e := New(Options{Shards: 2, StripeSectors: 64, Logger: quietLog})
	d := im.attach(t, e, 1, st)
	must(t, d.WriteAt(ctx, bytes.Repeat([]byte{4}, 128*4096), 0, false)) // pages 0 and 1
	must(t, d.Flush(ctx))
	must(t, d.checkpoint()) // the tree in place
	must(t, d.WriteAt(ctx, bytes.Repeat([]byte{5}, 4096), 0, false))
	must(t, d.Flush(ctx)) // page 0 journaled and committed, not in place
	abandon(e)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	must(t, err)
	b := make([]byte, 1)
	pos := im.h.TreeNodePos(1, 0) + 32 + 7 // page 1's leaf: beside the recomputed path
	f.ReadAt(b, pos)
	f.WriteAt([]byte{b[0] ^ 1}, pos)
	f.Close()
	e2 := New(Options{Shards: 2, StripeSectors: 64, Logger: quietLog})
	defer e2.Close()
	must(t, e2.LoadKey(1, im.Binding()))
	if _, err := e2.Attach(1, reopen(t, path), false); !errors.Is(err, ErrIntegrity) || !strings.Contains(err.Error(), "changed by more than a crash") {
		t.Fatalf("recovery over a changed tree node: %v", err)
	}
}
