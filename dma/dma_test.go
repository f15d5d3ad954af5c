package dma

import (
	"bytes"
	"errors"
	"sync"
	"testing"
	"time"
)

func TestRingFIFOAndBatches(t *testing.T) {
	r := NewRing(8)
	for i := 0; i < 5; i++ {
		if err := r.Push(&Descriptor{Tag: uint64(i)}); err != nil {
			t.Fatal(err)
		}
	}
	if r.Len() != 5 || r.Cap() != 8 {
		t.Fatalf("len %d cap %d", r.Len(), r.Cap())
	}
	buf := make([]*Descriptor, 3)
	ds, closed := r.PopBatch(buf, 0, nil)
	if closed || len(ds) != 3 || ds[0].Tag != 0 || ds[2].Tag != 2 {
		t.Fatalf("first batch %v %v", ds, closed)
	}
	// wrap around the end of the slot array
	for i := 5; i < 11; i++ {
		if err := r.Push(&Descriptor{Tag: uint64(i)}); err != nil {
			t.Fatal(err)
		}
	}
	next := uint64(3)
	for next < 11 {
		ds, _ := r.PopBatch(buf, 0, nil)
		for _, d := range ds {
			if d.Tag != next {
				t.Fatalf("popped %d, want %d", d.Tag, next)
			}
			next++
		}
	}
	if r.Len() != 0 {
		t.Fatal("ring not empty")
	}
}

// TestRingBackpressure: a full ring blocks Push until the consumer makes room.
func TestRingBackpressure(t *testing.T) {
	r := NewRing(2)
	r.Push(&Descriptor{Tag: 1})
	r.Push(&Descriptor{Tag: 2})
	pushed := make(chan error)
	go func() { pushed <- r.Push(&Descriptor{Tag: 3}) }()
	select {
	case err := <-pushed:
		t.Fatalf("push into a full ring returned %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	buf := make([]*Descriptor, 1)
	ds, _ := r.PopBatch(buf, 0, nil)
	if ds[0].Tag != 1 {
		t.Fatalf("popped %d", ds[0].Tag)
	}
	if err := <-pushed; err != nil {
		t.Fatal(err)
	}
	if r.Len() != 2 {
		t.Fatalf("len %d", r.Len())
	}
}

func TestRingCloseDrainsThenReports(t *testing.T) {
	r := NewRing(4)
	r.Push(&Descriptor{Tag: 1})
	blocked := make(chan error, 3)
	r2 := NewRing(1)
	r2.Push(&Descriptor{})
	for i := 0; i < 3; i++ {
		go func() { blocked <- r2.Push(&Descriptor{}) }()
	}
	r.Close()
	r2.Close()
	if err := r.Push(&Descriptor{}); !errors.Is(err, ErrClosed) {
		t.Fatalf("push after close: %v", err)
	}
	for i := 0; i < 3; i++ {
		if err := <-blocked; !errors.Is(err, ErrClosed) {
			t.Fatalf("blocked push after close: %v", err)
		}
	}
	buf := make([]*Descriptor, 4)
	ds, closed := r.PopBatch(buf, 0, nil)
	if closed || len(ds) != 1 {
		t.Fatalf("queued descriptor lost at close: %v %v", ds, closed)
	}
	if ds, closed = r.PopBatch(buf, 0, nil); !closed || len(ds) != 0 {
		t.Fatalf("drained closed ring: %v %v", ds, closed)
	}
}

func TestRingPopTimeout(t *testing.T) {
	r := NewRing(4)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	buf := make([]*Descriptor, 4)
	ds, closed := r.PopBatch(buf, 10*time.Millisecond, timer)
	if closed || len(ds) != 0 {
		t.Fatalf("empty ring: %v %v", ds, closed)
	}
	// the timer is reusable and a push wakes a waiting consumer before the timeout
	go func() {
		time.Sleep(10 * time.Millisecond)
		r.Push(&Descriptor{Tag: 9})
	}()
	for {
		ds, _ = r.PopBatch(buf, time.Second, timer)
		if len(ds) > 0 {
			break
		}
	}
	if ds[0].Tag != 9 {
		t.Fatalf("popped %d", ds[0].Tag)
	}
}

// TestRingManyProducers: every pushed descriptor is popped exactly once, in per-producer
// order, through a ring much smaller than the load; Interrupt completes each one.
func TestRingManyProducers(t *testing.T) {
	const producers, each = 8, 2000
	sq, cq := NewRing(4), NewRing(4)
	var mu sync.Mutex
	last := make([]int, producers)
	for i := range last {
		last[i] = -1
	}
	var done sync.WaitGroup
	done.Add(producers * each)
	complete := func(d *Descriptor) {
		if d.Status != nil {
			t.Error(d.Status)
		}
		done.Done()
	}
	go func() { // the coprocessor: checks order, completes
		buf := make([]*Descriptor, 3)
		for {
			ds, closed := sq.PopBatch(buf, 0, nil)
			if closed {
				cq.Close()
				return
			}
			for _, d := range ds {
				p, i := int(d.Tag>>32), int(d.Tag&0xffffffff)
				mu.Lock()
				if i != last[p]+1 {
					t.Errorf("producer %d: got %d after %d", p, i, last[p])
				}
				last[p] = i
				mu.Unlock()
				if err := cq.Push(d); err != nil {
					t.Error(err)
				}
			}
		}
	}()
	stopped := make(chan struct{})
	go func() { Interrupt(cq, 2); close(stopped) }()
	var wg sync.WaitGroup
	for p := 0; p < producers; p++ {
		wg.Add(1)
		go func(p int) {
			defer wg.Done()
			for i := 0; i < each; i++ {
				if err := sq.Push(&Descriptor{Tag: uint64(p)<<32 | uint64(i), Complete: complete}); err != nil {
					t.Error(err)
				}
			}
		}(p)
	}
	wg.Wait()
	done.Wait()
	sq.Close()
	<-stopped
	for p, l := range last {
		if l != each-1 {
			t.Fatalf("producer %d: last %d", p, l)
		}
	}
}

func TestOpString(t *testing.T) {
	for op, s := range map[Op]string{OpRead: "read", OpWrite: "write", OpFlush: "flush", OpTrim: "trim", OpZero: "zero", OpStatus: "status", 0: "op?"} {
		if op.String() != s {
			t.Errorf("%d: %q", op, op.String())
		}
	}
}

func TestMemCrypt(t *testing.T) {
	m := NewMemCrypt()
	plain := bytes.Repeat([]byte("guest page "), 400)
	d := &Descriptor{ASID: 3, Buf: append([]byte(nil), plain...)}
	if err := m.Seal(d); !errors.Is(err, ErrNoVEK) {
		t.Fatalf("seal without a VEK: %v", err)
	}
	if err := m.Load(3); err != nil {
		t.Fatal(err)
	}
	if err := m.Load(4); err != nil {
		t.Fatal(err)
	}
	d.Buf = append([]byte(nil), plain...)
	if err := m.Seal(d); err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(d.Buf, plain) || bytes.Contains(d.Buf, []byte("guest page")) {
		t.Fatal("payload in guest memory is plaintext")
	}
	sealed := append([]byte(nil), d.Buf...)
	// another VM's memory key does not open it
	other := &Descriptor{ASID: 4, Buf: append([]byte(nil), sealed...), MemIV: d.MemIV}
	if err := m.Open(other); err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(other.Buf, plain) {
		t.Fatal("ASID 4's VEK opened ASID 3's memory")
	}
	if err := m.Open(d); err != nil || !bytes.Equal(d.Buf, plain) {
		t.Fatalf("round trip: %v", err)
	}
	// a fresh IV per payload: sealing the same bytes twice differs
	d2 := &Descriptor{ASID: 3, Buf: append([]byte(nil), plain...)}
	m.Seal(d2)
	if d2.MemIV == d.MemIV || bytes.Equal(d2.Buf, sealed) {
		t.Fatal("memory IV reused")
	}
	// a relaunch (new VEK) cannot open the old memory; a cleared ASID has none
	m.Load(3)
	d3 := &Descriptor{ASID: 3, Buf: append([]byte(nil), sealed...), MemIV: d.MemIV}
	m.Open(d3)
	if bytes.Equal(d3.Buf, plain) {
		t.Fatal("new VEK opened memory sealed under the old one")
	}
	m.Clear(3)
	if m.Loaded(3) || !m.Loaded(4) {
		t.Fatal("Clear")
	}
	if err := m.Open(d3); !errors.Is(err, ErrNoVEK) {
		t.Fatalf("open after clear: %v", err)
	}
}
