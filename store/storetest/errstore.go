package storetest

import (
	"errors"
	"fmt"
	"math/rand"
	"sync"

	"github.com/sealdisk/sealdisk/store"
)

// Op names a Store operation, for fault injection.
type Op uint8

const (
	OpRead Op = iota + 1
	OpWrite
	OpSync
	OpPunch
	OpTruncate
)

func (o Op) String() string {
	switch o {
	case OpRead:
		return "read"
	case OpWrite:
		return "write"
	case OpSync:
		return "sync"
	case OpPunch:
		return "punch"
	case OpTruncate:
		return "truncate"
	}
	return "op?"
}

// ErrInjected is wrapped by every failure an ErrStore injects.
var ErrInjected = errors.New("injected I/O error")

// Injector decides the fate of one operation on [off, off+n) (Sync: 0, 0): nil lets it run,
// an error fails it before it touches the store. It describes itself (String), so the errors
// it injects, and a test that fails under it, say which faults were running. ErrStore calls it
// under its lock, so an injector need not be safe for concurrent use.
type Injector interface {
	Inject(op Op, off, n int64) error
	String() string
}

// Func is an Injector made of a function and its description.
func Func(desc string, f func(op Op, off, n int64) error) Injector { return funcInjector{desc, f} }

type funcInjector struct {
	desc string
	f    func(op Op, off, n int64) error
}

func (i funcInjector) Inject(op Op, off, n int64) error { return i.f(op, off, n) }
func (i funcInjector) String() string                   { return i.desc }

// ErrStore wraps a Store and fails the operations its Injector picks, the way pebble's
// errorfs does, so tests can walk every error path of the engine and the tools.
type ErrStore struct {
	s store.Store

	mu       sync.Mutex // guards inject, injected and the injector's own state
	inject   Injector
	injected int
}

var _ store.Store = (*ErrStore)(nil)

// NewErrStore wraps s; a nil injector injects nothing.
func NewErrStore(s store.Store, inject Injector) *ErrStore { return &ErrStore{s: s, inject: inject} }

// SetInjector replaces the injector (nil: none).
func (e *ErrStore) SetInjector(inject Injector) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.inject = inject
}

// Injected is the number of failures injected so far.
func (e *ErrStore) Injected() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.injected
}

func (e *ErrStore) check(op Op, off, n int64) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.inject == nil {
		return nil
	}
	err := e.inject.Inject(op, off, n)
	if err != nil {
		e.injected++
	}
	return err
}

func (e *ErrStore) ReadAt(p []byte, off int64) (int, error) {
	if err := e.check(OpRead, off, int64(len(p))); err != nil {
		return 0, err
	}
	return e.s.ReadAt(p, off)
}

func (e *ErrStore) WriteAt(p []byte, off int64) (int, error) {
	if err := e.check(OpWrite, off, int64(len(p))); err != nil {
		return 0, err
	}
	return e.s.WriteAt(p, off)
}

func (e *ErrStore) Sync() error {
	if err := e.check(OpSync, 0, 0); err != nil {
		return err
	}
	return e.s.Sync()
}

func (e *ErrStore) Punch(off, n int64) error {
	if err := e.check(OpPunch, off, n); err != nil {
		return err
	}
	return e.s.Punch(off, n)
}

func (e *ErrStore) Truncate(size int64) error {
	if err := e.check(OpTruncate, size, 0); err != nil {
		return err
	}
	return e.s.Truncate(size)
}

func (e *ErrStore) Size() (int64, error) { return e.s.Size() }

// String describes the store's injector, for a failing test's message.
func (e *ErrStore) String() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.inject == nil {
		return "error-injecting store, injecting nothing"
	}
	return fmt.Sprintf("error-injecting store (%s, %d failures so far)", e.inject, e.injected)
}

func (e *ErrStore) Close() error { return e.s.Close() }

// Injected is the error an injector returns for op on [off, off+n): it wraps ErrInjected and
// names the injector.
func Injected(by Injector, op Op, off, n int64) error {
	return fmt.Errorf("%w (%s): %s [%d,+%d)", ErrInjected, by, op, off, n)
}

// FailAfter lets the first n operations of kind op succeed and fails every later one.
func FailAfter(op Op, n int) Injector {
	var self Injector
	self = Func(fmt.Sprintf("fail every %s after the first %d", op, n), func(o Op, off, k int64) error {
		if o != op {
			return nil
		}
		if n > 0 {
			n--
			return nil
		}
		return Injected(self, o, off, k)
	})
	return self
}

// FailRange fails every operation of kind op that touches [off, off+n).
func FailRange(op Op, off, n int64) Injector {
	var self Injector
	self = Func(fmt.Sprintf("fail every %s touching [%d,+%d)", op, off, n), func(o Op, at, k int64) error {
		if o == op && at < off+n && off < at+max(k, 1) {
			return Injected(self, o, at, k)
		}
		return nil
	})
	return self
}

// FailRandomly fails each operation of the given kinds (all kinds when none are given) with
// probability p, drawing from r.
func FailRandomly(r *rand.Rand, p float64, ops ...Op) Injector {
	kinds := "operation"
	if len(ops) > 0 {
		kinds = fmt.Sprint(ops)
	}
	var self Injector
	self = Func(fmt.Sprintf("fail each %s with probability %g", kinds, p), func(o Op, off, k int64) error {
		hit := len(ops) == 0
		for _, op := range ops {
			hit = hit || op == o
		}
		if hit && r.Float64() < p {
			return Injected(self, o, off, k)
		}
		return nil
	})
	return self
}

// LosingSyncs wraps inner so that each sync it fails also loses c's unsynced writes, as Linux
// may drop the pages a failed fdatasync could not write (Crash.LoseUnsynced).
func LosingSyncs(c *Crash, inner Injector) Injector {
	return Func(inner.String()+"; a failed sync loses the unsynced writes", func(op Op, off, n int64) error {
		err := inner.Inject(op, off, n)
		if err != nil && op == OpSync {
			c.LoseUnsynced()
		}
		return err
	})
}
