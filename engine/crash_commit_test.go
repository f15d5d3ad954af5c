package engine

import (
	"bytes"
	"fmt"
	"math/rand"
	"sync"
	"testing"

	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/store/storetest"
)

// stepStore takes a crash image just before its n-th mutating call once armed, and counts
// the calls made while armed.
type stepStore struct {
	*storetest.Crash
	mu      sync.Mutex
	armed   bool
	calls   int
	at      int // 1-based call to crash before; 0: never
	keep    float64
	snap    *storetest.Crash
	roots   *stepRoots
	counter uint64 // the PSP's counter when the crash was taken
}

func (s *stepStore) tick() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.armed {
		return
	}
	s.calls++
	if s.calls == s.at && s.snap == nil {
		s.snap, s.counter = s.Crash.Crash(rand.New(rand.NewSource(int64(s.at))), s.keep), s.roots.last
	}
}

func (s *stepStore) WriteAt(p []byte, off int64) (int, error) {
	s.tick()
	return s.Crash.WriteAt(p, off)
}
func (s *stepStore) Sync() error              { s.tick(); return s.Crash.Sync() }
func (s *stepStore) Punch(off, n int64) error { s.tick(); return s.Crash.Punch(off, n) }

// stepRoots is the image's root keeper; armed, it takes the crash image when the PSP is
// about to record a new counter — after the image's sync, before the PSP knows.
type stepRoots struct {
	psp.RootKeeper
	st        *stepStore
	atAdvance bool
	last      uint64
}

func (r *stepRoots) Advance(counter uint64, root [32]byte) error {
	r.st.mu.Lock()
	if r.st.armed && r.atAdvance && r.st.snap == nil {
		r.st.snap, r.st.counter = r.st.Crash.Crash(rand.New(rand.NewSource(7)), r.st.keep), r.last
	}
	r.st.mu.Unlock()
	if err := r.RootKeeper.Advance(counter, root); err != nil {
		return err
	}
	r.last = counter
	return nil
}

// TestCrashAtEveryStepOfRootCommit: a flush's commit is its write-back's journal append, the
// root record written into the other slot, the sync, and the PSP's counter advanced. A crash
// before each of those store calls, and between the sync and the counter, keeping none or all
// of the unsynced writes, recovers without an error or a rollback refusal, every sector holding
// its data from before the flush or the flush's own; a crash after the flush returned holds the
// flush's data.
func TestCrashAtEveryStepOfRootCommit(t *testing.T) {
	const ss, sectors = 512, 64
	im := newTestImage(t, sectors*ss, ss, 1<<20)
	a, b := bytes.Repeat([]byte{0xa1}, 8*ss), bytes.Repeat([]byte{0xb2}, 8*ss)
	opts := Options{Shards: 1, Logger: quietLog}
	// run does the workload and returns the crash image, the PSP's counter in it, and the
	// number of store calls the flush made.
	run := func(at int, atAdvance bool, keep float64) (*storetest.Crash, uint64, int) {
		st := &stepStore{Crash: &storetest.Crash{Units: units(im.h)}, at: at, keep: keep}
		roots := &stepRoots{RootKeeper: im.Roots, st: st, atAdvance: atAdvance}
		st.roots = roots
		im.create(t, st.Crash)
		st.Crash.Sync()
		b0 := im.Binding()
		b0.Roots = roots
		e := New(opts)
		must(t, e.LoadKey(1, b0))
		d, err := e.Attach(1, st, false)
		must(t, err)
		must(t, d.WriteAt(ctx, a, 0, false))
		must(t, d.Flush(ctx))
		must(t, d.WriteAt(ctx, b, 0, false))
		st.mu.Lock()
		st.armed = true
		st.mu.Unlock()
		must(t, d.Flush(ctx))
		st.mu.Lock()
		st.armed = false
		calls, snap, counter := st.calls, st.snap, st.counter
		st.mu.Unlock()
		if snap == nil { // after the flush returned
			snap, counter = st.Crash.Crash(rand.New(rand.NewSource(3)), keep), roots.last
		}
		abandon(e)
		return snap, counter, calls
	}
	check := func(what string, snap *storetest.Crash, counter uint64, mustB bool) {
		t.Helper()
		im.SetCounter(t, counter)
		e := New(opts)
		defer e.Close()
		if err := e.LoadKey(2, im.Binding()); err != nil {
			t.Fatal(err)
		}
		d, err := e.Attach(2, snap, false)
		if err != nil {
			t.Fatalf("%s: attach after the crash: %v", what, err)
		}
		if o := d.Origin(); o.Record.Counter < counter || o.Record.Counter > counter+1 || (mustB && o.Recovered == 0) {
			t.Fatalf("%s: the attach began from counter %d with %d journal blocks recovered; the PSP held %d (want it or one more, and the flush's blocks recovered)", what, o.Record.Counter, o.Recovered, counter)
		}
		got := make([]byte, ss)
		for s := 0; s < 8; s++ {
			if err := d.ReadAt(ctx, got, int64(s)*ss); err != nil {
				t.Fatalf("%s: sector %d: %v", what, s, err)
			}
			isA, isB := bytes.Equal(got, a[:ss]), bytes.Equal(got, b[:ss])
			if !isB && (mustB || !isA) {
				t.Fatalf("%s: sector %d holds %x… (want %s)", what, s, got[:4], map[bool]string{true: "the flush's data", false: "its data from before or after the flush"}[mustB])
			}
		}
	}
	_, _, steps := run(0, false, 0)
	if steps < 3 {
		t.Fatalf("the flush made %d store calls; expected at least an append, a root record and a sync", steps)
	}
	for _, keep := range []float64{0, 1} {
		for at := 1; at <= steps; at++ {
			snap, counter, _ := run(at, false, keep)
			check(fmt.Sprintf("crash before store call %d of the flush (keep %v)", at, keep), snap, counter, false)
		}
		snap, counter, _ := run(0, true, keep)
		check("crash after the sync, before the PSP recorded the counter", snap, counter, true)
		snap, counter, _ = run(0, false, keep)
		check("crash after the flush returned", snap, counter, true)
	}
	t.Logf("the flush made %d store calls", steps)
}
