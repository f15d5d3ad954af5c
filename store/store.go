// Package store is the backing-store interface under a sealed image: the engine and the
// offline tools do all their image I/O through it, so tests can swap the file for a crashable
// or fault-injecting store. The file store is the default.
package store

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// Store is random-access storage for one sealed image file.
type Store interface {
	io.ReaderAt
	io.WriterAt
	// Sync makes every completed write durable (fdatasync).
	Sync() error
	// Punch deallocates [off, off+n) so it reads as zeros and takes no space; the size is
	// unchanged.
	Punch(off, n int64) error
	// Truncate sets the size; growth is a hole.
	Truncate(size int64) error
	Size() (int64, error)
	Close() error
}

// File is a Store over a regular file using pread/pwrite/fdatasync/fallocate.
type File struct {
	f *os.File
}

var _ Store = (*File)(nil)

// OpenFile opens an existing image file.
func OpenFile(path string, readOnly bool) (*File, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("failed to open image file: %w", err)
	}
	return &File{f: f}, nil
}

// CreateFile creates a new image file (mode 0600); it fails if the path exists.
func CreateFile(path string) (*File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("failed to create image file: %w", err)
	}
	return &File{f: f}, nil
}

// Name returns the file's path.
func (s *File) Name() string { return s.f.Name() }

// Fd returns the file descriptor, for callers that need SEEK_DATA/SEEK_HOLE.
func (s *File) Fd() uintptr { return s.f.Fd() }

func (s *File) ReadAt(p []byte, off int64) (int, error) { return s.f.ReadAt(p, off) }

func (s *File) WriteAt(p []byte, off int64) (int, error) { return s.f.WriteAt(p, off) }

func (s *File) Sync() error {
	if err := unix.Fdatasync(int(s.f.Fd())); err != nil {
		return fmt.Errorf("failed to fdatasync %s: %w", s.f.Name(), err)
	}
	return nil
}

// ErrPunchUnsupported is returned when the filesystem cannot punch holes; callers fall back
// to writing zeros where that is acceptable.
var ErrPunchUnsupported = errors.New("filesystem does not support punching holes")

func (s *File) Punch(off, n int64) error {
	if n == 0 {
		return nil
	}
	err := unix.Fallocate(int(s.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
		return fmt.Errorf("failed to punch [%d,+%d) in %s: %w", off, n, s.f.Name(), ErrPunchUnsupported)
	}
	if err != nil {
		return fmt.Errorf("failed to punch [%d,+%d) in %s: %w", off, n, s.f.Name(), err)
	}
	return nil
}

func (s *File) Truncate(size int64) error {
	if err := s.f.Truncate(size); err != nil {
		return fmt.Errorf("failed to set size of %s: %w", s.f.Name(), err)
	}
	return nil
}

func (s *File) Size() (int64, error) {
	fi, err := s.f.Stat()
	if err != nil {
		return 0, fmt.Errorf("failed to stat %s: %w", s.f.Name(), err)
	}
	return fi.Size(), nil
}

func (s *File) Close() error { return s.f.Close() }
