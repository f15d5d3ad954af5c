package store

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// ErrLocked is the refusal of a lock another holder keeps: an image attached read-write has one
// owner. Callers branch on it with errors.Is; the wrapping error says who holds it, where known.
var ErrLocked = errors.New("image is locked by another user")

// FileID names a file whatever path reaches it: two paths with the same FileID are one image.
type FileID struct{ Dev, Ino uint64 }

func (id FileID) String() string { return fmt.Sprintf("%d:%d", id.Dev, id.Ino) }

// ID is the file's device and inode.
func (s *File) ID() (FileID, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(s.f.Fd()), &st); err != nil {
		return FileID{}, fmt.Errorf("failed to stat %s: %w", s.f.Name(), err)
	}
	return FileID{Dev: uint64(st.Dev), Ino: st.Ino}, nil
}

// Lock takes an open-file-description lock on the whole file without waiting: exclusive for a
// writer (the file must be open read-write), shared for readers, so one writer or any number
// of readers hold an image at a time. The lock belongs to this File's open file description,
// not to the process: a second OpenFile of the same inode — by any path, in this process or
// another — conflicts with it, and Close (or the process's exit) releases it. The lock is
// advisory: it binds the daemon and the offline tools, which all take it, not other programs.
// A conflict is ErrLocked, saying whether the holder reads or writes. Locking again changes the
// lock's kind in place.
func (s *File) Lock(exclusive bool) error {
	fl := wholeFile(exclusive)
	err := unix.FcntlFlock(s.f.Fd(), unix.F_OFD_SETLK, &fl)
	if err == nil {
		return nil
	}
	want := "read-only (shared)"
	if exclusive {
		want = "read-write (exclusive)"
	}
	if !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EACCES) {
		return fmt.Errorf("failed to lock %s %s: %w", s.f.Name(), want, err)
	}
	return fmt.Errorf("failed to lock %s %s: %w: %s", s.f.Name(), want, ErrLocked, s.holder(exclusive))
}

// holder describes the lock that refused a Lock(exclusive), for the error.
func (s *File) holder(exclusive bool) string {
	fl := wholeFile(exclusive)
	if err := unix.FcntlFlock(s.f.Fd(), unix.F_OFD_GETLK, &fl); err != nil || fl.Type == unix.F_UNLCK {
		return "another open of the file holds it (it was released since)"
	}
	if fl.Type == unix.F_WRLCK {
		return "another open of the file holds it read-write (a sealdisk serve with it attached, or an offline tool writing it)"
	}
	return "another open of the file holds it read-only (a read-only attach or an offline tool reading it)"
}

// Unlock releases the lock; Close does too.
func (s *File) Unlock() error {
	fl := unix.Flock_t{Type: unix.F_UNLCK, Whence: 0}
	if err := unix.FcntlFlock(s.f.Fd(), unix.F_OFD_SETLK, &fl); err != nil {
		return fmt.Errorf("failed to unlock %s: %w", s.f.Name(), err)
	}
	return nil
}

// wholeFile is a lock request for every byte of the file, now and after it grows (Len 0).
// OFD locks need Pid 0.
func wholeFile(exclusive bool) unix.Flock_t {
	t := int16(unix.F_RDLCK)
	if exclusive {
		t = unix.F_WRLCK
	}
	return unix.Flock_t{Type: t, Whence: 0, Start: 0, Len: 0}
}

// OpenLocked opens an existing image file as OpenFile does and locks it: exclusive when
// read-write, shared when read-only. Close releases the lock. An offline tool that must not
// run beside a server holding the image (or hand a file to code that opens it itself) holds
// one for as long as it works on the image.
func OpenLocked(path string, readOnly bool) (*File, error) {
	f, err := OpenFile(path, readOnly)
	if err != nil {
		return nil, err
	}
	if err := f.Lock(!readOnly); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}
