package storetest

import (
	"errors"
	"math/rand"
	"strings"
	"testing"
)

func TestMemAgainstModel(t *testing.T) { Exercise(t, NewMem(0), 2) }

func TestMemIsSparse(t *testing.T) {
	m := NewMem(100 << 30)
	if _, err := m.WriteAt([]byte{1}, 50<<30); err != nil {
		t.Fatal(err)
	}
	if a := m.Allocated(); a != memChunk {
		t.Fatalf("one byte allocated %d bytes", a)
	}
	m.Punch(50<<30-memChunk, 3*memChunk)
	if m.Allocated() != 0 {
		t.Fatal("punch kept a chunk")
	}
}

func TestErrStoreInjects(t *testing.T) {
	e := NewErrStore(NewMem(1<<20), FailAfter(OpWrite, 2))
	p := make([]byte, 10)
	for i := 0; i < 2; i++ {
		if _, err := e.WriteAt(p, 0); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.WriteAt(p, 0); !errors.Is(err, ErrInjected) {
		t.Fatalf("third write: %v", err)
	}
	if _, err := e.ReadAt(p, 0); err != nil {
		t.Fatalf("reads are not failed by a write injector: %v", err)
	}
	e.SetInjector(FailRange(OpRead, 4096, 4096))
	if _, err := e.ReadAt(p, 4090); !errors.Is(err, ErrInjected) {
		t.Fatalf("read touching the range: %v", err)
	}
	if _, err := e.ReadAt(p, 8192); err != nil {
		t.Fatalf("read past the range: %v", err)
	}
	if _, err := e.ReadAt(p, 4086); err != nil {
		t.Fatalf("read before the range: %v", err)
	}
	e.SetInjector(FailAfter(OpSync, 0))
	if err := e.Sync(); !errors.Is(err, ErrInjected) || !strings.Contains(err.Error(), "fail every sync after the first 0") {
		t.Fatalf("sync: %v, want an injected error naming its injector", err)
	}
	if d := e.String(); !strings.Contains(d, "fail every sync after the first 0") {
		t.Fatalf("the store describes itself as %q", d)
	}
	// a failed write leaves the store untouched
	e.SetInjector(FailRange(OpWrite, 0, 1))
	e.WriteAt([]byte{7}, 0)
	e.SetInjector(nil)
	e.ReadAt(p[:1], 0)
	if p[0] != 0 {
		t.Fatal("a failed write reached the store")
	}
	if e.Injected() != 4 {
		t.Fatalf("injected %d", e.Injected())
	}
	r := rand.New(rand.NewSource(1))
	e.SetInjector(FailRandomly(r, 0.5, OpPunch))
	fails := 0
	for i := 0; i < 200; i++ {
		if e.Punch(0, 1) != nil {
			fails++
		}
		if _, err := e.ReadAt(p, 0); err != nil {
			t.Fatal("random injector hit an op it does not cover")
		}
	}
	if fails == 0 || fails == 200 {
		t.Fatalf("%d of 200 punches failed", fails)
	}
}
