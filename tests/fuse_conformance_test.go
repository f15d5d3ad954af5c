package tests

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sealdisk/sealdisk/engine"
	"github.com/sealdisk/sealdisk/engine/conformance"
)

// fileDevice is the block-device API spoken through a file, as QEMU's raw-posix driver
// speaks it to MOUNT/NAME.raw: pread, pwrite (+fdatasync for FUA), fdatasync,
// fallocate(PUNCH_HOLE|KEEP_SIZE) and fallocate(ZERO_RANGE), lseek(SEEK_DATA/SEEK_HOLE),
// fstat. Errno comes back as the engine's sentinels, the way a client maps it; where a
// file's semantics differ from a block device's the adapter says so at that call.
type fileDevice struct {
	f    *os.File
	fd   int
	size int64
	ro   bool
}

func (d *fileDevice) Size() int64 { return d.size }

func (d *fileDevice) Caps() engine.Caps {
	// No FastZero: a file has no "zero only if cheap" request. MaxBlock is the largest call
	// the adapter makes in one go; the kernel splits it into max_write pieces.
	return engine.Caps{ReadOnly: d.ro, FUA: true, Trim: true, WriteZeroes: true, BlockStatus: true, MultiConn: true,
		MinBlock: 1, PreferredBlock: 4096, MaxBlock: 32 << 20}
}

// fileErr maps an errno from a file call to the sentinel a block-device caller expects.
func fileErr(op string, err error) error {
	var s error
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOSPC), errors.Is(err, unix.ENXIO), errors.Is(err, unix.EFBIG):
		s = engine.ErrOutOfRange
	case errors.Is(err, unix.EROFS), errors.Is(err, unix.EBADF), errors.Is(err, unix.EPERM):
		s = engine.ErrReadOnly
	case errors.Is(err, unix.EOPNOTSUPP):
		s = engine.ErrNotFast
	case errors.Is(err, unix.EIO):
		s = engine.ErrIntegrity
	default:
		return fmt.Errorf("%s: %w", op, err)
	}
	return fmt.Errorf("%s: %w (%v)", op, s, err)
}

// The file's system calls are made again while the kernel interrupts them, as QEMU and Go's
// os package do: the test's threads get signals (Go's preemption sends SIGURG), the kernel
// then interrupts the FUSE request, and the server may answer it with EINTR.
func eintr[T any](call func() (T, error)) (T, error) {
	for {
		v, err := call()
		if !errors.Is(err, unix.EINTR) {
			return v, err
		}
	}
}

func pread(fd int, p []byte, off int64) (int, error) {
	return eintr(func() (int, error) { return unix.Pread(fd, p, off) })
}

func pwrite(fd int, p []byte, off int64) (int, error) {
	return eintr(func() (int, error) { return unix.Pwrite(fd, p, off) })
}

func seek(fd int, off int64, whence int) (int64, error) {
	return eintr(func() (int64, error) { return unix.Seek(fd, off, whence) })
}

func fdatasync(fd int) error {
	_, err := eintr(func() (struct{}, error) { return struct{}{}, unix.Fdatasync(fd) })
	return err
}

func fallocate(fd int, mode uint32, off, n int64) error {
	_, err := eintr(func() (struct{}, error) { return struct{}{}, unix.Fallocate(fd, mode, off, n) })
	return err
}

// ReadAt: a read that reaches end of file comes back short; past the end it is out of range.
func (d *fileDevice) ReadAt(_ context.Context, p []byte, off int64) error {
	for len(p) > 0 {
		n, err := pread(d.fd, p, off)
		if err != nil {
			return fileErr("pread", err)
		}
		if n == 0 {
			return fmt.Errorf("pread at %d: end of file: %w", off, engine.ErrOutOfRange)
		}
		p, off = p[n:], off+int64(n)
	}
	if off < 0 { // a zero-length read is not checked by the kernel
		return fmt.Errorf("pread at %d: %w", off, engine.ErrOutOfRange)
	}
	return nil
}

// fuseMaxWrite is the mount's max_write: the kernel cuts larger writes into pieces this size.
const fuseMaxWrite = 1 << 20

// WriteAt: fusefs refuses a write that crosses the end whole (ENOSPC), but the kernel sends a
// write larger than max_write in pieces and the pieces before the end succeed (as with a
// block device's own file); a caller that wants "refused means unchanged" for such a write
// must check the size first, as QEMU's block layer does, so the adapter does for those only.
func (d *fileDevice) WriteAt(_ context.Context, p []byte, off int64, fua bool) error {
	if (len(p) == 0 && off < 0) || (len(p) > fuseMaxWrite && off+int64(len(p)) > d.size) {
		return fmt.Errorf("pwrite [%d,+%d) past the end of a %d-byte disk: %w", off, len(p), d.size, engine.ErrOutOfRange)
	}
	for len(p) > 0 {
		n, err := pwrite(d.fd, p, off)
		if err != nil {
			return fileErr("pwrite", err)
		}
		if n == 0 {
			return fmt.Errorf("pwrite at %d wrote nothing: %w", off, io.ErrShortWrite)
		}
		p, off = p[n:], off+int64(n)
	}
	if fua {
		return fileErr("fdatasync", fdatasync(d.fd))
	}
	return nil
}

func (d *fileDevice) Flush(context.Context) error { return fileErr("fdatasync", fdatasync(d.fd)) }

// Trim punches a hole. fallocate(2) clips a hole punched past end of file (a file's rule,
// which fusefs keeps), where a block device refuses it; the adapter refuses such a range
// itself, as a block-layer caller would, and TestFUSEFileEdges checks the clipping.
func (d *fileDevice) Trim(ctx context.Context, off, n int64, fua bool) error {
	if off < 0 || n < 0 || off+n > d.size {
		return fmt.Errorf("trim [%d,+%d) past the end of a %d-byte disk: %w", off, n, d.size, engine.ErrOutOfRange)
	}
	if n == 0 {
		return nil
	}
	if err := fileErr("fallocate(PUNCH_HOLE)", fallocate(d.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)); err != nil || !fua {
		return err
	}
	return d.Flush(ctx)
}

// WriteZeroes is fallocate(ZERO_RANGE), as QEMU's raw-posix driver issues it. A file has no
// "fast only" zeroing, so FastZero is refused here (Caps says so).
func (d *fileDevice) WriteZeroes(ctx context.Context, off, n int64, z engine.ZeroFlags) error {
	if z.FastZero {
		return fmt.Errorf("fallocate has no fast-zero mode: %w", engine.ErrNotFast)
	}
	if err := fileErr("fallocate(ZERO_RANGE)", fallocate(d.fd, unix.FALLOC_FL_ZERO_RANGE, off, n)); err != nil || !z.FUA {
		return err
	}
	return d.Flush(ctx)
}

// BlockStatus walks SEEK_DATA/SEEK_HOLE from off; lseek has no length, so n <= 0 is refused
// here. Holes read as zeros.
func (d *fileDevice) BlockStatus(_ context.Context, off, n int64) ([]engine.Extent, error) {
	if n <= 0 {
		return nil, fmt.Errorf("block status of %d bytes: %w", n, engine.ErrOutOfRange)
	}
	end := off + n
	var ext []engine.Extent
	for pos := off; pos < end && (pos < d.size || pos == off); {
		data, err := seek(d.fd, pos, unix.SEEK_DATA)
		switch {
		case errors.Is(err, unix.ENXIO) && pos >= 0 && pos < d.size:
			data = d.size // no data up to the end
		case err != nil:
			return nil, fileErr("lseek(SEEK_DATA)", err)
		}
		if data > pos {
			next := min(data, end)
			ext = append(ext, engine.Extent{Length: next - pos, Hole: true, Zero: true})
			pos = next
			continue
		}
		hole, err := seek(d.fd, pos, unix.SEEK_HOLE)
		if err != nil {
			return nil, fileErr("lseek(SEEK_HOLE)", err)
		}
		if hole <= pos {
			return nil, fmt.Errorf("SEEK_DATA at %d gave %d, SEEK_HOLE gave %d", pos, data, hole)
		}
		next := min(hole, end)
		ext = append(ext, engine.Extent{Length: next - pos})
		pos = next
	}
	return ext, nil
}

var _ engine.BlockDevice = (*fileDevice)(nil)

// fuseDevices is one `sealdisk serve` with a FUSE mount and the admin socket; each fresh
// device is a copy of a sealed zero image attached through the admin API, and is detached
// when its test ends.
type fuseDevices struct {
	s   *configServer
	e   *env
	src string // the zero raw image each device is sealed from
	n   atomic.Int64
}

func newFuseDevices(t *testing.T) *fuseDevices {
	t.Helper()
	requireFUSE(t)
	e := newEnv(t)
	// Runs after serve has stopped (cleanups run last-in first-out): whatever happened,
	// nothing stays mounted.
	t.Cleanup(func() { unmountLazy(filepath.Join(e.dir, "mnt")) })
	src := filepath.Join(e.dir, "zero.raw")
	if err := os.WriteFile(src, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(src, conformance.Size); err != nil {
		t.Fatal(err)
	}
	fd := &fuseDevices{e: e, src: src}
	fd.s = startConfigServe(t, e)
	return fd
}

// unmountLazy detaches a FUSE mount that is still there (a failed or killed serve).
func unmountLazy(mnt string) {
	if out, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(out), " "+mnt+" ") {
		exec.Command("fusermount3", "-u", "-z", mnt).Run()
	}
}

// open attaches a freshly sealed zero image and opens its file with extra open flags.
func (fd *fuseDevices) open(t *testing.T, flags int, readOnly bool) *fileDevice {
	t.Helper()
	name := fmt.Sprintf("d%d", fd.n.Add(1))
	img := filepath.Join(fd.e.dir, name+".img")
	// A fresh seal, not a copy of one sealed image: copies share the image UUID, and once one
	// has been flushed the PSP refuses the others as rolled back.
	fd.e.seal(t, fd.src, img)
	args := []string{"attach", "--name", name, "--image", img, "--firmware", fd.e.fw}
	if readOnly {
		args = append(args, "--read-only")
	}
	fd.s.adminRun(t, args...)
	t.Cleanup(func() {
		fd.s.adminRun(t, "detach", name)
		os.Remove(img)
	})
	p := filepath.Join(fd.s.mnt, name+".raw")
	mode := os.O_RDWR
	if readOnly {
		// The read-only file refuses to be opened for writing, even by root.
		if f, err := os.OpenFile(p, os.O_RDWR|flags, 0); err == nil {
			f.Close()
			t.Fatalf("%s (read-only) opened for writing", p)
		} else if !errors.Is(err, syscall.EROFS) && !errors.Is(err, syscall.EACCES) {
			t.Fatalf("opening read-only %s for writing: %v, want EROFS or EACCES", p, err)
		}
		mode = os.O_RDONLY
	}
	f, err := os.OpenFile(p, mode|flags, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return &fileDevice{f: f, fd: int(f.Fd()), size: fi.Size(), ro: readOnly}
}

// TestFUSEConformance runs the one block-device suite through MOUNT/NAME.raw of the built
// serve, opened without and with O_DIRECT (fusefs makes every open direct I/O, which has no
// alignment rule, so every case runs in both; "buffered" is how QEMU cache=writeback opens
// the file), and the read-only suite on a read-only VM.
func TestFUSEConformance(t *testing.T) {
	fd := newFuseDevices(t)
	for _, m := range []struct {
		name  string
		flags int
	}{{"buffered", 0}, {"O_DIRECT", syscall.O_DIRECT}} {
		t.Run(m.name, func(t *testing.T) {
			conformance.Run(t, 4096, func(t *testing.T) engine.BlockDevice { return fd.open(t, m.flags, false) })
		})
	}
	t.Run("read-only", func(t *testing.T) {
		conformance.RunReadOnly(t, 4096, func(t *testing.T) engine.BlockDevice { return fd.open(t, 0, true) })
	})
}

// TestFUSEFileEdges: where a disk file's rules differ from a block device's, the served file
// keeps a file's: a write crossing the end is refused whole and changes nothing, a hole
// punched past the end is clipped there, the size cannot change (truncate, preallocation
// past the end), reads at the end return nothing, other fallocate modes are refused, and
// since every open is direct I/O only private mappings are allowed.
func TestFUSEFileEdges(t *testing.T) {
	fd := newFuseDevices(t)
	for _, m := range []struct {
		name  string
		flags int
	}{{"buffered", 0}, {"O_DIRECT", syscall.O_DIRECT}} {
		t.Run(m.name, func(t *testing.T) {
			d := fd.open(t, m.flags, false)
			s := d.size
			last := make([]byte, 4096)
			for i := range last {
				last[i] = byte(i*7 + 1)
			}
			must := func(what string, err error) {
				t.Helper()
				if err != nil {
					t.Fatalf("%s: %v", what, err)
				}
			}
			_, err := pwrite(d.fd, last, s-4096)
			must("pwrite last block", err)
			checkLast := func(what string, want []byte) {
				t.Helper()
				got := make([]byte, 4096)
				if n, err := pread(d.fd, got, s-4096); err != nil || n != 4096 || string(got) != string(want) {
					t.Fatalf("%s: last block reads differently (%d, %v)", what, n, err)
				}
			}
			if n, err := pwrite(d.fd, make([]byte, 8192), s-4096); !errors.Is(err, unix.ENOSPC) {
				t.Errorf("pwrite crossing the end: %d, %v, want ENOSPC", n, err)
			}
			checkLast("after a refused write", last)
			if n, err := pread(d.fd, make([]byte, 10), s); n != 0 || err != nil {
				t.Errorf("pread at the end: %d, %v, want 0, nil", n, err)
			}
			if err := unix.Ftruncate(d.fd, s+4096); !errors.Is(err, unix.EPERM) {
				t.Errorf("ftruncate to grow: %v, want EPERM", err)
			}
			must("ftruncate to the same size", unix.Ftruncate(d.fd, s))
			must("fallocate(0) inside", fallocate(d.fd, 0, 0, s))
			if err := fallocate(d.fd, 0, s-4096, 8192); !errors.Is(err, unix.ENOSPC) {
				t.Errorf("fallocate(0) past the end: %v, want ENOSPC", err)
			}
			if err := fallocate(d.fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, s-4096, 8192); !errors.Is(err, unix.ENOSPC) {
				t.Errorf("fallocate(ZERO_RANGE|KEEP_SIZE) past the end: %v, want ENOSPC", err)
			}
			checkLast("after refused fallocates", last)
			if err := fallocate(d.fd, unix.FALLOC_FL_COLLAPSE_RANGE, 0, 4096); !errors.Is(err, unix.EOPNOTSUPP) {
				t.Errorf("fallocate(COLLAPSE_RANGE): %v, want EOPNOTSUPP", err)
			}
			must("punch past the end", fallocate(d.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, s-4096+100, 1<<20))
			checkLast("after a punch clipped at the end", append(append([]byte{}, last[:100]...), make([]byte, 4096-100)...))
			// Every open is direct I/O: a shared writable mapping is refused, a private one
			// reads the disk.
			if _, err := unix.Mmap(d.fd, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); !errors.Is(err, unix.ENODEV) {
				t.Errorf("shared mmap: %v, want ENODEV", err)
			}
			mem, err := unix.Mmap(d.fd, s-4096, 4096, unix.PROT_READ, unix.MAP_PRIVATE)
			must("private mmap", err)
			if mem[0] != last[0] || mem[99] != last[99] || mem[100] != 0 {
				t.Errorf("private mmap of the last block reads %v…", mem[:4])
			}
			unix.Munmap(mem)
			fi, err := d.f.Stat()
			must("fstat", err)
			if fi.Size() != s {
				t.Errorf("size after all that: %d, want %d", fi.Size(), s)
			}
		})
	}
}
