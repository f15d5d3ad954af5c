package store

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Image is the store of one sealed image as the offline tools and the daemon hold it: a Store
// with a name, an identity, the image lock and a map of its allocated ranges. *File is one; the
// RBD store (store/rbd) is the other.
type Image interface {
	Store
	// Name is where the image is, as the operator wrote it: a path or rbd:POOL/IMAGE.
	Name() string
	// Identity names the image whatever name reaches it: two stores with one Identity are one
	// image (a file's device and inode; an RBD image's cluster, pool and image ids).
	Identity() (string, error)
	// Lock takes the image lock without waiting, exclusive for a writer and shared for readers;
	// a conflict is ErrLocked. Close releases it.
	Lock(exclusive bool) error
	Unlock() error
	// Extents lists the allocated ranges within [from, to), in order; a store that cannot tell
	// reports the whole range.
	Extents(from, to int64) ([][2]int64, error)
}

var _ Image = (*File)(nil)

// Identity is the file's device and inode.
func (s *File) Identity() (string, error) {
	id, err := s.ID()
	if err != nil {
		return "", err
	}
	return "file:" + id.String(), nil
}

// Extents lists the file's data ranges within [from, to) with SEEK_DATA/SEEK_HOLE.
func (s *File) Extents(from, to int64) ([][2]int64, error) {
	ext, err := Extents(int(s.f.Fd()), from, to)
	if err != nil {
		return nil, fmt.Errorf("failed to map %s: %w", s.f.Name(), err)
	}
	return ext, nil
}

// Extents lists the data ranges of the open file fd within [from, to), so that a mostly-sparse
// file is walked in time proportional to its data; on a filesystem without SEEK_DATA the whole
// range is data.
func Extents(fd int, from, to int64) ([][2]int64, error) {
	var out [][2]int64
	for off := from; off < to; {
		d, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
			return [][2]int64{{off, to}}, nil
		}
		if err != nil {
			return nil, fmt.Errorf("failed to find data: %w", err)
		}
		if d >= to {
			break
		}
		hole, err := unix.Seek(fd, d, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("failed to find hole: %w", err)
		}
		out = append(out, [2]int64{d, min(hole, to)})
		off = hole
	}
	return out, nil
}
