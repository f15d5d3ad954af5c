package fusefs

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/sealdisk/sealdisk/engine"
)

// diskNode is one VM disk as a regular file. It is handleless: every call goes straight to
// the device, so parallel requests run in parallel.
type diskNode struct {
	fs.Inode
	dev      engine.BlockDevice
	detached atomic.Bool

	mu             sync.Mutex // guards mode, uid, gid (libvirt chowns disk files)
	mode, uid, gid uint32
}

var (
	_ = (fs.NodeGetattrer)((*diskNode)(nil))
	_ = (fs.NodeSetattrer)((*diskNode)(nil))
	_ = (fs.NodeOpener)((*diskNode)(nil))
	_ = (fs.NodeReader)((*diskNode)(nil))
	_ = (fs.NodeWriter)((*diskNode)(nil))
	_ = (fs.NodeFsyncer)((*diskNode)(nil))
	_ = (fs.NodeFlusher)((*diskNode)(nil))
	_ = (fs.NodeAllocater)((*diskNode)(nil))
	_ = (fs.NodeLseeker)((*diskNode)(nil))
)

func (d *diskNode) detach() { d.detached.Store(true) }

// errno maps engine errors to errno: the one place the FUSE frontend does so.
func errno(err error) syscall.Errno {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, engine.ErrIntegrity):
		return syscall.EIO
	case errors.Is(err, engine.ErrReadOnly):
		return syscall.EROFS
	case errors.Is(err, engine.ErrPermission):
		return syscall.EACCES
	case errors.Is(err, engine.ErrOutOfRange):
		return syscall.EINVAL
	case errors.Is(err, engine.ErrTooLarge):
		return syscall.EFBIG
	case errors.Is(err, engine.ErrNotFast):
		return syscall.EOPNOTSUPP
	case errors.Is(err, engine.ErrDetached):
		return syscall.ENODEV
	case errors.Is(err, context.Canceled):
		return syscall.EINTR
	}
	return syscall.EIO
}

func (d *diskNode) Getattr(_ context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	size := uint64(d.dev.Size())
	d.mu.Lock()
	out.Mode = fuse.S_IFREG | d.mode
	out.Uid, out.Gid = d.uid, d.gid
	d.mu.Unlock()
	out.Size = size
	out.Blksize = 4096
	out.Blocks = (size + 511) / 512
	out.Nlink = 1
	return 0
}

// Setattr accepts mode and ownership changes (kept in memory) and a truncate to the current
// size; a virtual disk cannot change size.
func (d *diskNode) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok && int64(sz) != d.dev.Size() {
		return syscall.EPERM
	}
	d.mu.Lock()
	if m, ok := in.GetMode(); ok {
		d.mode = m & 0o7777
		if d.dev.Caps().ReadOnly {
			d.mode &^= 0o222
		}
	}
	if u, ok := in.GetUID(); ok {
		d.uid = u
	}
	if g, ok := in.GetGID(); ok {
		d.gid = g
	}
	d.mu.Unlock()
	return d.Getattr(ctx, f, out)
}

func (d *diskNode) Open(_ context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if d.detached.Load() {
		return nil, 0, syscall.ENODEV
	}
	if flags&(syscall.O_WRONLY|syscall.O_RDWR) != 0 && d.dev.Caps().ReadOnly {
		return nil, 0, syscall.EROFS
	}
	// Every open is direct I/O, buffered ones too: the kernel's page cache would hold the
	// disk's plaintext outside the engine (not zeroised at detach, a second copy beside the
	// engine's cache) and would turn each buffered read and write into a synchronous round
	// trip per request; direct, libaio requests run in parallel (CAP_ASYNC_DIO) and writes to
	// different ranges are not serialised on the inode lock (the engine orders overlapping
	// ones). Shared writable mmap is refused (ENODEV); nothing that opens disks needs it.
	return nil, fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES, 0
}

func (d *diskNode) Read(ctx context.Context, _ fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if d.detached.Load() {
		return nil, syscall.ENODEV
	}
	size := d.dev.Size()
	if off >= size {
		return fuse.ReadResultData(nil), 0
	}
	n := min(int64(len(dest)), size-off)
	if err := d.dev.ReadAt(ctx, dest[:n], off); err != nil {
		return nil, errno(err)
	}
	return fuse.ReadResultData(dest[:n]), 0
}

func (d *diskNode) Write(ctx context.Context, _ fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	if d.detached.Load() {
		return 0, syscall.ENODEV
	}
	if off+int64(len(data)) > d.dev.Size() {
		return 0, syscall.ENOSPC // a virtual disk does not grow
	}
	if err := d.dev.WriteAt(ctx, data, off, false); err != nil {
		return 0, errno(err)
	}
	return uint32(len(data)), 0
}

// Fsync and fdatasync are the engine's Flush: every acknowledged write becomes durable.
func (d *diskNode) Fsync(ctx context.Context, _ fs.FileHandle, _ uint32) syscall.Errno {
	if d.detached.Load() {
		return syscall.ENODEV
	}
	return errno(d.dev.Flush(ctx))
}

// Flush (close) does not flush the disk: close is not a durability point for block devices,
// and QEMU fsyncs when the guest flushes.
func (d *diskNode) Flush(context.Context, fs.FileHandle) syscall.Errno { return 0 }

// Allocate implements fallocate: PUNCH_HOLE|KEEP_SIZE → Trim, ZERO_RANGE → WriteZeroes,
// plain preallocation inside the disk → nothing to do.
func (d *diskNode) Allocate(ctx context.Context, _ fs.FileHandle, off, size uint64, mode uint32) syscall.Errno {
	if d.detached.Load() {
		return syscall.ENODEV
	}
	if off+size > uint64(d.dev.Size()) || off+size < off {
		if mode&unix.FALLOC_FL_KEEP_SIZE == 0 || mode&unix.FALLOC_FL_PUNCH_HOLE == 0 {
			return syscall.ENOSPC
		}
		size = uint64(d.dev.Size()) - min(off, uint64(d.dev.Size()))
	}
	switch {
	case mode == unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE:
		return errno(d.dev.Trim(ctx, int64(off), int64(size), false))
	case mode&^unix.FALLOC_FL_KEEP_SIZE == unix.FALLOC_FL_ZERO_RANGE:
		return errno(d.dev.WriteZeroes(ctx, int64(off), int64(size), engine.ZeroFlags{}))
	case mode == 0 || mode == unix.FALLOC_FL_KEEP_SIZE:
		return 0
	}
	return syscall.EOPNOTSUPP
}

// Lseek implements SEEK_DATA and SEEK_HOLE from the device's block status.
func (d *diskNode) Lseek(ctx context.Context, _ fs.FileHandle, off uint64, whence uint32) (uint64, syscall.Errno) {
	size := uint64(d.dev.Size())
	if whence != unix.SEEK_DATA && whence != unix.SEEK_HOLE {
		return 0, syscall.EINVAL
	}
	if off >= size {
		return 0, syscall.ENXIO
	}
	if !d.dev.Caps().BlockStatus {
		if whence == unix.SEEK_DATA {
			return off, 0
		}
		return size, 0
	}
	for pos := off; pos < size; {
		ext, err := d.dev.BlockStatus(ctx, int64(pos), int64(min(size-pos, 1<<30)))
		if err != nil {
			return 0, errno(err)
		}
		if len(ext) == 0 {
			return 0, syscall.EIO
		}
		for _, e := range ext {
			if (whence == unix.SEEK_DATA) != e.Hole {
				return pos, 0
			}
			pos += uint64(e.Length)
		}
	}
	if whence == unix.SEEK_HOLE {
		return size, 0
	}
	return 0, syscall.ENXIO
}
