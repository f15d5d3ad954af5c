package store

import (
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// BenchmarkWritePath is why File writes with pwrite although it reads through a mapping
// (docs/ENGINE.md, "Backing-store I/O"): random writes of 4 KiB and 64 KiB into a 1 GiB file,
// with pwrite and with a memory copy into a shared read-write mapping of it, an fdatasync
// every 256 writes (a guest that flushes). Every page of the mapping has been read first, as
// the engine's reads would have. It runs on tmpfs (/dev/shm) and in the test's temporary
// directory (the disk's file system); SEALDISK_BENCH_DIRS (colon-separated) overrides both.
func BenchmarkWritePath(b *testing.B) {
	const size = 1 << 30
	dirs := filepath.SplitList(os.Getenv("SEALDISK_BENCH_DIRS"))
	if len(dirs) == 0 {
		dirs = []string{"/dev/shm", os.TempDir()}
	}
	for _, dir := range dirs {
		if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
			continue
		}
		for _, bs := range []int{4096, 65536} {
			for _, mode := range []string{"pwrite", "mapped"} {
				b.Run(fmt.Sprintf("%s/%dk-%s", dir, bs/1024, mode), func(b *testing.B) {
					d, err := os.MkdirTemp(dir, "sealdisk-bench-")
					if err != nil {
						b.Fatal(err)
					}
					defer os.RemoveAll(d)
					f, err := os.Create(filepath.Join(d, "w.img"))
					if err != nil {
						b.Fatal(err)
					}
					defer f.Close()
					buf := make([]byte, 4<<20)
					for off := int64(0); off < size; off += int64(len(buf)) {
						if _, err := f.WriteAt(buf, off); err != nil {
							b.Fatal(err)
						}
					}
					if err := f.Sync(); err != nil {
						b.Fatal(err)
					}
					m, err := syscall.Mmap(int(f.Fd()), 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
					if err != nil {
						b.Fatal(err)
					}
					defer syscall.Munmap(m)
					if err := syscall.Madvise(m, syscall.MADV_RANDOM); err != nil {
						b.Fatal(err)
					}
					var sum byte
					for i := 0; i < size; i += 4096 {
						sum += m[i]
					}
					if sum != 0 {
						b.Fatal("file not zero")
					}
					p := make([]byte, bs)
					r := rand.New(rand.NewSource(1))
					b.SetBytes(int64(bs))
					n := 0
					for b.Loop() {
						off := r.Int63n(size/int64(bs)) * int64(bs)
						if mode == "pwrite" {
							if _, err := f.WriteAt(p, off); err != nil {
								b.Fatal(err)
							}
						} else {
							copy(m[off:off+int64(bs)], p)
						}
						if n++; n%256 == 0 {
							if err := syscall.Fdatasync(int(f.Fd())); err != nil {
								b.Fatal(err)
							}
						}
					}
				})
			}
		}
	}
}
