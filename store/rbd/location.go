// Package rbd is the Ceph RBD backing store: a sealed image kept as one RBD image in a pool,
// read and written through librbd (go-ceph, cgo), so that any host of the fleet whose chip the
// image is sealed to can serve it. Ceph replicates; sealdisk adds nothing to that.
//
// RBD is not a file, and the store hides the differences the engine would otherwise see
// (docs/RBD.md): a write past the end grows the image first (librbd clips it); a read at or
// past the end is io.EOF, a discard there does nothing (librbd says EINVAL); discard zeroes
// whatever its size (rbd_skip_partial_discard=false); librbd's cache is off, so a completed
// write is on the OSDs and Sync's flush is the barrier either way; and the image lock is RBD's
// exclusive lock, taken explicitly, so another client's writes fail instead of taking it over.
//
// The implementation needs cgo and librbd and is built with the tags rbd and pacific (the Ceph
// release go-ceph is compiled against). Without the rbd tag the package still parses
// locations, and opening one says the binary was built without RBD.
package rbd

import (
	"errors"
	"fmt"
	"strings"
)

// Prefix starts every RBD location: rbd:POOL/IMAGE.
const Prefix = "rbd:"

// Location names one RBD image.
type Location struct {
	Pool, Image string
}

// IsLocation reports whether s names an RBD image rather than a file.
func IsLocation(s string) bool { return strings.HasPrefix(s, Prefix) }

// ParseLocation parses rbd:POOL/IMAGE.
func ParseLocation(s string) (Location, error) {
	rest, ok := strings.CutPrefix(s, Prefix)
	if !ok {
		return Location{}, fmt.Errorf("image location %q is not rbd:POOL/IMAGE", s)
	}
	pool, img, ok := strings.Cut(rest, "/")
	switch {
	case !ok || pool == "" || img == "":
		return Location{}, fmt.Errorf("image location %q: want rbd:POOL/IMAGE", s)
	case strings.ContainsAny(img, "/@:") || strings.ContainsAny(pool, "@:"):
		return Location{}, fmt.Errorf("image location %q: pool and image names cannot contain '/', '@' or ':'", s)
	}
	return Location{Pool: pool, Image: img}, nil
}

func (l Location) String() string { return Prefix + l.Pool + "/" + l.Image }

// WithSuffix is the location of the image named like l's plus suffix, in the same pool (the
// .tmp an offline tool writes before renaming it into place).
func (l Location) WithSuffix(suffix string) Location { return Location{l.Pool, l.Image + suffix} }

// Config says how to reach the cluster. Only paths: the key lives in the keyring file, never
// on a command line or in a config value.
type Config struct {
	Conf    string // ceph.conf ("": librados's search: $CEPH_CONF, /etc/ceph/ceph.conf, ...)
	ID      string // cephx user without "client." ("": admin)
	Keyring string // keyring file ("": the one ceph.conf names)
}

// ErrNotBuilt is returned for an RBD location by a binary built without the rbd tag.
var ErrNotBuilt = errors.New("this sealdisk was built without Ceph RBD support (build with CGO_ENABLED=1 -tags rbd,pacific)")
