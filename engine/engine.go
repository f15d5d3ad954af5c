// Package engine is the disk controller: N shards, each owning a stripe of every attached
// disk's LBA space, with a bounded submission ring, a coprocessor worker that decrypts and
// encrypts through package sector, and a completion ring whose handler wakes the submitter
// (the "interrupt"). Key slots are indexed by ASID and loaded only through psp.KeyBinder.
// A bounded plaintext write-back cache keeps hot sectors; a metadata journal (FORMAT.md §6)
// makes every in-place update crash-consistent. docs/ENGINE.md describes the design.
package engine

import (
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sealdisk/sealdisk/dma"
	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/store"
)

// Options configure an Engine.
type Options struct {
	Shards     int   // 0 = one per core
	CacheBytes int64 // plaintext write-back cache per attached disk; 0 = 64 MiB
	// DirtyBytes bounds the cache's dirty data per disk: past it, dirty lines are written back
	// (sealed and appended to the journal, no sync) while the guest goes on, so a flush never
	// has more than this to seal. 0 = an eighth of CacheBytes.
	DirtyBytes    int64
	IdleFlush     time.Duration // write back dirty sectors idle this long; 0 = 5 s
	RingSize      int           // descriptors per submission ring; 0 = 256
	StripeSectors uint64        // sectors per stripe (multiple of 64); 0 = 256
	MetaPages     int           // cached 4 KiB metadata pages per disk and shard; 0 = 2048 (8 MiB)
	Logger        *slog.Logger
	// MemoryEncryption turns on the simulated memory controller (dma.MemCrypt): every VM gets
	// a VEK at LoadKey and DMA payloads cross guest memory encrypted under it. Off by default:
	// on a host service it only costs: the plaintext crosses NBD or FUSE to the host anyway
	// (docs/THREAT-MODEL.md).
	MemoryEncryption bool
	// NoMap keeps file stores on pread. By default Attach maps a store that can be mapped
	// (store.File.SetMapped, shared and read-only): a read of sectors is then a memory copy
	// instead of a system call, which costs as much as the AES on that path (BENCHMARKS.md).
	// Writes are pwrite either way.
	NoMap bool

	// MaxChangedPages bounds the metadata pages changed since the last checkpoint (held in
	// memory until it writes them in place), and so the tree nodes changed with them; more start
	// a checkpoint. 0 = 8192 (32 MiB of pages, at most as much again of nodes).
	MaxChangedPages int
	// TreeNodes bounds the integrity tree's clean cached nodes per disk; 0 = 1024 (4 MiB).
	TreeNodes int
	// PlacedBytes, when positive, is the shortest run of consecutive sectors that is written
	// in place only, journalling just their entries (placed blocks, FORMAT.md §6.2), instead
	// of being written to the journal and then in place: a guest write that long (whole
	// sectors, no FUA), sealed from its buffer without entering the cache (write.go), and a
	// run that long written back under the cache's pressure. 0 = off. The service sets 64 KiB
	// (config engine.placed_run): on ext4, 1 MiB writes ran about half as fast again with
	// placed write-backs and a fifth more sealed from the buffer, random 4 KiB writes as
	// before (BENCHMARKS.md).
	PlacedBytes int64

	// journalBytes, when set, uses only that much of the journal region (tests: the journal
	// fills, so checkpoints from a full journal are exercised).
	journalBytes uint64
}

func (o *Options) fill() {
	if o.Shards <= 0 {
		o.Shards = runtime.GOMAXPROCS(0)
	}
	if o.CacheBytes <= 0 {
		o.CacheBytes = 64 << 20
	}
	if o.DirtyBytes <= 0 || o.DirtyBytes > o.CacheBytes {
		o.DirtyBytes = o.CacheBytes / 8
	}
	if o.IdleFlush <= 0 {
		o.IdleFlush = 5 * time.Second
	}
	if o.RingSize <= 0 {
		o.RingSize = 256
	}
	if o.StripeSectors == 0 {
		o.StripeSectors = 256
	}
	if o.StripeSectors%64 != 0 {
		panic("BUG: engine: stripe must be a multiple of 64 sectors (one metadata page)")
	}
	if o.MetaPages <= 0 {
		o.MetaPages = 2048
	}
	if o.MaxChangedPages <= 0 {
		o.MaxChangedPages = 8192
	}
	if o.TreeNodes <= 0 {
		o.TreeNodes = 1024
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
}

// Stats are the engine's counters (for metrics).
type Stats struct {
	Reads, Writes, Flushes, Trims   atomic.Uint64
	BytesRead, BytesWritten         atomic.Uint64
	CacheHits, CacheMisses          atomic.Uint64
	Writebacks, JournalSyncs        atomic.Uint64
	AuthFailures, PermissionDenials atomic.Uint64
	SyncFailures                    atomic.Uint64 // failed syncs of an image (Disk.syncMu)
	Placed                          atomic.Uint64 // sectors written back in place only (placed blocks)
	Direct                          atomic.Uint64 // of those, sectors sealed from the guest's buffer, never cached (write.go)
}

// Engine is the disk controller. It is safe for concurrent use.
type Engine struct {
	opts   Options
	shards []*shard
	Stats  Stats

	slotsMu sync.RWMutex // guards slots
	slots   map[psp.ASID]*keySlot

	disksMu sync.Mutex // guards disks, and serialises attach/detach
	disks   map[psp.ASID]*Disk
	// live is the attached disks, read lock-free by idle shard workers.
	live atomic.Pointer[[]*Disk]

	closed atomic.Bool

	// mem is the memory controller when Options.MemoryEncryption is set (else nil); it has
	// its own lock.
	mem *dma.MemCrypt
	// observe, when set (tests only, before any I/O), sees each descriptor as the
	// coprocessor receives it.
	observe func(*dma.Descriptor)
}

var _ psp.KeyBinder = (*Engine)(nil)

// New starts an engine's shard workers and completion handlers.
func New(opts Options) *Engine {
	opts.fill()
	e := &Engine{opts: opts, slots: map[psp.ASID]*keySlot{}, disks: map[psp.ASID]*Disk{}}
	e.live.Store(&[]*Disk{})
	if opts.MemoryEncryption {
		e.mem = dma.NewMemCrypt()
	}
	for i := 0; i < opts.Shards; i++ {
		s := &shard{e: e, id: i, sq: dma.NewRing(opts.RingSize), cq: dma.NewRing(opts.RingSize)}
		e.shards = append(e.shards, s)
		go s.run()
		go dma.Interrupt(s.cq, 64)
	}
	return e
}

// Shards is the number of shards.
func (e *Engine) Shards() int { return len(e.shards) }

// RingOccupancy is the number of queued descriptors per shard.
func (e *Engine) RingOccupancy() []int {
	out := make([]int, len(e.shards))
	for i, s := range e.shards {
		out[i] = s.sq.Len()
	}
	return out
}

// Attach opens the image in st for the VM whose key is loaded at asid: it reads the header,
// checks that the key slot is for this image, recovers the journal, and returns the disk.
// readOnly attaches a writable image read-only (a read-only image is always read-only).
func (e *Engine) Attach(asid psp.ASID, st store.Store, readOnly bool) (*Disk, error) {
	if e.closed.Load() {
		return nil, ErrDetached
	}
	h, hs, err := format.ReadHeader(st)
	if err != nil {
		return nil, fmt.Errorf("failed to attach: %w", err)
	}
	if hs.Copy != 0 {
		e.opts.Logger.Warn("primary header invalid; using backup", "error", hs.PrimaryErr)
	}
	ks := e.slot(uint32(asid))
	if ks == nil {
		return nil, fmt.Errorf("failed to attach: %w (ASID %d)", ErrPermission, asid)
	}
	if ks.b.UUID != h.UUID || ks.b.Suite != h.Suite || ks.b.SectorSize != int(h.SectorSize) {
		return nil, fmt.Errorf("failed to attach: %w: the key loaded at ASID %d is for another image", ErrPermission, asid)
	}
	e.disksMu.Lock()
	defer e.disksMu.Unlock()
	if e.disks[asid] != nil {
		return nil, fmt.Errorf("failed to attach: ASID %d already has a disk", asid)
	}
	ro := readOnly || ks.b.ReadOnly || h.ReadOnly
	if dc, ok := st.(interface{ DropCache() error }); ok && !ro {
		// Before the mapping, which would keep the pages it maps: a writable image's clean
		// pages may be large folios that make every one-sector write in place cost a walk of
		// the folio (store.File.DropCache).
		if err := dc.DropCache(); err != nil {
			e.opts.Logger.Info("image's cached pages kept", "asid", asid, "error", err)
		}
	}
	if m, ok := st.(interface {
		SetMapped(bool) error
		Mapped() int64
	}); ok && !e.opts.NoMap {
		if err := m.SetMapped(true); err != nil {
			return nil, fmt.Errorf("failed to attach: %w", err)
		}
		if m.Mapped() == 0 {
			// Larger than 4 TiB, or mmap refused (filesystem, address-space limit).
			e.opts.Logger.Info("image not mapped; reads use pread", "asid", asid)
		}
	}
	d, err := newDisk(e, asid, st, h, ks.cipher, ks.b.Roots, ro)
	if err != nil {
		return nil, fmt.Errorf("failed to attach: %w", err)
	}
	e.disks[asid] = d
	e.publish()
	return d, nil
}

// publish refreshes the lock-free list of attached disks. Caller holds disksMu.
func (e *Engine) publish() {
	l := make([]*Disk, 0, len(e.disks))
	for _, d := range e.disks {
		l = append(l, d)
	}
	e.live.Store(&l)
}

func (e *Engine) forget(d *Disk) {
	e.disksMu.Lock()
	if e.disks[d.asid] == d {
		delete(e.disks, d.asid)
		e.publish()
	}
	e.disksMu.Unlock()
}

// Close detaches every disk (writing back dirty data), zeroises every key slot and stops the
// workers.
func (e *Engine) Close() error {
	if e.closed.Swap(true) {
		return nil
	}
	e.disksMu.Lock()
	var ds []*Disk
	for _, d := range e.disks {
		ds = append(ds, d)
	}
	e.disksMu.Unlock()
	var errs []error
	for _, d := range ds {
		errs = append(errs, d.Close())
	}
	e.slotsMu.Lock()
	for a, s := range e.slots {
		s.cipher.Destroy()
		delete(e.slots, a)
		if e.mem != nil {
			e.mem.Clear(uint32(a))
		}
	}
	e.slotsMu.Unlock()
	for _, s := range e.shards {
		s.sq.Close()
	}
	return errors.Join(errs...)
}
