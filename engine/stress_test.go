package engine

import (
	"bytes"
	"math/rand"
	"sync"
	"testing"
	"time"
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
							err = d.Trim(ctx, off, n)
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
