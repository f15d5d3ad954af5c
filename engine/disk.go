package engine

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/sealdisk/sealdisk/dma"
	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/sector"
	"github.com/sealdisk/sealdisk/store"
	"github.com/sealdisk/sealdisk/tree"
)

// MaxRequest is the largest single request (bytes).
const MaxRequest = 32 << 20

// maxStatusSectors bounds one BlockStatus answer (the caller asks again for the rest).
const maxStatusSectors = 1 << 16

// Disk is one attached VM disk: the BlockDevice the frontends use.
type Disk struct {
	e        *Engine
	asid     psp.ASID
	st       store.Store
	h        *format.Header
	c        *sector.Cipher
	sess     *sector.Session
	ss       int64
	sectors  uint64
	readOnly bool
	parts    []*part // parts[i] is touched only by shard i's worker
	roots    psp.RootKeeper
	jr       *journal
	tree     *tree.Tree // nil: version 1, or no tree flag
	meta     dirtyPages // pages changed since the last checkpoint
	origin   Origin     // recover.go

	// ckpt orders appends against commits: a write-back or zeroing holds it shared from its
	// journal append until its entries are in the pages and the tree; a commit's cut and a
	// checkpoint hold it exclusively. Whoever writes committed appends in place outside that
	// (the part, or a checkpoint before it stops appends) holds it shared, having claimed each
	// append (pendingWrite.tryApply), so the checkpoint's exclusive phase finds none half-written.
	ckpt sync.RWMutex

	commitMu  sync.Mutex    // serialises commits and checkpoints; guards cs
	cs        commitState   // commit.go
	committed atomic.Uint64 // LSN up to which the journal is committed (read by the parts)
	settled   atomic.Uint64 // LSN before which every placed append is durable in place (settle.go)
	placedRun int           // sectors in a run that a pressured write-back places (Options.PlacedBytes)
	broken    atomic.Pointer[error]
	syncs     syncer // the image's syncs and their failures (syncs.go)

	// state admits requests without a lock: its low bits count the requests between
	// admission and completion, and stateClosed is set once Close begins, after which none is
	// admitted. A completion that leaves stateClosed alone (the last one after Close began)
	// signals drained, on which Close waits.
	state   atomic.Int64
	drained chan struct{} // capacity 1

	// kick asks the background committer (commit.go) for a commit: the cache's pressure
	// commits without stopping the shard that felt it. committerDone closes when it has stopped.
	kick          chan struct{} // capacity 1
	ckptWanted    atomic.Uint64 // 1 + the epoch the kick asks a checkpoint of; 0: none
	committerDone chan struct{}
}

const stateClosed = 1 << 62

var _ BlockDevice = (*Disk)(nil)

func newDisk(e *Engine, asid psp.ASID, st store.Store, h *format.Header, c *sector.Cipher, roots psp.RootKeeper, ro bool) (*Disk, error) {
	d := &Disk{e: e, asid: asid, st: st, h: h, c: c, ss: int64(h.SectorSize), sectors: h.Sectors(), readOnly: ro,
		roots: roots, drained: make(chan struct{}, 1)}
	d.syncs = syncer{st: st, stats: &e.Stats, log: e.opts.Logger, asid: asid}
	if pb := e.opts.PlacedBytes; pb > 0 {
		d.placedRun = int(max(pb/d.ss, 1))
	}
	d.jr = &journal{d: d, size: h.JournalSize}
	if l := e.opts.journalBytes; l > 0 && l < d.jr.size {
		d.jr.size = l
	}
	switch {
	case h.Version < format.HeaderVersion2 && !ro:
		return nil, fmt.Errorf("%w: a version-%d image attaches read-only; `sealdisk upgrade` makes a version-2 image of it", ErrReadOnly, h.Version)
	case h.Version < format.HeaderVersion2:
		if n, err := liveV1Journal(st, h); err != nil || n > 0 {
			return nil, fmt.Errorf("the version-1 image's journal holds %d records (%v): unseal it or upgrade it, which replay them", n, err)
		}
	case roots == nil:
		return nil, fmt.Errorf("%w: no root keeper bound for a version-2 image", ErrPermission)
	default:
		if err := d.open(); err != nil {
			return nil, err
		}
	}
	if !ro {
		s, err := c.NewSession()
		if err != nil {
			return nil, err
		}
		d.sess = s
		d.kick, d.committerDone = make(chan struct{}, 1), make(chan struct{})
		go d.committer()
	}
	lines := max(int(e.opts.CacheBytes/d.ss/int64(len(e.shards))), 16)
	for i := range e.shards {
		p := newPart(d, i, lines, e.opts.MetaPages)
		p.maxDirty = max(int(e.opts.DirtyBytes/d.ss/int64(len(e.shards))), 1)
		d.parts = append(d.parts, p)
	}
	return d, nil
}

// Size is the virtual disk size.
func (d *Disk) Size() int64 { return int64(d.h.VirtualSize) }

// SectorSize is the image's sector size.
func (d *Disk) SectorSize() int { return int(d.ss) }

// Caps describes the disk.
func (d *Disk) Caps() Caps {
	return Caps{
		ReadOnly: d.readOnly, FUA: true, Trim: true, WriteZeroes: true, FastZero: true,
		BlockStatus: true, MultiConn: true,
		MinBlock: 1, PreferredBlock: uint32(d.ss), MaxBlock: MaxRequest,
	}
}

// Mapped is how many bytes of the image file reads copy from its mapping (store.File); 0
// when every read is a pread: the mapping is off (engine.mmap), the image cannot be mapped
// (over 4 TiB, or mmap refused by its filesystem), or the store has no mapping.
func (d *Disk) Mapped() int64 {
	if m, ok := d.st.(interface{ Mapped() int64 }); ok {
		return m.Mapped()
	}
	return 0
}

// Header is the image header in use.
func (d *Disk) Header() *format.Header { return d.h }

// Origin is the committed state the attach began from (the zero Origin for version 1).
func (d *Disk) Origin() Origin { return d.origin }

func (d *Disk) check(off, n int64, write bool) error {
	if off < 0 || n < 0 || off > d.Size() || n > d.Size()-off {
		return fmt.Errorf("offset %d length %d on a %d-byte disk: %w", off, n, d.Size(), ErrOutOfRange)
	}
	if write && d.readOnly {
		return ErrReadOnly
	}
	return nil
}

// admit counts a request in, or refuses it once Close has begun; an admitted request calls
// done when it completes.
func (d *Disk) admit() error {
	if d.state.Add(1)&stateClosed != 0 {
		d.done()
		return ErrDetached
	}
	return nil
}

// done counts a request out.
func (d *Disk) done() {
	if d.state.Add(-1) == stateClosed {
		select {
		case d.drained <- struct{}{}:
		default: // a signal is already pending; Close checks the count again anyway
		}
	}
}

// closing reports that Close has begun.
func (d *Disk) closing() bool { return d.state.Load()&stateClosed != 0 }

func (d *Disk) shardOf(lba uint64) int {
	return int(lba / d.e.opts.StripeSectors % uint64(len(d.e.shards)))
}

// ReadAt reads len(p) bytes at off. A sector that fails authentication fails the read with
// ErrIntegrity; p then holds no data from it.
func (d *Disk) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := d.check(off, int64(len(p)), false); err != nil {
		return err
	}
	if len(p) > MaxRequest {
		return ErrTooLarge
	}
	if len(p) == 0 {
		return nil
	}
	d.e.Stats.Reads.Add(1)
	d.e.Stats.BytesRead.Add(uint64(len(p)))
	return d.submit(ctx, dma.OpRead, p, off, int64(len(p)), 0)
}

// WriteAt writes p at off; with fua it is durable on return.
func (d *Disk) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := d.check(off, int64(len(p)), true); err != nil {
		return err
	}
	if len(p) > MaxRequest {
		return ErrTooLarge
	}
	if len(p) == 0 {
		return nil
	}
	d.e.Stats.Writes.Add(1)
	d.e.Stats.BytesWritten.Add(uint64(len(p)))
	var f dma.Flags
	if fua {
		f = dma.FUA
	}
	return d.submit(ctx, dma.OpWrite, p, off, int64(len(p)), f)
}

// Flush writes back every dirty sector of every shard, then commits with the counter
// advanced: all writes acknowledged before the call, through any connection, are durable on
// return, with one sync of the image (and one of the PSP's counter).
func (d *Disk) Flush(ctx context.Context) error {
	if d.readOnly {
		return nil
	}
	if err := d.admit(); err != nil {
		return err
	}
	defer d.done()
	d.e.Stats.Flushes.Add(1)
	if err := d.onShards(dma.OpFlush); err != nil {
		return err
	}
	if err := d.settleFor(d.jr.end()); err != nil {
		return err
	}
	return d.commit(true)
}

// Trim discards [off, off+n); with fua it is durable on return.
func (d *Disk) Trim(ctx context.Context, off, n int64, fua bool) error {
	if err := d.check(off, n, true); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	d.e.Stats.Trims.Add(1)
	var fl dma.Flags
	if fua {
		fl = dma.FUA
	}
	return d.submitLarge(ctx, dma.OpTrim, off, n, fl)
}

// WriteZeroes makes [off, off+n) read as zeros: holes, or with NoHole, written zeros.
func (d *Disk) WriteZeroes(ctx context.Context, off, n int64, f ZeroFlags) error {
	if err := d.check(off, n, true); err != nil {
		return err
	}
	if f.NoHole && f.FastZero {
		return ErrNotFast
	}
	if n == 0 {
		return nil
	}
	var fl dma.Flags
	if f.NoHole {
		fl |= dma.NoHole
	}
	if f.FUA {
		fl |= dma.FUA
	}
	return d.submitLarge(ctx, dma.OpZero, off, n, fl)
}

// submitLarge splits buffer-less ranges into MaxRequest pieces so one call never builds an
// unbounded descriptor list.
func (d *Disk) submitLarge(ctx context.Context, op dma.Op, off, n int64, f dma.Flags) error {
	for n > 0 {
		k := min(n, MaxRequest)
		if err := d.submit(ctx, op, nil, off, k, f); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// BlockStatus reports allocation for [off, off+n), at sector granularity, possibly for less
// than n bytes.
func (d *Disk) BlockStatus(ctx context.Context, off, n int64) ([]Extent, error) {
	if off < 0 || n <= 0 || off >= d.Size() || n > d.Size()-off {
		return nil, fmt.Errorf("block status offset %d length %d on a %d-byte disk: %w", off, n, d.Size(), ErrOutOfRange)
	}
	first := off / d.ss
	last := min((off+n+d.ss-1)/d.ss, first+maxStatusSectors)
	bits := make([]byte, last-first)
	if err := d.submit(ctx, dma.OpStatus, bits, first*d.ss, int64(len(bits))*d.ss, 0); err != nil {
		return nil, err
	}
	var out []Extent
	end := min(off+n, last*d.ss)
	for i, pos := int64(0), off; pos < end; i++ {
		k := min((first+i+1)*d.ss, end) - pos
		hole := bits[i] == 0
		if len(out) > 0 && out[len(out)-1].Hole == hole {
			out[len(out)-1].Length += k
		} else {
			out = append(out, Extent{Length: k, Hole: hole, Zero: hole})
		}
		pos += k
	}
	return out, nil
}

// Close writes back and checkpoints (unless read-only), then zeroises the cache and detaches.
// Requests admitted before Close finish first; later ones fail with ErrDetached.
func (d *Disk) Close() error {
	if d.state.Or(stateClosed)&stateClosed != 0 {
		return nil // another Close is under way or done
	}
	for d.state.Load() != stateClosed {
		<-d.drained
	}
	var err error
	if !d.readOnly {
		if err = d.onShards(dma.OpFlush); err == nil {
			if err = d.commit(true); err == nil {
				err = d.checkpoint()
			}
		}
	}
	if d.kick != nil {
		close(d.kick)
		<-d.committerDone
	}
	// Zeroise each part on its own shard, so no worker touches it concurrently.
	req := &request{}
	req.wg.Add(len(d.e.shards))
	for _, s := range d.e.shards {
		desc := &dma.Descriptor{Op: opDetach, ASID: uint32(d.asid), Target: d, Complete: req.complete}
		if perr := s.sq.Push(desc); perr != nil {
			req.wg.Done()
		}
	}
	req.wg.Wait()
	if d.sess != nil {
		d.sess.Close()
	}
	d.e.forget(d)
	if cerr := d.st.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("failed to detach disk at ASID %d: %w", d.asid, err)
	}
	return nil
}

// opDetach is the engine-internal descriptor op that zeroises this disk's part on its shard.
const opDetach dma.Op = 100
