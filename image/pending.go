package image

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/store"
	"github.com/sealdisk/sealdisk/store/locate"
	"github.com/sealdisk/sealdisk/store/rbd"
)

// The tools that make a file (create, seal, upgrade, unseal) write it under the name OUT.tmp
// and rename it to OUT when it is complete, so a failed or interrupted run neither leaves a
// partial OUT nor destroys an existing one before the new one is whole.

// Pending is a new sealed image being written as OUT.tmp (a file, or the RBD image OUT's name
// plus .tmp), held under an exclusive lock until Finish.
type Pending struct {
	*Image
	out, tmp string
	ceph     rbd.Config
}

// CreatePending creates OUT.tmp with header h. A leftover OUT.tmp of a run that crashed is
// replaced; one another run is still writing (it holds the lock) is refused.
func CreatePending(out string, h *format.Header, ceph rbd.Config) (*Pending, error) {
	tmp := out + ".tmp"
	if err := claimTemp(out, tmp, ceph); err != nil {
		return nil, err
	}
	st, err := locate.Create(tmp, ceph)
	if err != nil {
		return nil, err
	}
	img, err := CreateStore(st, h)
	if err != nil {
		locate.Remove(tmp, ceph)
		return nil, err
	}
	if err := img.Store.Lock(true); err != nil {
		img.Close()
		return nil, fmt.Errorf("another tool is writing %s: %w", out, err)
	}
	return &Pending{Image: img, out: out, tmp: tmp, ceph: ceph}, nil
}

// Finish ends the output. With err nil it syncs and closes the image and renames it to OUT
// durably (a file's directory is synced too); otherwise, or when that fails, it removes
// OUT.tmp. It returns the first error.
func (o *Pending) Finish(err error) error {
	if err == nil {
		err = o.Store.Sync()
	}
	if cerr := o.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = locate.Rename(o.tmp, o.out, o.ceph)
	}
	if err != nil {
		locate.Remove(o.tmp, o.ceph)
		return err
	}
	return nil
}

// claimTemp makes tmp free for a new image: a leftover is removed, one under lock refused.
func claimTemp(out, tmp string, ceph rbd.Config) error {
	f, err := locate.Open(tmp, false, ceph)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	err = f.Lock(true)
	f.Close()
	if errors.Is(err, store.ErrLocked) {
		return fmt.Errorf("another seal or create is writing %s (its %s is locked): %w", out, tmp, err)
	}
	if err != nil {
		return err
	}
	if err := locate.Remove(tmp, ceph); err != nil {
		return fmt.Errorf("failed to remove the leftover %s: %w", tmp, err)
	}
	return nil
}

// PendingRaw is a raw image file being written as OUT.tmp (mode 0600: it holds plaintext).
type PendingRaw struct {
	*os.File
	out, tmp string
}

// CreatePendingRaw creates OUT.tmp, replacing a leftover one.
func CreatePendingRaw(out string) (*PendingRaw, error) {
	tmp := out + ".tmp"
	os.Remove(tmp)
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("failed to create output: %w", err)
	}
	return &PendingRaw{File: f, out: out, tmp: tmp}, nil
}

// Finish ends the output as Pending.Finish does: synced, closed and renamed to OUT with its
// directory synced when err is nil and every step succeeds, else removed.
func (o *PendingRaw) Finish(err error) error {
	if err == nil {
		err = o.Sync()
	}
	if cerr := o.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(o.tmp, o.out)
	}
	if err == nil {
		err = syncDir(filepath.Dir(o.out))
	}
	if err != nil {
		os.Remove(o.tmp)
		return err
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
