// Package locate opens an image store by its location as operators write it: a file path, or
// rbd:POOL/IMAGE for an image in a Ceph RBD pool (store/rbd). The offline tools and the daemon
// take every image location through it, so both kinds are accepted everywhere.
package locate

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/sealdisk/sealdisk/store"
	"github.com/sealdisk/sealdisk/store/rbd"
)

// IsRBD reports whether loc names an RBD image.
func IsRBD(loc string) bool { return rbd.IsLocation(loc) }

// Open opens an existing image store; a missing one is os.ErrNotExist.
func Open(loc string, readOnly bool, ceph rbd.Config) (store.Image, error) {
	if !IsRBD(loc) {
		return store.OpenFile(loc, readOnly)
	}
	l, err := rbd.ParseLocation(loc)
	if err != nil {
		return nil, err
	}
	return rbd.Open(ceph, l, readOnly)
}

// Create creates a new, empty image store; it fails if loc exists.
func Create(loc string, ceph rbd.Config) (store.Image, error) {
	if !IsRBD(loc) {
		return store.CreateFile(loc)
	}
	l, err := rbd.ParseLocation(loc)
	if err != nil {
		return nil, err
	}
	return rbd.Create(ceph, l)
}

// Exists reports whether loc exists.
func Exists(loc string, ceph rbd.Config) (bool, error) {
	if !IsRBD(loc) {
		_, err := os.Stat(loc)
		if errors.Is(err, os.ErrNotExist) {
			return false, nil
		}
		return err == nil, err
	}
	l, err := rbd.ParseLocation(loc)
	if err != nil {
		return false, err
	}
	return rbd.Exists(ceph, l)
}

// Remove deletes loc; a missing one is os.ErrNotExist.
func Remove(loc string, ceph rbd.Config) error {
	if !IsRBD(loc) {
		return os.Remove(loc)
	}
	l, err := rbd.ParseLocation(loc)
	if err != nil {
		return err
	}
	return rbd.Remove(ceph, l)
}

// Rename moves a complete image into place, durably: a file is renamed and its directory
// synced (replacing to); an RBD image is renamed within its pool (to must not exist).
func Rename(from, to string, ceph rbd.Config) error {
	if IsRBD(from) != IsRBD(to) {
		return fmt.Errorf("failed to rename %s to %s: not the same kind of store", from, to)
	}
	if !IsRBD(from) {
		if err := os.Rename(from, to); err != nil {
			return err
		}
		d, err := os.Open(filepath.Dir(to))
		if err != nil {
			return err
		}
		defer d.Close()
		return d.Sync()
	}
	f, err := rbd.ParseLocation(from)
	if err != nil {
		return err
	}
	t, err := rbd.ParseLocation(to)
	if err != nil {
		return err
	}
	return rbd.Rename(ceph, f, t)
}
