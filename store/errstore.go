package store

import (
	"errors"
	"fmt"
	"math/rand"
	"sync"
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
// an error fails it before it touches the store. ErrStore calls it under its lock, so an
// injector need not be safe for concurrent use.
type Injector func(op Op, off, n int64) error

// ErrStore wraps a Store and fails the operations its Injector picks, the way pebble's
// errorfs does, so tests can walk every error path of the engine and the tools.
type ErrStore struct {
	s Store

	mu       sync.Mutex // guards inject, injected and the injector's own state
	inject   Injector
	injected int
}

var _ Store = (*ErrStore)(nil)

// NewErrStore wraps s; a nil injector injects nothing.
func NewErrStore(s Store, inject Injector) *ErrStore { return &ErrStore{s: s, inject: inject} }

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
	err := e.inject(op, off, n)
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

func (e *ErrStore) Close() error { return e.s.Close() }

func injected(op Op, off, n int64) error {
	return fmt.Errorf("%w: %s [%d,+%d)", ErrInjected, op, off, n)
}

// FailAfter lets the first n operations of kind op succeed and fails every later one.
func FailAfter(op Op, n int) Injector {
	return func(o Op, off, k int64) error {
		if o != op {
			return nil
		}
		if n > 0 {
			n--
			return nil
		}
		return injected(o, off, k)
	}
}

// FailRange fails every operation of kind op that touches [off, off+n).
func FailRange(op Op, off, n int64) Injector {
	return func(o Op, at, k int64) error {
		if o == op && at < off+n && off < at+max(k, 1) {
			return injected(o, at, k)
		}
		return nil
	}
}

// FailRandomly fails each operation of the given kinds (all kinds when none are given) with
// probability p, drawing from r.
func FailRandomly(r *rand.Rand, p float64, ops ...Op) Injector {
	return func(o Op, off, k int64) error {
		hit := len(ops) == 0
		for _, op := range ops {
			hit = hit || op == o
		}
		if hit && r.Float64() < p {
			return injected(o, off, k)
		}
		return nil
	}
}
