package engine

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/store"
)

// rangeLocks serialise test operations whose byte ranges overlap, at a granule much smaller
// than a sector: operations on disjoint bytes of one sector still run concurrently (and race
// inside the engine's read-modify-write), while overlapping ones have a defined order for the
// model.
type rangeLocks struct {
	granule int64
	mu      []sync.Mutex
}

func (l *rangeLocks) span(off, n int64) (int64, int64) {
	return off / l.granule, (off + n - 1) / l.granule
}

func (l *rangeLocks) lock(off, n int64) {
	a, b := l.span(off, n)
	for g := a; g <= b; g++ { // ascending: no deadlock
		l.mu[g].Lock()
	}
}

func (l *rangeLocks) unlock(off, n int64) {
	a, b := l.span(off, n)
	for g := a; g <= b; g++ {
		l.mu[g].Unlock()
	}
}

// TestConcurrentStressAgainstModel: many goroutines issue overlapping unaligned reads, writes
// (some FUA), trims, write-zeroes and flushes over a few stripes while a tiny cache evicts and
// idle write-back runs; every read is checked against a model kept under range locks. Then the
// disk is detached, reattached and compared whole.
func TestConcurrentStressAgainstModel(t *testing.T) {
	const size = 2 << 20
	goroutines, ops := 12, 400
	if testing.Short() {
		goroutines, ops = 6, 150
	}
	for _, ss := range []uint32{4096, 512} {
		im := newTestImage(t, size, ss, 0)
		st, path := fileStore(t, im)
		e := New(Options{Shards: 3, CacheBytes: 96 << 10, StripeSectors: 64, IdleFlush: 5 * time.Millisecond})
		d := im.attach(t, e, 1, st)
		model := make([]byte, size)
		locks := &rangeLocks{granule: 256, mu: make([]sync.Mutex, size/256)}
		var wg sync.WaitGroup
		for g := 0; g < goroutines; g++ {
			wg.Add(1)
			go func(g int) {
				defer wg.Done()
				r := rand.New(rand.NewSource(int64(g) + int64(ss)))
				for i := 0; i < ops && !t.Failed(); i++ {
					// mostly small ranges clustered in a hot area, so goroutines collide often
					var off, n int64
					if r.Intn(4) > 0 {
						off = 256<<10 + r.Int63n(64<<10)
						n = 1 + r.Int63n(int64(ss)*2)
					} else {
						off = r.Int63n(size)
						n = 1 + r.Int63n(96<<10)
					}
					n = min(n, size-off)
					switch k := r.Intn(20); {
					case k < 8:
						buf := make([]byte, n)
						r.Read(buf)
						locks.lock(off, n)
						err := d.WriteAt(ctx, buf, off, k == 0)
						if err == nil {
							copy(model[off:], buf)
						}
						locks.unlock(off, n)
						if err != nil {
							t.Error(err)
						}
					case k < 15:
						got := make([]byte, n)
						locks.lock(off, n)
						err := d.ReadAt(ctx, got, off)
						ok := bytes.Equal(got, model[off:off+n])
						locks.unlock(off, n)
						if err != nil || !ok {
							t.Errorf("ss %d goroutine %d op %d: read [%d,+%d): %v, equal %v", ss, g, i, off, n, err, ok)
						}
					case k < 17:
						locks.lock(off, n)
						var err error
						if k == 15 {
							err = d.Trim(ctx, off, n, false)
						} else {
							err = d.WriteZeroes(ctx, off, n, ZeroFlags{NoHole: r.Intn(2) == 0})
						}
						if err == nil {
							clear(model[off : off+n])
						}
						locks.unlock(off, n)
						if err != nil {
							t.Error(err)
						}
					case k < 19:
						if err := d.Flush(ctx); err != nil {
							t.Error(err)
						}
					default:
						locks.lock(off, n)
						if _, err := d.BlockStatus(ctx, off, n); err != nil {
							t.Error(err)
						}
						locks.unlock(off, n)
					}
				}
			}(g)
		}
		wg.Wait()
		if t.Failed() {
			t.FailNow()
		}
		must(t, e.ClearKey(1))
		d = im.attach(t, e, 1, reopen(t, path))
		got := make([]byte, size)
		must(t, d.ReadAt(ctx, got, 0))
		if !bytes.Equal(got, model) {
			t.Fatalf("ss %d: contents after reattach differ from the model", ss)
		}
		must(t, e.Close())
	}
}

// TestReadsRaceWriteBacks: reads of a few sectors run while other goroutines keep rewriting
// and trimming exactly those sectors, with a cache so small that every write is written back
// in place at once, and a store whose data reads are slow. A read opens its sectors after the shard is released (opening); it must
// still see each sector whole as one of its contents — a version, or zeros after a trim —
// never an integrity error from new data under an old entry, and never a mix.
func TestReadsRaceWriteBacks(t *testing.T) {
	const ss, sectors = 4096, 4
	im := newTestImage(t, 1<<20, ss, 0)
	f, _ := fileStore(t, im)
	e := New(Options{Shards: 2, CacheBytes: 1, StripeSectors: 64})
	defer e.Close()
	// Data reads sleep first, so a read's copy from the store spans write-backs.
	d := im.attach(t, e, 1, &slowReads{Store: f, from: int64(im.h.DataPos(0)), delay: 50 * time.Microsecond})
	rounds := 1000
	if testing.Short() {
		rounds = 300
	}
	// A sector's content is its version in every 8 bytes; 0 is the trimmed sector.
	fill := func(b []byte, v uint64) {
		for i := 0; i < len(b); i += 8 {
			binary.LittleEndian.PutUint64(b[i:], v)
		}
	}
	var stop atomic.Bool
	var writers, readers sync.WaitGroup
	for w := range 2 {
		writers.Add(1)
		go func() {
			defer writers.Done()
			buf := make([]byte, ss)
			other := make([]byte, 20*ss)
			for i := 1; i <= rounds && !t.Failed(); i++ {
				lba := int64(i % sectors)
				var err error
				if i%7 == 0 {
					err = d.Trim(ctx, lba*ss, ss, false)
				} else {
					fill(buf, uint64(i)<<1|uint64(w))
					err = d.WriteAt(ctx, buf, lba*ss, i%3 == 0)
				}
				if err == nil {
					// 20 sectors in the same stripe (shard 0) evict the cache's 16 lines
					err = d.WriteAt(ctx, other, 32*ss, false)
				}
				if err != nil {
					t.Error(err)
				}
			}
		}()
	}
	var reads atomic.Int64
	for range 3 {
		readers.Add(1)
		go func() {
			defer readers.Done()
			got := make([]byte, sectors*ss)
			for !stop.Load() && !t.Failed() {
				if err := d.ReadAt(ctx, got, 0); err != nil {
					t.Errorf("read racing write-backs: %v", err)
					return
				}
				reads.Add(1)
				for s := range sectors {
					sec := got[s*ss : (s+1)*ss]
					v := binary.LittleEndian.Uint64(sec)
					for i := 0; i < ss; i += 8 {
						if binary.LittleEndian.Uint64(sec[i:]) != v {
							t.Errorf("sector %d read torn: version %d at byte 0, %d at byte %d", s, v, binary.LittleEndian.Uint64(sec[i:]), i)
							return
						}
					}
				}
			}
		}()
	}
	writers.Wait()
	stop.Store(true)
	readers.Wait()
	if n := e.Stats.AuthFailures.Load(); n != 0 {
		t.Errorf("%d authentication failures", n)
	}
	t.Logf("%d reads, %d write-backs", reads.Load(), e.Stats.Writebacks.Load())
}

// slowReads delays every read of the data region (from on) by delay before performing it.
type slowReads struct {
	store.Store
	from  int64
	delay time.Duration
}

func (s *slowReads) ReadAt(p []byte, off int64) (int, error) {
	if off >= s.from {
		time.Sleep(s.delay)
	}
	return s.Store.ReadAt(p, off)
}

// TestDetachRacesRequests: writers and readers keep going while the disk is detached. Every
// request either completes or fails with ErrDetached (never hangs, never another error), and
// after reattaching, each writer's sector holds exactly its last write that succeeded: a
// request admitted before detach finishes before the final write-back, and none is admitted
// after it.
func TestDetachRacesRequests(t *testing.T) {
	const ss, writers = 4096, 8
	for round := range 20 {
		im := newTestImage(t, writers*64*ss, ss, 0)
		st, path := fileStore(t, im)
		e := New(Options{Shards: 2, StripeSectors: 64})
		d := im.attach(t, e, 1, st)
		last := make([]uint64, writers)
		var wg sync.WaitGroup
		for g := range writers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf, got := make([]byte, ss), make([]byte, ss)
				for v := uint64(1); ; v++ {
					binary.LittleEndian.PutUint64(buf, v)
					err := d.WriteAt(ctx, buf, int64(g)*64*ss, v%5 == 0)
					if err == nil {
						last[g] = v
						err = d.ReadAt(ctx, got, int64(g)*64*ss)
					}
					if errors.Is(err, ErrDetached) {
						return
					}
					if err != nil {
						t.Errorf("round %d writer %d: %v", round, g, err)
						return
					}
				}
			}()
		}
		time.Sleep(time.Duration(round%5) * time.Millisecond)
		must(t, d.Close())
		wg.Wait()
		if t.Failed() {
			t.FailNow()
		}
		must(t, e.ClearKey(1))
		d = im.attach(t, e, 1, reopen(t, path))
		got := make([]byte, ss)
		for g := range writers {
			must(t, d.ReadAt(ctx, got, int64(g)*64*ss))
			if v := binary.LittleEndian.Uint64(got); v != last[g] {
				t.Fatalf("round %d writer %d: sector holds version %d after reattach, its last acknowledged write was %d", round, g, v, last[g])
			}
		}
		must(t, e.Close())
	}
}
