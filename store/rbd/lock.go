//go:build rbd

package rbd

import (
	"errors"
	"fmt"
	"strings"
	"syscall"

	librbd "github.com/ceph/go-ceph/rbd"

	"github.com/sealdisk/sealdisk/store"
)

// Lock takes the image lock without waiting, as store.File.Lock does, on RBD's terms:
//
//   - exclusive takes RBD's exclusive lock explicitly (rbd_lock_acquire). Taken that way librbd
//     never hands it over: another client's request for it is refused and its writes fail
//     (EROFS), whoever it is — another sealdisk, qemu, rbd. If the holder dies without
//     releasing it (kill -9, a lost host), the lock is broken once the OSDs drop the dead
//     client's watch (osd_client_watch_timeout, 30 s by default), and the dead client is
//     blocklisted so it cannot write again if it was only cut off.
//   - shared (readers) holds nothing in the cluster — RBD has no shared managed lock — so it
//     only refuses while a writer holds the exclusive lock; a writer arriving after it is not
//     stopped. docs/OPERATOR.md says what that means for unseal and scrub.
//
// A conflict is store.ErrLocked naming the holder. Locking again changes the kind.
func (s *Store) Lock(exclusive bool) error {
	s.lockMu.Lock()
	defer s.lockMu.Unlock()
	if !exclusive {
		if s.locked {
			if err := s.img.LockRelease(); err != nil {
				return fmt.Errorf("failed to release the exclusive lock of %s: %w", s.loc, err)
			}
			s.locked = false
		}
		if who := s.holder(); who != "" {
			return fmt.Errorf("failed to lock %s read-only (shared): %w: %s", s.loc, store.ErrLocked, who)
		}
		return nil
	}
	if s.readOnly {
		return fmt.Errorf("failed to lock %s read-write (exclusive): it is open read-only", s.loc)
	}
	if s.locked {
		return nil
	}
	err := s.img.LockAcquire(librbd.LockModeExclusive)
	if err == nil {
		s.locked = true
		return nil
	}
	if errno(err) == syscall.EROFS || errno(err) == syscall.EBUSY || errno(err) == syscall.EAGAIN {
		who := s.holder()
		if who == "" {
			who = "another client holds it (released since)"
		}
		return fmt.Errorf("failed to lock %s read-write (exclusive): %w: %s", s.loc, store.ErrLocked, who)
	}
	return fmt.Errorf("failed to lock %s read-write (exclusive): %w", s.loc, err)
}

// holder describes the exclusive lock's holder, "" when no client holds it.
func (s *Store) holder() string {
	// rbd_lock_get_owners needs the header watch a read-only open does not set up; the
	// managed lock is a cls lock on the header object, which rbd_list_lockers lists for both.
	_, lockers, err := s.img.ListLockers()
	if err != nil || len(lockers) == 0 {
		return ""
	}
	// A holder that died (kill -9, a lost host) keeps its cls lock until the next writer
	// breaks it; once the OSD has dropped its watch it holds nothing, and readers go ahead.
	alive := map[string]bool{}
	if ws, err := s.img.ListWatchers(); err == nil {
		for _, w := range ws {
			alive[w.Addr] = true
		}
	}
	var who []string
	for _, l := range lockers {
		if alive[l.Addr] {
			who = append(who, l.Client+" at "+l.Addr)
		}
	}
	if who == nil {
		return ""
	}
	desc := "RBD exclusive lock held by " + strings.Join(who, ", ")
	return desc + " — a sealdisk serve with it attached, or an offline tool writing it"
}

// Unlock releases the exclusive lock; Close does too.
func (s *Store) Unlock() error {
	s.lockMu.Lock()
	defer s.lockMu.Unlock()
	if !s.locked {
		return nil
	}
	if err := s.img.LockRelease(); err != nil {
		return fmt.Errorf("failed to unlock %s: %w", s.loc, err)
	}
	s.locked = false
	return nil
}

// errno is the Ceph error's errno (0 for other errors).
func errno(err error) syscall.Errno {
	var ce interface{ ErrorCode() int }
	if errors.As(err, &ce) {
		return syscall.Errno(-ce.ErrorCode())
	}
	return 0
}
