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

// File is a Store over a regular file: pread/pwrite/fdatasync/fallocate. With SetMapped(true)
// reads inside the file's size are memory copies from a shared read-only mapping of the file
// instead of preads (mmap.go); the engine maps the stores it attaches.
type File struct {
	f *os.File
	mapping
}

var _ Store = (*File)(nil)

// OpenFile opens an existing image file, unmapped.
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

// CreateFile creates a new image file (mode 0600), unmapped; it fails if the path exists.
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

func (s *File) ReadAt(p []byte, off int64) (int, error) {
	if n, ok, err := s.readMapped(p, off, s.f); ok {
		return n, err
	}
	return s.f.ReadAt(p, off)
}

func (s *File) WriteAt(p []byte, off int64) (int, error) { return s.f.WriteAt(p, off) }

// ReadAhead asks the kernel to read [off, off+n) into the page cache in the background
// (MADV_WILLNEED on the mapping, unless it records the range as in memory already;
// POSIX_FADV_WILLNEED without one): a hint from a caller about to read the range in small
// pieces, one at a time — the engine's metadata pages — so that they cost one I/O, not one each.
func (s *File) ReadAhead(off, n int64) {
	if !s.readAheadMapped(off, n) {
		_ = unix.Fadvise(int(s.f.Fd()), off, n, unix.FADV_WILLNEED) // advice: a failure only costs speed
	}
}

// Sync makes completed writes durable (fdatasync).
func (s *File) Sync() error {
	if err := unix.Fdatasync(int(s.f.Fd())); err != nil {
		return fmt.Errorf("failed to fdatasync %s: %w", s.f.Name(), err)
	}
	return nil
}

// DropCache asks the kernel to drop the file's clean cached pages (posix_fadvise
// POSIX_FADV_DONTNEED over the whole file); dirty pages stay. Pages that a writer such as
// `seal` or `cp` left behind are large folios, and a later write of one sector into a large
// folio, and the sync that writes it back, walk every block of the folio (BENCHMARKS.md,
// "large folios"): the engine drops them at a read-write attach so that the page cache is
// refilled at the sizes of its own I/O. Advisory: the file's contents never change.
func (s *File) DropCache() error {
	if err := unix.Fadvise(int(s.f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		return fmt.Errorf("failed to drop the cached pages of %s: %w", s.f.Name(), err)
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

// Truncate sets the size; a mapped file is mapped again at its new size.
func (s *File) Truncate(size int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.unmapLocked()
	if err := s.f.Truncate(size); err != nil {
		return fmt.Errorf("failed to set size of %s: %w", s.f.Name(), err)
	}
	return s.mapLocked(s.f)
}

func (s *File) Size() (int64, error) {
	fi, err := s.f.Stat()
	if err != nil {
		return 0, fmt.Errorf("failed to stat %s: %w", s.f.Name(), err)
	}
	return fi.Size(), nil
}

// Close unmaps and closes the file. No read or write may be in flight.
func (s *File) Close() error {
	s.mu.Lock()
	s.unmapLocked()
	s.closed = true
	s.mu.Unlock()
	return s.f.Close()
}

// SetMapped turns the mapping on or off (off at open). On, the file is mapped at its current
// size and again after each Truncate; reads that lie inside the mapping are memory copies. A
// file that cannot be mapped (not regular, empty, larger than 4 TiB, or mmap refused by its
// filesystem or an address-space limit) keeps pread. Off, every read is a pread: for
// filesystems whose mmap semantics differ from their read/write ones, or to keep image pages
// out of the process's resident set (OPERATOR.md). It waits for copies in flight.
func (s *File) SetMapped(on bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.on = on
	s.unmapLocked()
	return s.mapLocked(s.f)
}

// Mapped reports how many bytes of the file are mapped (0: none; reads use pread).
func (s *File) Mapped() int64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return int64(len(s.m))
}
