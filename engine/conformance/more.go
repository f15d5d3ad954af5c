package conformance

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"sync"
	"testing"

	"github.com/sealdisk/sealdisk/engine"
	"github.com/sealdisk/sealdisk/internal/zeros"
)

// runMore adds the cases that check a device against a byte model under random and
// concurrent load, the buffer contract and the structural promises of BlockStatus. stripe is
// the engine's default stripe (256 sectors), so spans cross shards.
func runMore(t *testing.T, bs int64, newDev New) {
	cases := []struct {
		name string
		f    func(*testing.T, *fixture)
	}{
		{"spare capacity untouched", testSpareCapacity},
		{"unaligned overlap", testOverlap},
		{"spans across stripes", testSpans},
		{"last sector", testLast},
		{"out of range, every op", testOutOfRange},
		{"fast zero", testFastZero},
		{"block status promises", testBlockStatus},
		{"flush and fua", testFlush},
		{"concurrent shared sectors", testConcurrent},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := newDev(t)
			c.f(t, &fixture{t: t, d: d, m: make([]byte, d.Size()), bs: bs, stripe: 256 * bs,
				r: rand.New(rand.NewSource(int64(len(c.name))))})
		})
	}
}

// RunReadOnly checks a read-only device from newDev: reads work, every write-class request
// fails with ErrReadOnly and changes nothing, Flush succeeds.
func RunReadOnly(t *testing.T, bs int64, newDev New) {
	ctx := context.Background()
	d := newDev(t)
	if !d.Caps().ReadOnly {
		t.Fatal("device does not report itself read-only")
	}
	before := make([]byte, 3*bs)
	must(t, d.ReadAt(ctx, before, 0))
	for name, err := range map[string]error{
		"write":     d.WriteAt(ctx, []byte{1, 2, 3}, 1, false),
		"fua write": d.WriteAt(ctx, make([]byte, bs), bs, true),
		"trim":      d.Trim(ctx, 0, bs, false),
		"zeroes":    d.WriteZeroes(ctx, 0, 2*bs, engine.ZeroFlags{}),
	} {
		if !errors.Is(err, engine.ErrReadOnly) {
			t.Errorf("%s on a read-only device: %v, want ErrReadOnly", name, err)
		}
	}
	if err := d.Flush(ctx); err != nil {
		t.Errorf("flush on a read-only device: %v", err)
	}
	after := make([]byte, 3*bs)
	must(t, d.ReadAt(ctx, after, 0))
	if !bytes.Equal(before, after) {
		t.Error("a refused write changed the device")
	}
	if _, err := d.BlockStatus(ctx, 0, d.Size()); err != nil {
		t.Errorf("block status on a read-only device: %v", err)
	}
}

type fixture struct {
	t      *testing.T
	d      engine.BlockDevice
	m      []byte // the model: what the device must read as
	bs     int64
	stripe int64
	r      *rand.Rand
}

var bg = context.Background()

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func (f *fixture) size() int64 { return int64(len(f.m)) }

// write writes random bytes at [off, off+n) to the device and the model.
func (f *fixture) write(off, n int64, fua bool) {
	f.t.Helper()
	p := make([]byte, n)
	f.r.Read(p)
	if err := f.d.WriteAt(bg, p, off, fua); err != nil {
		f.t.Fatalf("write [%d,+%d): %v", off, n, err)
	}
	copy(f.m[off:], p)
}

// check compares [off, off+n) widened by a block on each side (clipped) with the model, so
// damage to neighbours shows too.
func (f *fixture) check(off, n int64) {
	f.t.Helper()
	f.compare(max(0, off-f.bs-1), min(f.size(), off+n+f.bs+1))
}

// compare reads [lo, hi) in pieces the device accepts and compares them with the model.
func (f *fixture) compare(lo, hi int64) {
	f.t.Helper()
	maxIO := int64(f.d.Caps().MaxBlock)
	for pos := lo; pos < hi; {
		n := min(hi-pos, maxIO)
		got := make([]byte, n)
		if err := f.d.ReadAt(bg, got, pos); err != nil {
			f.t.Fatalf("read [%d,+%d): %v", pos, n, err)
		}
		if want := f.m[pos : pos+n]; !bytes.Equal(got, want) {
			i := 0
			for got[i] == want[i] {
				i++
			}
			f.t.Fatalf("read [%d,+%d): byte %d is %#x, want %#x", pos, n, pos+int64(i), got[i], want[i])
		}
		pos += n
	}
}

func (f *fixture) compareAll() { f.t.Helper(); f.compare(0, f.size()) }

// testSpareCapacity: a read fills exactly len(p); the bytes between len and cap belong to the
// caller (a frontend's buffer pool) and must survive, whatever the alignment, also when the
// request is split across stripes that are served concurrently.
func testSpareCapacity(t *testing.T, f *fixture) {
	f.write(0, min(f.size(), 3*f.stripe), false)
	canary := bytes.Repeat([]byte{0xc5}, int(2*f.bs))
	for _, r := range [][2]int64{
		{0, f.bs}, {0, 1}, {f.bs - 1, 2}, {3, f.bs}, {f.bs, 4 * f.bs}, {5*f.bs + 7, 2*f.bs - 7},
		{f.stripe - f.bs, 2 * f.bs}, {f.stripe - 5, 3*f.bs + 10}, {0, 2 * f.stripe}, {f.stripe / 2, 2*f.stripe + f.bs},
		{f.size() - f.bs, f.bs},
	} {
		if r[0]+r[1] > f.size() {
			continue
		}
		buf := make([]byte, r[1]+int64(len(canary)))
		copy(buf[r[1]:], canary)
		must(t, f.d.ReadAt(bg, buf[:r[1]], r[0]))
		if !bytes.Equal(buf[:r[1]], f.m[r[0]:r[0]+r[1]]) {
			t.Fatalf("read [%d,+%d) differs", r[0], r[1])
		}
		if !bytes.Equal(buf[r[1]:], canary) {
			t.Fatalf("read [%d,+%d) wrote past len(p) into the caller's spare capacity", r[0], r[1])
		}
		// and a write must not modify its source buffer
		src := append([]byte(nil), buf[:r[1]]...)
		must(t, f.d.WriteAt(bg, buf[:r[1]], r[0], false))
		if !bytes.Equal(buf[:r[1]], src) || !bytes.Equal(buf[r[1]:], canary) {
			t.Fatalf("write [%d,+%d) modified the caller's buffer", r[0], r[1])
		}
	}
}

// testOverlap: random overlapping writes with unaligned heads and tails, many inside one
// block, each checked with its neighbourhood.
func testOverlap(t *testing.T, f *fixture) {
	area := min(f.size(), 16*f.bs)
	base := (f.size()/2 - area/2) / f.bs * f.bs
	for i := 0; i < 300; i++ {
		off := base + f.r.Int63n(area)
		n := min(1+f.r.Int63n(3*f.bs), base+area-off)
		f.write(off, n, false)
		f.check(off, n)
	}
	f.compare(base, base+area)
}

// testSpans: requests crossing stripe boundaries with unaligned ends, read back whole and in
// pieces cut differently.
func testSpans(t *testing.T, f *fixture) {
	st := f.stripe
	maxIO := int64(f.d.Caps().MaxBlock)
	for _, c := range [][2]int64{
		{st - 1, 2}, {st - f.bs, 2 * f.bs}, {st - f.bs/2 - 3, f.bs + 7}, {st - 1234, 2*st + 4321},
		{2*st + 5, 3*st - 11}, {f.size() - st - f.bs - 1, st + f.bs + 1},
	} {
		off, n := c[0], min(c[1], maxIO)
		if off < 0 || off+n > f.size() {
			continue
		}
		f.write(off, n, false)
		f.check(off, n)
		cut1, cut2 := off+n/3+1, off+2*n/3-1
		for _, piece := range [][2]int64{{off, cut1}, {cut1, cut2}, {cut2, off + n}} {
			if piece[1] > piece[0] {
				f.compare(piece[0], piece[1])
			}
		}
	}
	f.compareAll()
}

func testLast(t *testing.T, f *fixture) {
	s := f.size()
	f.write(s-f.bs, f.bs, false)
	f.check(s-f.bs, f.bs)
	f.write(s-1, 1, false)
	f.check(s-1, 1)
	f.write(s-f.bs-3, 5, true)
	must(t, f.d.Flush(bg))
	f.compare(s-3*f.bs, s)
	if f.d.Caps().Trim {
		must(t, f.d.Trim(bg, s-f.bs+1, f.bs-1, false))
		clear(f.m[s-f.bs+1:])
		f.compare(s-3*f.bs, s)
	}
}

func testOutOfRange(t *testing.T, f *fixture) {
	s, bs := f.size(), f.bs
	f.write(s-bs, bs, false)
	wantRange := func(what string, off, n int64, err error) {
		if !errors.Is(err, engine.ErrOutOfRange) {
			t.Errorf("%s [%d,+%d) on a %d-byte device: %v, want ErrOutOfRange", what, off, n, s, err)
		}
	}
	for _, r := range [][2]int64{{s, 1}, {s - 1, 2}, {s - bs, bs + 1}, {s + bs, bs}, {-1, 1}, {-bs, bs}, {0, s + 1}, {1, -1}} {
		off, n := r[0], r[1]
		if n >= 0 && n <= int64(f.d.Caps().MaxBlock) {
			wantRange("read", off, n, f.d.ReadAt(bg, make([]byte, n), off))
			wantRange("write", off, n, f.d.WriteAt(bg, make([]byte, n), off, false))
		}
		wantRange("trim", off, n, f.d.Trim(bg, off, n, false))
		wantRange("write-zeroes", off, n, f.d.WriteZeroes(bg, off, n, engine.ZeroFlags{}))
		if off >= s || off < 0 || n <= 0 {
			_, err := f.d.BlockStatus(bg, off, n)
			wantRange("block status", off, n, err)
		}
	}
	f.compare(s-2*bs, s) // a refused request changes nothing
}

func testFastZero(t *testing.T, f *fixture) {
	c := f.d.Caps()
	if !c.WriteZeroes {
		t.Skip("no write-zeroes")
	}
	bs := f.bs
	f.write(20*bs, 2*bs, false)
	for _, noHole := range []bool{false, true} {
		err := f.d.WriteZeroes(bg, 20*bs+1, 2*bs-1, engine.ZeroFlags{FastZero: true, NoHole: noHole})
		switch {
		case err == nil:
			if !c.FastZero {
				t.Error("FastZero honoured by a device that does not advertise it")
			}
			clear(f.m[20*bs+1 : 22*bs])
		case errors.Is(err, engine.ErrNotFast):
		default:
			t.Errorf("fast zero (no hole %v): %v", noHole, err)
		}
		f.check(20*bs, 2*bs) // a refused fast zero leaves the data
	}
}

// extents checks BlockStatus's structural promises for [off, off+n) and that every extent
// called zero reads as zeros.
func (f *fixture) extents(off, n int64) []engine.Extent {
	f.t.Helper()
	ext, err := f.d.BlockStatus(bg, off, n)
	if err != nil {
		f.t.Fatalf("block status [%d,+%d): %v", off, n, err)
	}
	if len(ext) == 0 {
		f.t.Fatalf("block status [%d,+%d): no extents", off, n)
	}
	pos := off
	for _, e := range ext {
		if e.Length <= 0 {
			f.t.Fatalf("block status [%d,+%d): extent of length %d", off, n, e.Length)
		}
		if pos+e.Length > off+n {
			f.t.Fatalf("block status [%d,+%d): extents cover more than asked", off, n)
		}
		if e.Zero && !zeros.All(f.m[pos:pos+e.Length]) {
			f.t.Fatalf("block status [%d,+%d): [%d,+%d) reported zero but holds data", off, n, pos, e.Length)
		}
		pos += e.Length
	}
	return ext
}

func testBlockStatus(t *testing.T, f *fixture) {
	if !f.d.Caps().BlockStatus {
		t.Skip("device has no block status")
	}
	bs := f.bs
	f.write(bs+1, 1, false)
	f.write(f.stripe-3, 2*bs, false)
	f.write(f.size()-1, 1, false)
	// walk the whole device, resuming where each answer stops
	for pos := int64(0); pos < f.size(); {
		for _, e := range f.extents(pos, f.size()-pos) {
			pos += e.Length
		}
	}
	for _, r := range [][2]int64{{bs + 1, 1}, {f.stripe - 3, 2 * bs}, {f.size() - 1, 1}} {
		if e := f.extents(r[0], r[1])[0]; e.Zero || e.Hole {
			t.Errorf("written range [%d,+%d) reported as %+v", r[0], r[1], e)
		}
	}
	for _, r := range [][2]int64{{1, 1}, {bs - 1, 2}, {f.size() - bs - 1, bs + 1}, {f.stripe - 1, 2}} {
		f.extents(r[0], r[1])
	}
	// after a flush and a trim, the promises still hold
	must(t, f.d.Flush(bg))
	if f.d.Caps().Trim {
		must(t, f.d.Trim(bg, f.stripe-f.bs, 3*bs, false))
		clear(f.m[f.stripe-f.bs : f.stripe+2*bs])
		f.extents(f.stripe-2*bs, 5*bs)
	}
	f.compareAll()
}

func testFlush(t *testing.T, f *fixture) {
	bs := f.bs
	f.write(bs/2, 3*bs, true)
	f.write(f.stripe-bs/2, bs, false)
	must(t, f.d.Flush(bg))
	f.write(7*bs+3, 10, true)
	must(t, f.d.Flush(bg))
	must(t, f.d.Flush(bg)) // nothing dirty: still fine
	f.compareAll()
}

// testConcurrent: goroutines own interleaved odd-sized slices, so every block is shared by
// several writers at once; a goroutine's read of its own slice returns its last write, and in
// the end no write was lost to another's read-modify-write.
func testConcurrent(t *testing.T, f *fixture) {
	const G, slice = 6, 333
	area := min(f.size(), 2*f.stripe+5*f.bs)
	slots := area / (slice * G)
	var wg sync.WaitGroup
	var mu sync.Mutex // guards f.m
	for g := 0; g < G; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			r := rand.New(rand.NewSource(int64(g)))
			for i := 0; i < 150; i++ {
				off := (r.Int63n(slots)*G + int64(g)) * slice
				buf := make([]byte, slice)
				r.Read(buf)
				if err := f.d.WriteAt(bg, buf, off, i%40 == 7); err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				copy(f.m[off:], buf)
				mu.Unlock()
				if i%30 == 0 {
					if err := f.d.Flush(bg); err != nil {
						t.Error(err)
						return
					}
				}
				got := make([]byte, slice)
				if err := f.d.ReadAt(bg, got, off); err != nil || !bytes.Equal(got, buf) {
					t.Errorf("goroutine %d: read of its own write at %d: %v", g, off, err)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	f.compareAll()
}
