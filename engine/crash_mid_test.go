package engine

import (
	"fmt"
	"math/rand"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/store/storetest"
)

// crashPoint wraps a crashable store and, just before its n-th mutating call (write, sync or
// punch), captures what a crash at that instant would leave. Unlike a crash between
// operations, this lands inside one: between a journal append and its sync, between the sync
// and the in-place writes, inside a checkpoint, inside recovery.
type crashPoint struct {
	*storetest.Crash
	op *atomic.Int64 // the workload operation in flight (set by the test)

	mu   sync.Mutex // guards left, rng, snap, at
	left int        // mutating calls until the crash; ≤ 0 once taken or disarmed
	rng  *rand.Rand
	keep float64
	snap *storetest.Crash
	at   int64 // op in flight when the crash was taken
	// roots records the counter the PSP held when the crash was taken: a crash stops the
	// PSP too, so a check attaches the snapshot to a PSP holding that counter.
	roots   *recordingRoots
	counter uint64
}

// recordingRoots is the image's root keeper, recording the last counter advanced to.
type recordingRoots struct {
	psp.RootKeeper
	last atomic.Uint64
}

func (r *recordingRoots) Advance(counter uint64, root [32]byte) error {
	if err := r.RootKeeper.Advance(counter, root); err != nil {
		return err
	}
	r.last.Store(counter)
	return nil
}

func (c *crashPoint) tick() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.left <= 0 {
		return
	}
	if c.left--; c.left == 0 {
		c.snap = c.Crash.Crash(c.rng, c.keep)
		c.at = c.op.Load()
		if c.roots != nil {
			c.counter = c.roots.last.Load()
		}
	}
}

func (c *crashPoint) WriteAt(p []byte, off int64) (int, error) {
	c.tick()
	return c.Crash.WriteAt(p, off)
}

func (c *crashPoint) Sync() error {
	c.tick()
	return c.Crash.Sync()
}

func (c *crashPoint) Punch(off, n int64) error {
	c.tick()
	return c.Crash.Punch(off, n)
}

// taken returns the crash image and the op in flight, or nil.
func (c *crashPoint) taken() (*storetest.Crash, int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.snap, c.at
}

func (c *crashPoint) disarm() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.left = 0
}

// mop is one workload operation, for replaying the model up to a crash.
type mop struct {
	kind    int // 0 write, 1 flush, 2 trim/zero, 3 read
	off, n  int64
	data    []byte
	fua     bool
	noHole  bool
	isTrim  bool
	logLine string
}

// acceptable returns, per sector, every content it may hold after a crash taken while op
// `at` was in flight: ops before it completed (their FUA and flushes durable), op `at` may or
// may not have happened, later ones never started.
func acceptable(ops []mop, at int64, sectors, ss int64) []map[string]bool {
	cur := make([][]byte, sectors)
	ok := make([]map[string]bool, sectors)
	for s := range cur {
		cur[s] = make([]byte, ss)
		ok[s] = map[string]bool{string(cur[s]): true}
	}
	for i, o := range ops {
		if int64(i) > at {
			break
		}
		inflight := int64(i) == at
		lo, hi := o.off/ss, (o.off+o.n+ss-1)/ss
		switch o.kind {
		case 0, 2:
			for j := int64(0); j < o.n; j++ {
				b := byte(0)
				if o.kind == 0 {
					b = o.data[j]
				}
				cur[(o.off+j)/ss][(o.off+j)%ss] = b
			}
			for s := lo; s < hi; s++ {
				if o.kind == 0 && o.fua && !inflight {
					ok[s] = map[string]bool{}
				}
				ok[s][string(cur[s])] = true
			}
		case 1:
			if !inflight {
				for s := range cur {
					ok[s] = map[string]bool{string(cur[s]): true}
				}
			}
		}
	}
	return ok
}

// TestCrashInsideOperations: crashes at a random store call inside operations — journal
// appends, syncs, in-place writes, checkpoints forced by a small journal, FUA write-backs —
// then a second crash at a random store call inside the recovery of the first. After each,
// every sector reads without error as its last durable content or a later one, and no nonce
// is reused, across all of it.
func TestCrashInsideOperations(t *testing.T) {
	const sectors, ss = 128, 512
	iterations := 400
	if testing.Short() {
		iterations = 100
	}
	if n, err := strconv.Atoi(os.Getenv("SEALDISK_CRASH_ITERATIONS")); err == nil && n > 0 {
		iterations = n // soak runs
	}
	r := rand.New(rand.NewSource(99))
	im := newTestImage(t, sectors*ss, ss, 1<<20)
	roots := &recordingRoots{RootKeeper: im.Roots}
	im.Roots = roots
	points, recoveryPoints := 0, 0
	for it := 0; it < iterations && !t.Failed(); it++ {
		journal := uint64(24 + r.Intn(200)) // fills within the workload: checkpoints from a full journal
		opts := Options{Shards: 2, CacheBytes: 8 * ss * 2, StripeSectors: 64, Logger: quietLog, journalBytes: journal * 8 << 10}
		base := &storetest.Crash{Units: units(im.h)}
		im.create(t, base)
		base.Sync()
		nl := &nonceLog{t: t, h: im.h, seen: map[[24]byte][2]uint64{}}
		base.OnWrite = nl.onWrite
		var inflight atomic.Int64
		cp := &crashPoint{Crash: base, op: &inflight, left: 1 + r.Intn(120), rng: rand.New(rand.NewSource(r.Int63())), keep: r.Float64(), roots: roots}
		e := New(opts)
		d := im.attach(t, e, psp.ASID(1), cp)
		var ops []mop
		for i := 0; i < 40; i++ {
			if s, _ := cp.taken(); s != nil {
				break
			}
			off := r.Int63n(sectors * ss)
			n := 1 + r.Int63n(min(sectors*ss-off, 20*ss))
			o := mop{off: off, n: n}
			inflight.Store(int64(len(ops)))
			switch k := r.Intn(10); {
			case k < 6:
				o.kind, o.fua, o.data = 0, k == 0, make([]byte, n)
				r.Read(o.data)
				must(t, d.WriteAt(ctx, o.data, off, o.fua))
			case k < 7:
				o.kind = 1
				must(t, d.Flush(ctx))
			case k < 9:
				o.kind, o.isTrim, o.noHole = 2, k == 7, r.Intn(2) == 0
				if o.isTrim {
					must(t, d.Trim(ctx, off, n, false))
				} else {
					must(t, d.WriteZeroes(ctx, off, n, ZeroFlags{NoHole: o.noHole}))
				}
			default:
				o.kind = 3
				must(t, d.ReadAt(ctx, make([]byte, n), off))
			}
			o.logLine = fmt.Sprintf("%d%s:[%d,+%d)", o.kind, map[bool]string{true: "F"}[o.fua], off, n)
			ops = append(ops, o)
		}
		// the detach's write-back and checkpoint are crash points too (a "flush" in flight)
		inflight.Store(int64(len(ops)))
		ops = append(ops, mop{kind: 1, logLine: "detach"})
		must(t, e.Close())
		snap, at := cp.taken()
		counter := cp.counter
		if snap == nil {
			snap, at, counter = base.Crash(cp.rng, cp.keep), int64(len(ops)), roots.last.Load() // after a clean detach
		}
		points++
		ok := acceptable(ops, at, sectors, ss)
		var log []string
		for _, o := range ops {
			log = append(log, o.logLine)
		}
		var pre *storetest.Crash
		check := func(what string, st *storetest.Crash, asid psp.ASID) {
			st.OnWrite = nl.onWrite
			im.SetCounter(t, counter) // the PSP as the crash left it
			e := New(opts)
			defer e.Close()
			d := im.attach(t, e, asid, st)
			got := make([]byte, ss)
			for s := int64(0); s < sectors; s++ {
				if err := d.ReadAt(ctx, got, s*ss); err != nil {
					t.Logf("before recovery: %s", dumpSector(im, pre, uint64(s)))
					t.Fatalf("iteration %d (%s, crash in op %d of %v): sector %d unreadable: %v", it, what, at, log, s, err)
				}
				if !ok[s][string(got)] {
					t.Logf("before recovery: %s", dumpSector(im, pre, uint64(s)))
					t.Logf("the content read is the model's after ops %v", whenHeld(ops, s, ss, got))
					t.Fatalf("iteration %d (%s, crash in op %d of %v): sector %d holds content it never had since its last durability point", it, what, at, log, s)
				}
			}
			// keep writing after recovery: a new session must not reuse a nonce
			buf := make([]byte, 3*ss)
			r.Read(buf)
			must(t, d.WriteAt(ctx, buf, int64(r.Intn(sectors-3))*ss, true))
		}
		// crash again inside the recovery of the first crash, then recover that
		pre = snap.Crash(rand.New(rand.NewSource(1)), 1)
		rp := &crashPoint{Crash: snap, op: &inflight, left: 1 + r.Intn(40), rng: rand.New(rand.NewSource(r.Int63())), keep: r.Float64()}
		snap.OnWrite = nl.onWrite
		im.SetCounter(t, counter)
		e2 := New(opts)
		im.attach(t, e2, 2, rp)
		rp.disarm()
		must(t, e2.Close())
		if snap2, _ := rp.taken(); snap2 != nil {
			recoveryPoints++
			check("crash during recovery", snap2, 3)
		}
		check("after crash", snap, 4)
	}
	t.Logf("%d crash points inside operations, %d more inside recovery", points, recoveryPoints)
}

// whenHeld lists the ops after which sector s held content (for failure reports).
func whenHeld(ops []mop, s, ss int64, content []byte) []int {
	cur := make([]byte, ss)
	var out []int
	if string(cur) == string(content) {
		out = append(out, -1)
	}
	for i, o := range ops {
		if o.kind == 0 || o.kind == 2 {
			for j := int64(0); j < o.n; j++ {
				if (o.off+j)/ss == s {
					b := byte(0)
					if o.kind == 0 {
						b = o.data[j]
					}
					cur[(o.off+j)%ss] = b
				}
			}
		}
		if string(cur) == string(content) {
			out = append(out, i)
		}
	}
	return out
}
