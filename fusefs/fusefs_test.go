package fusefs

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/sealdisk/sealdisk/engine"
)

func requireTool(t *testing.T, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("required tool %s missing (CI=true)", name)
		}
		t.Skipf("%s not installed", name)
	}
}

func requireFUSE(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("/dev/fuse missing (CI=true)")
		}
		t.Skip("no /dev/fuse")
	}
	requireTool(t, "fusermount3")
}

func mount(t *testing.T) *FS {
	requireFUSE(t)
	f, err := Mount(Options{Mountpoint: filepath.Join(t.TempDir(), "mnt")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Unmount() })
	return f
}

// badDevice fails reads of [badOff, badOff+4096) with ErrIntegrity, as a tampered sector.
type badDevice struct {
	*engine.MemDevice
	badOff int64
}

func (b *badDevice) ReadAt(ctx context.Context, p []byte, off int64) error {
	if off < b.badOff+4096 && off+int64(len(p)) > b.badOff {
		return engine.ErrIntegrity
	}
	return b.MemDevice.ReadAt(ctx, p, off)
}

func alignedBuf(n int) []byte {
	b := make([]byte, n+4096)
	a := int(uintptr(unsafe.Pointer(&b[0])) & 4095)
	if a != 0 {
		a = 4096 - a
	}
	return b[a : a+n]
}

func TestReadWriteFsyncAndSize(t *testing.T) {
	f := mount(t)
	dev := engine.NewMemDevice(16<<20, false)
	if err := f.Add("vm1", dev); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(f.Mountpoint(), "vm1.raw")
	fi, err := os.Stat(p)
	if err != nil || fi.Size() != 16<<20 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("stat: %v %v", fi, err)
	}
	fh, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	data := make([]byte, 3<<20)
	rand.New(rand.NewSource(1)).Read(data)
	for _, off := range []int64{0, 1, 4095, 4096, 4097, 16<<20 - 3<<20} {
		if _, err := fh.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
		if err := fh.Sync(); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(data))
		if err := dev.ReadAt(context.Background(), got, off); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("device content at %d differs", off)
		}
		back := make([]byte, len(data))
		if _, err := fh.ReadAt(back, off); err != nil || !bytes.Equal(back, data) {
			t.Fatalf("read back at %d: %v", off, err)
		}
	}
	if _, err := fh.WriteAt([]byte{1}, 16<<20); !errors.Is(err, syscall.ENOSPC) && !errors.Is(err, syscall.EFBIG) {
		t.Fatalf("write past the end: %v", err)
	}
	if err := fh.Truncate(1 << 20); err == nil {
		t.Fatal("truncate accepted")
	}
	if err := os.Chmod(p, 0o640); err != nil {
		t.Fatal("chmod:", err)
	}
}

func TestODirectAndParallel(t *testing.T) {
	f := mount(t)
	dev := engine.NewMemDevice(8<<20, false)
	f.Add("vm1", dev)
	fh, err := os.OpenFile(filepath.Join(f.Mountpoint(), "vm1.raw"), os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal("O_DIRECT open:", err)
	}
	defer fh.Close()
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			buf, back := alignedBuf(1<<20), alignedBuf(1<<20)
			for i := range buf {
				buf[i] = byte(g + i)
			}
			off := int64(g) << 20
			if _, err := fh.WriteAt(buf, off); err != nil {
				t.Error(err)
				return
			}
			if _, err := fh.ReadAt(back, off); err != nil || !bytes.Equal(buf, back) {
				t.Errorf("goroutine %d: %v", g, err)
			}
		}(g)
	}
	wg.Wait()
}

func TestFallocateAndSeek(t *testing.T) {
	f := mount(t)
	dev := engine.NewMemDevice(8<<20, false)
	f.Add("vm1", dev)
	fh, err := os.OpenFile(filepath.Join(f.Mountpoint(), "vm1.raw"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	fd := int(fh.Fd())
	fh.WriteAt(bytes.Repeat([]byte{7}, 4<<20), 1<<20)
	if err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 2<<20, 1<<20); err != nil {
		t.Fatal("punch:", err)
	}
	if err := unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE, 4<<20, 100); err != nil {
		t.Fatal("zero range:", err)
	}
	got := make([]byte, 6<<20)
	fh.ReadAt(got, 0)
	for i, b := range got {
		want := byte(0)
		if i >= 1<<20 && i < 5<<20 && !(i >= 2<<20 && i < 3<<20) && !(i >= 4<<20 && i < 4<<20+100) {
			want = 7
		}
		if b != want {
			t.Fatalf("byte %d = %d, want %d", i, b, want)
		}
	}
	if d, err := unix.Seek(fd, 0, unix.SEEK_DATA); err != nil || d != 1<<20 {
		t.Fatalf("SEEK_DATA = %d %v", d, err)
	}
	if h, err := unix.Seek(fd, 1<<20, unix.SEEK_HOLE); err != nil || h != 2<<20 {
		t.Fatalf("SEEK_HOLE = %d %v", h, err)
	}
}

func TestTamperedSectorIsEIO(t *testing.T) {
	f := mount(t)
	dev := &badDevice{engine.NewMemDevice(1<<20, false), 8192}
	f.Add("vm1", dev)
	fh, err := os.OpenFile(filepath.Join(f.Mountpoint(), "vm1.raw"), os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	buf := alignedBuf(4096)
	if _, err := fh.ReadAt(buf, 8192); !errors.Is(err, syscall.EIO) {
		t.Fatalf("tampered sector read: %v", err)
	}
	if _, err := fh.ReadAt(buf, 0); err != nil {
		t.Fatalf("good sector: %v", err)
	}
}

func TestTwoDisksReadOnlyAndRemove(t *testing.T) {
	f := mount(t)
	a, b := engine.NewMemDevice(1<<20, false), engine.NewMemDevice(2<<20, true)
	f.Add("a", a)
	f.Add("b", b)
	if err := f.Add("a", a); err == nil {
		t.Fatal("duplicate accepted")
	}
	a.WriteAt(context.Background(), []byte("disk a"), 0, false)
	got := make([]byte, 6)
	fa, _ := os.Open(filepath.Join(f.Mountpoint(), "a.raw"))
	fa.ReadAt(got, 0)
	fa.Close()
	if string(got) != "disk a" {
		t.Fatal("a.raw shows the wrong disk")
	}
	if _, err := os.OpenFile(filepath.Join(f.Mountpoint(), "b.raw"), os.O_RDWR, 0); !errors.Is(err, syscall.EROFS) && !errors.Is(err, syscall.EACCES) {
		t.Fatalf("read-only disk opened for writing: %v", err)
	}
	if fi, _ := os.Stat(filepath.Join(f.Mountpoint(), "b.raw")); fi.Size() != 2<<20 || fi.Mode().Perm() != 0o400 {
		t.Fatalf("b.raw: %v", fi)
	}
	if err := f.Remove("a"); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(f.Mountpoint())
	if len(ents) != 1 || ents[0].Name() != "b.raw" {
		t.Fatalf("after remove: %v", ents)
	}
}

func TestQemuIO(t *testing.T) {
	requireTool(t, "qemu-io")
	f := mount(t)
	f.Add("vm1", engine.NewMemDevice(64<<20, false))
	p := filepath.Join(f.Mountpoint(), "vm1.raw")
	for _, cache := range []string{"none", "writeback"} {
		out, err := exec.Command("qemu-io", "-f", "raw", "-t", cache,
			"-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 5000 70000", "-c", "flush",
			"-c", "read -P 0xab 0 5000", "-c", "read -P 0xcd 5000 70000", "-c", "read -P 0xab 75000 10000",
			"-c", "write -z 1M 1M", "-c", "read -P 0 1M 1M", p).CombinedOutput()
		if err != nil || strings.Contains(string(out), "Pattern verification failed") || strings.Contains(string(out), "failed") {
			t.Fatalf("qemu-io -t %s: %v\n%s", cache, err, out)
		}
	}
}

func TestStaleMountIsCleared(t *testing.T) {
	requireFUSE(t)
	mp := filepath.Join(t.TempDir(), "mnt")
	// A child process mounts and is killed: the mount stays, dead (ENOTCONN).
	if os.Getenv("SEALDISK_FUSE_CHILD") == "" {
		cmd := exec.Command(os.Args[0], "-test.run=^TestStaleMountIsCleared$")
		cmd.Env = append(os.Environ(), "SEALDISK_FUSE_CHILD="+mp)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// wait for the mount to appear
		for i := 0; i < 100; i++ {
			if _, err := os.Stat(filepath.Join(mp, "x.raw")); err == nil {
				break
			}
			sleep()
		}
		cmd.Process.Kill()
		cmd.Wait()
		var st unix.Statfs_t
		if err := unix.Statfs(mp, &st); !errors.Is(err, syscall.ENOTCONN) {
			t.Fatalf("killing the child did not leave a dead mount (%v)", err)
		}
		f, err := Mount(Options{Mountpoint: mp})
		if err != nil {
			t.Fatal("remount over a stale mount:", err)
		}
		f.Unmount()
		return
	}
	f, err := Mount(Options{Mountpoint: os.Getenv("SEALDISK_FUSE_CHILD")})
	if err != nil {
		os.Exit(3)
	}
	f.Add("x", engine.NewMemDevice(1<<20, false))
	select {}
}

func TestBusyUnmountReported(t *testing.T) {
	requireFUSE(t)
	f, err := Mount(Options{Mountpoint: filepath.Join(t.TempDir(), "mnt")})
	if err != nil {
		t.Fatal(err)
	}
	f.Add("vm1", engine.NewMemDevice(1<<20, false))
	fh, err := os.Open(filepath.Join(f.Mountpoint(), "vm1.raw"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Unmount(); !errors.Is(err, ErrBusy) {
		t.Fatalf("busy unmount: %v", err)
	}
	fh.Close()
	if err := f.Unmount(); err != nil {
		t.Fatal(err)
	}
}
