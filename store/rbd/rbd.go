//go:build rbd

package rbd

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"syscall"

	"github.com/ceph/go-ceph/rados"
	librbd "github.com/ceph/go-ceph/rbd"

	"github.com/sealdisk/sealdisk/store"
)

// Built reports whether this binary can open RBD images.
const Built = true

// maxSector is the largest sector size of a sealed image (FORMAT.md §2).
const maxSector = 4096

// Store is a store.Image over one RBD image, on a cluster connection of its own (closed with
// it). librbd's image handle is safe for concurrent I/O; mu only orders I/O against resizes.
type Store struct {
	loc      Location
	readOnly bool
	conn     *rados.Conn
	ioctx    *rados.IOContext
	img      *librbd.Image

	// mu guards size and the image's size in the cluster: I/O holds it shared, so that a
	// shrink never turns an in-range request into librbd's EINVAL; a resize holds it exclusive.
	mu   sync.RWMutex
	size int64

	// lockMu guards locked: whether this client took the exclusive lock (Lock(true)).
	lockMu sync.Mutex
	locked bool
}

var _ store.Image = (*Store)(nil)

// options every connection sets: discards zero whatever their size (librbd otherwise skips
// the parts of a discard not covering a whole 64 KiB chunk, keeping old data), and no librbd
// cache (the engine has its own; with it off a completed write is on the OSDs, and Sync's
// flush is the barrier either way). A connect that cannot reach a monitor fails in 30 s
// rather than librados's 300.
var options = [][2]string{
	{"rbd_skip_partial_discard", "false"},
	{"rbd_cache", "false"},
	{"client_mount_timeout", "30"},
	{"rados_mon_op_timeout", "30"},
}

// connect opens a cluster connection and an I/O context on pool.
func connect(cfg Config, pool string) (*rados.Conn, *rados.IOContext, error) {
	var conn *rados.Conn
	var err error
	if cfg.ID != "" {
		conn, err = rados.NewConnWithUser(cfg.ID)
	} else {
		conn, err = rados.NewConn()
	}
	if err != nil {
		return nil, nil, fmt.Errorf("failed to create a Ceph connection: %w", err)
	}
	if cfg.Conf != "" {
		if _, err := os.Stat(cfg.Conf); err != nil {
			return nil, nil, fmt.Errorf("failed to read ceph.conf: %w", err)
		}
		err = conn.ReadConfigFile(cfg.Conf)
	} else {
		err = conn.ReadDefaultConfigFile()
	}
	if err != nil {
		conn.Shutdown()
		return nil, nil, fmt.Errorf("failed to read ceph.conf %q: %w", cfg.Conf, err)
	}
	if cfg.Keyring != "" {
		if _, err := os.Stat(cfg.Keyring); err != nil {
			conn.Shutdown()
			return nil, nil, fmt.Errorf("failed to read the Ceph keyring: %w", err)
		}
		if err := conn.SetConfigOption("keyring", cfg.Keyring); err != nil {
			conn.Shutdown()
			return nil, nil, fmt.Errorf("failed to set the Ceph keyring: %w", err)
		}
	}
	for _, o := range options {
		if err := conn.SetConfigOption(o[0], o[1]); err != nil {
			conn.Shutdown()
			return nil, nil, fmt.Errorf("failed to set Ceph option %s: %w", o[0], err)
		}
	}
	if err := conn.Connect(); err != nil {
		conn.Shutdown()
		return nil, nil, fmt.Errorf("failed to connect to the Ceph cluster as client.%s: %w", orAdmin(cfg.ID), err)
	}
	ioctx, err := conn.OpenIOContext(pool)
	if err != nil {
		conn.Shutdown()
		return nil, nil, fmt.Errorf("failed to open pool %q: %w", pool, err)
	}
	return conn, ioctx, nil
}

func orAdmin(id string) string {
	if id == "" {
		return "admin"
	}
	return id
}

// Open opens an existing RBD image. A read-write open needs the exclusive-lock feature (the
// image lock); the image's default features include it.
func Open(cfg Config, loc Location, readOnly bool) (*Store, error) {
	conn, ioctx, err := connect(cfg, loc.Pool)
	if err != nil {
		return nil, fmt.Errorf("failed to open %s: %w", loc, err)
	}
	var img *librbd.Image
	if readOnly {
		img, err = librbd.OpenImageReadOnly(ioctx, loc.Image, librbd.NoSnapshot)
	} else {
		img, err = librbd.OpenImage(ioctx, loc.Image, librbd.NoSnapshot)
	}
	if err != nil {
		ioctx.Destroy()
		conn.Shutdown()
		if errors.Is(err, librbd.ErrNotFound) {
			return nil, fmt.Errorf("failed to open %s: %w", loc, os.ErrNotExist)
		}
		return nil, fmt.Errorf("failed to open %s: %w", loc, err)
	}
	s := &Store{loc: loc, readOnly: readOnly, conn: conn, ioctx: ioctx, img: img}
	if err := s.init(); err != nil {
		s.Close()
		return nil, fmt.Errorf("failed to open %s: %w", loc, err)
	}
	return s, nil
}

func (s *Store) init() error {
	size, err := s.img.GetSize()
	if err != nil {
		return err
	}
	s.size = int64(size)
	// The journal needs an aligned sector write to be atomic (FORMAT.md §6). RADOS applies a
	// write to one object atomically, so a sector must never straddle two objects: the stripe
	// unit (the object size unless fancy striping is on) must be a multiple of 4 KiB.
	unit, err := s.img.GetStripeUnit()
	if err != nil {
		return err
	}
	if unit%maxSector != 0 {
		return fmt.Errorf("the image's stripe unit is %d bytes, not a multiple of %d: a sector write could span two RADOS objects and tear in a crash (create it with the default striping)", unit, maxSector)
	}
	if s.readOnly {
		return nil
	}
	f, err := s.img.GetFeatures()
	if err != nil {
		return err
	}
	if f&librbd.FeatureExclusiveLock == 0 {
		return fmt.Errorf("the image lacks the exclusive-lock feature, which sealdisk takes as the image lock (rbd feature enable %s/%s exclusive-lock)", s.loc.Pool, s.loc.Image)
	}
	return nil
}

// Create makes a new, empty RBD image with librbd's default features (exclusive-lock among
// them) and opens it read-write; it fails if the image exists.
func Create(cfg Config, loc Location) (*Store, error) {
	conn, ioctx, err := connect(cfg, loc.Pool)
	if err != nil {
		return nil, fmt.Errorf("failed to create %s: %w", loc, err)
	}
	opts := librbd.NewRbdImageOptions()
	defer opts.Destroy()
	if err := opts.SetUint64(librbd.ImageOptionFeatures, librbd.FeatureLayering|librbd.FeatureExclusiveLock|librbd.FeatureObjectMap|librbd.FeatureFastDiff|librbd.FeatureDeepFlatten); err != nil {
		return nil, err
	}
	err = librbd.CreateImage(ioctx, loc.Image, 0, opts)
	ioctx.Destroy()
	conn.Shutdown()
	if errors.Is(err, librbd.ErrExist) {
		return nil, fmt.Errorf("failed to create %s: %w", loc, os.ErrExist)
	}
	if err != nil {
		return nil, fmt.Errorf("failed to create %s: %w", loc, err)
	}
	return Open(cfg, loc, false)
}

// Exists reports whether the image exists.
func Exists(cfg Config, loc Location) (bool, error) {
	s, err := Open(cfg, loc, true)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	s.Close()
	return true, nil
}

// Remove deletes the image (it must not be open anywhere).
func Remove(cfg Config, loc Location) error {
	conn, ioctx, err := connect(cfg, loc.Pool)
	if err != nil {
		return fmt.Errorf("failed to remove %s: %w", loc, err)
	}
	defer conn.Shutdown()
	defer ioctx.Destroy()
	if err := librbd.RemoveImage(ioctx, loc.Image); err != nil {
		if errors.Is(err, librbd.ErrNotFound) {
			err = os.ErrNotExist
		}
		return fmt.Errorf("failed to remove %s: %w", loc, err)
	}
	return nil
}

// Rename renames an image within its pool; it fails if to exists.
func Rename(cfg Config, from, to Location) error {
	if from.Pool != to.Pool {
		return fmt.Errorf("failed to rename %s to %s: RBD renames only within a pool", from, to)
	}
	conn, ioctx, err := connect(cfg, from.Pool)
	if err != nil {
		return fmt.Errorf("failed to rename %s: %w", from, err)
	}
	defer conn.Shutdown()
	defer ioctx.Destroy()
	if err := librbd.GetImage(ioctx, from.Image).Rename(to.Image); err != nil {
		if errors.Is(err, librbd.ErrExist) {
			err = os.ErrExist
		}
		return fmt.Errorf("failed to rename %s to %s: %w", from, to, err)
	}
	return nil
}

// Name is the image's location, rbd:POOL/IMAGE.
func (s *Store) Name() string { return s.loc.String() }

// Identity is the cluster's fsid, the pool's id and the image's id: a rename keeps it.
func (s *Store) Identity() (string, error) {
	fsid, err := s.conn.GetFSID()
	if err != nil {
		return "", fmt.Errorf("failed to read the cluster fsid: %w", err)
	}
	id, err := s.img.GetId()
	if err != nil {
		return "", fmt.Errorf("failed to read the id of %s: %w", s.loc, err)
	}
	return fmt.Sprintf("rbd:%s/%d/%s", fsid, s.ioctx.GetPoolID(), id), nil
}

// ReadAt reads like a file: a read at or past the end is io.EOF, one crossing it is short with
// io.EOF (librbd would fail it with EINVAL).
func (s *Store) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("failed to read %s at %d: %w", s.loc, off, syscall.EINVAL)
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	if off >= s.size {
		return 0, io.EOF
	}
	want := min(int64(len(p)), s.size-off)
	n, err := s.readFull(p[:want], off)
	if err == nil && n < len(p) {
		err = io.EOF
	}
	return n, err
}

func (s *Store) readFull(p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		n, err := s.img.ReadAt(p[done:], off+int64(done))
		done += n
		if err != nil && !(errors.Is(err, io.EOF) && n > 0) {
			if errors.Is(err, io.EOF) {
				return done, io.ErrUnexpectedEOF
			}
			return done, fmt.Errorf("failed to read %s [%d,+%d): %w", s.loc, off, len(p), err)
		}
	}
	return done, nil
}

// WriteAt writes like a file: a write past the end grows the image first (librbd would clip
// it).
func (s *Store) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("failed to write %s at %d: %w", s.loc, off, syscall.EINVAL)
	}
	if len(p) == 0 {
		return 0, nil
	}
	end := off + int64(len(p))
	s.mu.RLock()
	for end > s.size {
		s.mu.RUnlock()
		if err := s.grow(end); err != nil {
			return 0, err
		}
		s.mu.RLock()
	}
	defer s.mu.RUnlock()
	done := 0
	for done < len(p) {
		n, err := s.img.WriteAt(p[done:], off+int64(done))
		done += n
		if err != nil {
			return done, fmt.Errorf("failed to write %s [%d,+%d): %w", s.loc, off, len(p), err)
		}
		if n == 0 {
			return done, fmt.Errorf("failed to write %s [%d,+%d): %w", s.loc, off, len(p), io.ErrShortWrite)
		}
	}
	return done, nil
}

// grow resizes the image to at least end.
func (s *Store) grow(end int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if end <= s.size {
		return nil
	}
	return s.resizeLocked(end)
}

func (s *Store) resizeLocked(size int64) error {
	if err := s.img.Resize(uint64(size)); err != nil {
		return fmt.Errorf("failed to resize %s to %d: %w", s.loc, size, err)
	}
	s.size = size
	return nil
}

// Sync flushes librbd (rbd_flush): every completed write is on the OSDs when it returns.
func (s *Store) Sync() error {
	if err := s.img.Flush(); err != nil {
		return fmt.Errorf("failed to flush %s: %w", s.loc, err)
	}
	return nil
}

// Punch discards [off, off+n) within the image so it reads as zeros and frees whole objects;
// the part past the end is ignored, as a file's punch ignores it.
func (s *Store) Punch(off, n int64) error {
	if off < 0 || n < 0 {
		return fmt.Errorf("failed to punch %s [%d,+%d): %w", s.loc, off, n, syscall.EINVAL)
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	end := min(off+n, s.size)
	for off < end {
		// librbd's discard takes an int-sized length; keep each call well inside it.
		step := min(end-off, 1<<30)
		if _, err := s.img.Discard(uint64(off), uint64(step)); err != nil {
			return fmt.Errorf("failed to punch %s [%d,+%d): %w", s.loc, off, step, err)
		}
		off += step
	}
	return nil
}

// Truncate resizes the image; growth reads as zeros.
func (s *Store) Truncate(size int64) error {
	if size < 0 {
		return fmt.Errorf("failed to resize %s to %d: %w", s.loc, size, syscall.EINVAL)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if size == s.size {
		return nil
	}
	return s.resizeLocked(size)
}

// Size is the image's size as this client last set or read it.
func (s *Store) Size() (int64, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.size, nil
}

// Close releases the lock (if held), closes the image and the connection. No I/O may be in
// flight.
func (s *Store) Close() error {
	var err error
	if s.img != nil {
		s.lockMu.Lock()
		if s.locked {
			err = s.img.LockRelease()
			s.locked = false
		}
		s.lockMu.Unlock()
		if cerr := s.img.Close(); err == nil {
			err = cerr
		}
		s.img = nil
	}
	if s.ioctx != nil {
		s.ioctx.Destroy()
		s.ioctx = nil
	}
	if s.conn != nil {
		s.conn.Shutdown()
		s.conn = nil
	}
	if err != nil {
		return fmt.Errorf("failed to close %s: %w", s.loc, err)
	}
	return nil
}
