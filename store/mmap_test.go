package store

import (
	"bytes"
	"errors"
	"math/rand"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sealdisk/sealdisk/internal/zeros"
)

func mappedFile(t *testing.T, size int64) (*File, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "img")
	f, err := CreateFile(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.SetMapped(true); err != nil {
		t.Fatal(err)
	}
	if f.Mapped() != 0 {
		t.Fatalf("an empty file is mapped (%d bytes)", f.Mapped())
	}
	if size > 0 {
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		if f.Mapped() != size {
			t.Fatalf("after Truncate(%d): %d bytes mapped", size, f.Mapped())
		}
	}
	return f, p
}

// Mapped reads see what pwrite and fallocate did, through another descriptor too.
func TestMappedCoherentWithSyscalls(t *testing.T) {
	const size = 1 << 20
	f, p := mappedFile(t, size)
	other, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	a := bytes.Repeat([]byte{0xa5}, 64<<10)
	if _, err := f.WriteAt(a, 4096); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(a))
	if _, err := f.ReadAt(got, 4096); err != nil || !bytes.Equal(got, a) {
		t.Fatalf("mapped read after a write: %v, equal %v", err, bytes.Equal(got, a))
	}
	b := bytes.Repeat([]byte{0x5a}, 8192)
	if _, err := other.WriteAt(b, 8192); err != nil {
		t.Fatal(err)
	}
	got = make([]byte, 8192)
	if _, err := f.ReadAt(got, 8192); err != nil || !bytes.Equal(got, b) {
		t.Fatalf("mapped read after a pwrite: %v, equal %v", err, bytes.Equal(got, b))
	}
	if err := f.Punch(0, 64<<10); err != nil {
		t.Fatal(err)
	}
	got = make([]byte, 64<<10)
	if _, err := f.ReadAt(got, 0); err != nil || !zeros.All(got) {
		t.Fatalf("mapped read after a punch: %v, zeros %v", err, zeros.All(got))
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// A file truncated underneath its mapping turns the access into SIGBUS; the call must fail with
// EIO, the process must live on, and the rest of the mapping keep working.
func TestMappedTruncatedUnderneathIsEIO(t *testing.T) {
	const size = 1 << 20
	f, p := mappedFile(t, size)
	if _, err := f.WriteAt(bytes.Repeat([]byte{1}, size), 0); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size/2); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 8192)
	_, err := f.ReadAt(buf, size-8192)
	if !errors.Is(err, syscall.EIO) || !errors.Is(err, errMappedFault) {
		t.Fatalf("read past the new end: %v, want EIO from the mapping", err)
	}
	if _, err := f.ReadAt(buf, 0); err != nil || buf[0] != 1 || buf[8191] != 1 {
		t.Fatalf("read inside the file after the fault: %v", err)
	}
}

// A fault outside the mapped side of the copy is not the store's to hide.
func TestFaultCopyRepanicsOtherFaults(t *testing.T) {
	pg := os.Getpagesize()
	none, err := unix.Mmap(-1, 0, 2*pg, unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANON)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(none)
	dst := make([]byte, 64)
	if err := faultCopy(dst, none[:64], none[:pg]); !errors.Is(err, errMappedFault) {
		t.Fatalf("fault inside the region: %v", err)
	}
	defer func() {
		r := recover()
		if _, ok := r.(runtime.Error); !ok {
			t.Fatalf("fault outside the region: recovered %v, want the runtime's fault panic", r)
		}
	}()
	_ = faultCopy(dst, none[pg:pg+64], none[:pg])
	t.Fatal("a fault outside the region returned")
}

func TestMappedReadOnly(t *testing.T) {
	f, p := mappedFile(t, 1<<20)
	if _, err := f.WriteAt([]byte("sealed"), 100); err != nil {
		t.Fatal(err)
	}
	ro, err := OpenFile(p, true)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if err := ro.SetMapped(true); err != nil || ro.Mapped() != 1<<20 {
		t.Fatalf("read-only SetMapped: %v, %d bytes", err, ro.Mapped())
	}
	got := make([]byte, 6)
	if _, err := ro.ReadAt(got, 100); err != nil || string(got) != "sealed" {
		t.Fatalf("read-only mapped read: %q, %v", got, err)
	}
	if _, err := ro.WriteAt(got, 100); err == nil || f.Mapped() == 0 {
		t.Fatal("a write to a read-only file succeeded")
	}
}

func TestSetMappedOff(t *testing.T) {
	f, _ := mappedFile(t, 1<<20)
	if _, err := f.WriteAt([]byte("x"), 5); err != nil {
		t.Fatal(err)
	}
	if err := f.SetMapped(false); err != nil || f.Mapped() != 0 {
		t.Fatalf("SetMapped(false): %v, %d bytes mapped", err, f.Mapped())
	}
	if err := f.Truncate(2 << 20); err != nil || f.Mapped() != 0 {
		t.Fatalf("Truncate of an unmapped file: %v, %d bytes mapped", err, f.Mapped())
	}
	got := make([]byte, 1)
	if _, err := f.ReadAt(got, 5); err != nil || got[0] != 'x' {
		t.Fatalf("pread after unmapping: %q, %v", got, err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(got, 5); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("read after Close: %v, want os.ErrClosed", err)
	}
}

// Copies in flight while the mapping is replaced (Truncate, SetMapped): each call sees one
// mapping or pread/pwrite, never an unmapped address. Each writer owns its own block, so the
// data must survive every remap.
func TestMappedRemapUnderLoad(t *testing.T) {
	const block, writers = 64 << 10, 4
	f, _ := mappedFile(t, writers*block)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	errs := make(chan error, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewSource(int64(w)))
			p, got := make([]byte, block), make([]byte, block)
			for {
				select {
				case <-stop:
					return
				default:
				}
				r.Read(p)
				off := int64(w) * block
				if _, err := f.WriteAt(p, off); err != nil {
					errs <- err
					return
				}
				if _, err := f.ReadAt(got, off); err != nil || !bytes.Equal(got, p) {
					errs <- errors.Join(err, errors.New("read back differs"))
					return
				}
			}
		}()
	}
	for i := range 200 {
		var err error
		switch i % 3 {
		case 0:
			err = f.Truncate(int64(writers*block + i*4096))
		case 1:
			err = f.SetMapped(false)
		case 2:
			err = f.SetMapped(true)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// Blocks read through the mapping at memory speed are recorded warm (later reads skip
// MADV_WILLNEED), blocks whose copy was slow cold again. warmPer4K is set so that every copy
// counts as fast, then as slow: the test does not depend on this machine's speed (under -race
// a 256 KiB copy takes longer than the production limit). The record spans words of the bitmap.
func TestMappedWarmRecord(t *testing.T) {
	const size = 130 * warmBlock
	f, _ := mappedFile(t, size)
	off := int64(62*warmBlock + 100)
	n := 4 * warmBlock
	if f.isWarm(62, 66) {
		t.Fatal("blocks warm before any read")
	}
	defer func(w time.Duration) { warmPer4K = w }(warmPer4K)
	warmPer4K = time.Hour
	if _, err := f.ReadAt(make([]byte, n), off); err != nil {
		t.Fatal(err)
	}
	if !f.isWarm(62, 66) || f.isWarm(61, 61) || f.isWarm(67, 67) {
		t.Fatalf("after a read of blocks 62-66: warm(62-66) %v, warm(61) %v, warm(67) %v",
			f.isWarm(62, 66), f.isWarm(61, 61), f.isWarm(67, 67))
	}
	f.setWarm(63, 64, false)
	if f.isWarm(62, 66) || !f.isWarm(62, 62) || !f.isWarm(65, 66) {
		t.Fatal("setWarm(false) cleared the wrong blocks")
	}
	warmPer4K = 0
	if _, err := f.ReadAt(make([]byte, warmBlock), 65*warmBlock); err != nil {
		t.Fatal(err)
	}
	if f.isWarm(65, 65) || !f.isWarm(62, 62) || !f.isWarm(66, 66) {
		t.Fatal("a slow copy of block 65 did not mark just that block cold")
	}
}
