package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/sealdisk/sealdisk/engine"
	"github.com/sealdisk/sealdisk/image"
	"github.com/sealdisk/sealdisk/internal/zeros"
	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/store"
)

// offlineASID is the key slot the offline tools load in their private engine; no VM is
// launched, so no ASID is taken from the PSP's pool.
const offlineASID psp.ASID = 1

// offlineDisk is a version-2 image opened through the engine for unseal and scrub, so that
// the offline tools read by the very rules a VM's disk does: the root record checked by the
// PSP (and its counter), a crashed image's committed journal recovered, metadata pages checked
// against the integrity tree, each sector against its entry. The engine writes only into an
// in-memory overlay (store.Overlay): the image file is never changed.
type offlineDisk struct {
	*engine.Disk
	eng *engine.Engine
	ov  *store.Overlay
}

// offlineRoots is the image's root keeper for the offline tools: records are checked and
// admitted as at an attach, but the counter never advances (nothing a guest flushed is
// committed here, so nothing may move the PSP's counter past the image on disk).
type offlineRoots struct{ psp.RootKeeper }

func (offlineRoots) Advance(counter uint64, _ [32]byte) error {
	return fmt.Errorf("BUG: an offline tool tried to advance the image's counter to %d", counter)
}

// openOffline attaches img to a private engine over an overlay; the attach chooses the root
// record (Origin) and recovers a crashed image's committed journal into the overlay.
func openOffline(img *image.Image, pspDir, keyFile string) (*offlineDisk, error) {
	p, key, err := offlineOpen(img, pspDir, keyFile)
	if err != nil {
		return nil, err
	}
	defer clear(key)
	roots, err := p.RootsFor(img.Cert)
	if err != nil {
		return nil, err
	}
	h := img.Header
	ov, err := store.NewOverlay(img.Store)
	if err != nil {
		return nil, err
	}
	eng := engine.New(engine.Options{Logger: slog.Default(), NoMap: true})
	err = eng.LoadKey(offlineASID, psp.Binding{Suite: h.Suite, Key: key, UUID: h.UUID, SectorSize: int(h.SectorSize), ReadOnly: h.ReadOnly, Roots: offlineRoots{roots}})
	if err == nil {
		var d *engine.Disk
		if d, err = eng.Attach(offlineASID, ov, h.ReadOnly); err == nil {
			return &offlineDisk{Disk: d, eng: eng, ov: ov}, nil
		}
	}
	eng.Close()
	ov.Close()
	return nil, err
}

func (o *offlineDisk) Close() error {
	err := o.Disk.Close()
	if cerr := o.eng.Close(); err == nil {
		err = cerr
	}
	o.ov.Close()
	return err
}

// offlineChunk is the unit the offline readers hand to each worker.
const offlineChunk = 1 << 20

// eachChunk runs fn on every allocated part of the disk, in chunks of at most offlineChunk
// bytes, on GOMAXPROCS workers; a chunk wholly unallocated is skipped (its metadata was still
// checked by the block status). fn errors stop the walk unless keepGoing.
func (o *offlineDisk) eachChunk(ctx context.Context, progress image.Progress, fn func(buf []byte, off int64) error) error {
	size := o.Size()
	n := (size + offlineChunk - 1) / offlineChunk
	var next, done atomic.Int64
	var once sync.Once
	var first error
	var wg sync.WaitGroup
	for w := 0; w < runtime.GOMAXPROCS(0); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, offlineChunk)
			for {
				i := next.Add(1) - 1
				if i >= n || ctx.Err() != nil {
					return
				}
				off := i * offlineChunk
				k := min(int64(offlineChunk), size-off)
				err := o.chunk(ctx, buf[:k], off, fn)
				if err != nil {
					once.Do(func() { first = err })
					next.Store(n)
					return
				}
				if progress != nil {
					progress(done.Add(k), size)
				}
			}
		}()
	}
	wg.Wait()
	if first == nil {
		first = ctx.Err()
	}
	return first
}

func (o *offlineDisk) chunk(ctx context.Context, buf []byte, off int64, fn func(buf []byte, off int64) error) error {
	for pos := off; pos < off+int64(len(buf)); {
		ext, err := o.BlockStatus(ctx, pos, off+int64(len(buf))-pos)
		if err != nil {
			// A metadata page that fails its check: the reads of its sectors fail by name.
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fn(buf[pos-off:], pos)
		}
		for _, e := range ext {
			if !e.Hole {
				if err := fn(buf[pos-off:pos-off+e.Length], pos); err != nil {
					return err
				}
			}
			pos += e.Length
		}
	}
	return nil
}

// unsealV2 writes the plaintext of a version-2 image into dst (sized to the virtual size;
// all-zero plaintext stays a hole). The first sector that fails stops it.
func unsealV2(ctx context.Context, img *image.Image, pspDir, keyFile string, dst *os.File, progress image.Progress) error {
	o, err := openOffline(img, pspDir, keyFile)
	if err != nil {
		return err
	}
	defer o.Close()
	if err := dst.Truncate(o.Size()); err != nil {
		return fmt.Errorf("failed to size output: %w", err)
	}
	err = o.eachChunk(ctx, progress, func(buf []byte, off int64) error {
		if err := o.ReadAt(ctx, buf, off); err != nil {
			return err
		}
		if zeros.All(buf) {
			return nil
		}
		if _, err := dst.WriteAt(buf, off); err != nil {
			return fmt.Errorf("failed to write output: %w", err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return dst.Sync()
}

// badSector is one sector scrub found bad.
type badSector struct {
	LBA   uint64 `json:"lba"`
	Error string `json:"error"`
}

// scrubSectors reads every allocated sector of o, reporting each one that fails instead of
// stopping at the first; it returns the bytes checked.
func (o *offlineDisk) scrubSectors(ctx context.Context, progress image.Progress, report func(badSector)) (int64, error) {
	ss := int64(o.SectorSize())
	var mu sync.Mutex
	var checked atomic.Int64
	err := o.eachChunk(ctx, progress, func(buf []byte, off int64) error {
		checked.Add(int64(len(buf)))
		if o.ReadAt(ctx, buf, off) == nil {
			return nil
		}
		for i := int64(0); i < int64(len(buf)); i += ss {
			if err := o.ReadAt(ctx, buf[i:i+ss], off+i); err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				mu.Lock()
				report(badSector{LBA: uint64((off + i) / ss), Error: err.Error()})
				mu.Unlock()
			}
		}
		return nil
	})
	return checked.Load(), err
}
