// Package conformance is the one block-device test suite: the same edge cases run against
// the plain in-memory device, the encrypted engine, and (through their clients) the NBD and
// FUSE frontends.
package conformance

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"testing"

	"github.com/sealdisk/sealdisk/engine"
)

// Size is the device size the suite asks for: several stripes of 256 sectors at 4 KiB, so
// requests cross shards.
const Size = 8 << 20

// New makes a fresh zero-filled device of Size bytes with the given block (sector) size.
type New func(t *testing.T) engine.BlockDevice

// Run runs every case against fresh devices from newDev. bs is the device's sector size.
func Run(t *testing.T, bs int64, newDev New) {
	ctx := context.Background()
	offsets := []int64{0, 1, bs - 1, bs, bs + 1, 3*bs + 17, 1<<20 - 1, 1 << 20, Size - bs, Size - bs - 1, Size - 1}
	lengths := []int64{1, bs - 1, bs, bs + 1, 2*bs - 1, 3 * bs, 1<<20 + 7, 2<<20 + bs}
	t.Run("zero-filled", func(t *testing.T) {
		d := newDev(t)
		if d.Size() != Size {
			t.Fatalf("size %d", d.Size())
		}
		b := make([]byte, 1<<20)
		if err := d.ReadAt(ctx, b, Size-1<<20); err != nil || !bytes.Equal(b, make([]byte, 1<<20)) {
			t.Fatalf("fresh device not zero: %v", err)
		}
	})
	t.Run("write-read edges", func(t *testing.T) {
		d := newDev(t)
		model := make([]byte, Size)
		r := rand.New(rand.NewSource(1))
		for _, off := range offsets {
			for _, n := range lengths {
				if off+n > Size {
					continue
				}
				buf := make([]byte, n)
				r.Read(buf)
				if err := d.WriteAt(ctx, buf, off, n%2 == 0); err != nil {
					t.Fatalf("write %d+%d: %v", off, n, err)
				}
				copy(model[off:], buf)
				// read a window around the write: neighbours must be untouched
				lo, hi := max(0, off-bs-3), min(Size, off+n+bs+3)
				got := make([]byte, hi-lo)
				if err := d.ReadAt(ctx, got, lo); err != nil {
					t.Fatalf("read %d+%d: %v", lo, hi-lo, err)
				}
				if !bytes.Equal(got, model[lo:hi]) {
					t.Fatalf("after write %d+%d: window [%d,%d) differs", off, n, lo, hi)
				}
			}
		}
		if err := d.Flush(ctx); err != nil {
			t.Fatal(err)
		}
		all := make([]byte, Size)
		for off := int64(0); off < Size; off += 4 << 20 {
			if err := d.ReadAt(ctx, all[off:off+4<<20], off); err != nil {
				t.Fatal(err)
			}
		}
		if !bytes.Equal(all, model) {
			t.Fatal("whole device differs from the model")
		}
	})
	t.Run("zero length", func(t *testing.T) {
		d := newDev(t)
		for _, off := range []int64{0, 5, Size} {
			if err := d.ReadAt(ctx, nil, off); err != nil {
				t.Fatalf("zero-length read at %d: %v", off, err)
			}
			if err := d.WriteAt(ctx, nil, off, false); err != nil {
				t.Fatalf("zero-length write at %d: %v", off, err)
			}
		}
	})
	t.Run("out of range", func(t *testing.T) {
		d := newDev(t)
		for _, c := range [][2]int64{{Size, 1}, {Size - 1, 2}, {-1, 1}, {Size + bs, bs}} {
			if err := d.ReadAt(ctx, make([]byte, c[1]), c[0]); !errors.Is(err, engine.ErrOutOfRange) {
				t.Errorf("read %v: %v", c, err)
			}
			if err := d.WriteAt(ctx, make([]byte, c[1]), c[0], false); !errors.Is(err, engine.ErrOutOfRange) {
				t.Errorf("write %v: %v", c, err)
			}
			if err := d.Trim(ctx, c[0], c[1], false); !errors.Is(err, engine.ErrOutOfRange) {
				t.Errorf("trim %v: %v", c, err)
			}
		}
		if _, err := d.BlockStatus(ctx, Size, 1); !errors.Is(err, engine.ErrOutOfRange) {
			t.Errorf("block status past the end: %v", err)
		}
		big := int64(d.Caps().MaxBlock) + 1
		if big < Size {
			if err := d.ReadAt(ctx, make([]byte, big), 0); !errors.Is(err, engine.ErrTooLarge) {
				t.Errorf("oversized read: %v", err)
			}
		}
	})
	t.Run("trim and write-zeroes", func(t *testing.T) {
		d := newDev(t)
		fill := bytes.Repeat([]byte{0xee}, 3<<20)
		if err := d.WriteAt(ctx, fill, 0, false); err != nil {
			t.Fatal(err)
		}
		model := make([]byte, Size)
		copy(model, fill)
		for _, c := range [][2]int64{{bs + 1, bs - 2}, {2 * bs, 5 * bs}, {1<<20 - 3, 1<<20 + 9}, {0, 1}} {
			if err := d.Trim(ctx, c[0], c[1], false); err != nil {
				t.Fatal(err)
			}
			clear(model[c[0] : c[0]+c[1]])
		}
		if err := d.WriteZeroes(ctx, 2<<20+5, bs*3, engine.ZeroFlags{}); err != nil {
			t.Fatal(err)
		}
		clear(model[2<<20+5 : 2<<20+5+bs*3])
		if err := d.WriteZeroes(ctx, 2<<20+bs*8, bs*2, engine.ZeroFlags{NoHole: true}); err != nil {
			t.Fatal(err)
		}
		clear(model[2<<20+bs*8 : 2<<20+bs*10])
		got := make([]byte, 3<<20)
		if err := d.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, model[:3<<20]) {
			t.Fatalf("after trim/zero: %v", err)
		}
	})
	t.Run("block status", func(t *testing.T) {
		d := newDev(t)
		if !d.Caps().BlockStatus {
			t.Skip("device has no block status")
		}
		ext, err := d.BlockStatus(ctx, 0, Size)
		if err != nil || len(ext) == 0 || !ext[0].Hole {
			t.Fatalf("fresh device should start with a hole: %v %v", ext, err)
		}
		if err := d.WriteAt(ctx, []byte{1}, 4<<20, false); err != nil {
			t.Fatal(err)
		}
		ext, err = d.BlockStatus(ctx, 4<<20, bs)
		if err != nil || len(ext) == 0 || ext[0].Hole {
			t.Fatalf("written block reported as a hole: %v %v", ext, err)
		}
		var total int64
		for _, e := range ext {
			total += e.Length
		}
		if total > bs {
			t.Fatalf("extents cover %d bytes, more than asked", total)
		}
	})
	t.Run("read-only", func(t *testing.T) {
		d := newDev(t)
		if d.Caps().ReadOnly {
			if err := d.WriteAt(ctx, []byte{1}, 0, false); !errors.Is(err, engine.ErrReadOnly) {
				t.Fatal(err)
			}
		}
	})
	_ = fmt.Sprint
	runMore(t, bs, newDev)
}
