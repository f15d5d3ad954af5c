package engine

import (
	"crypto/aes"
	"crypto/cipher"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/store"
)

// benchDir is tmpfs when there is one: the benchmark measures the engine over the page
// cache, not a disk.
func benchDir(b *testing.B) string {
	if d := os.Getenv("SEALDISK_BENCH_DIR"); d != "" { // e.g. a directory on the disk's file system
		d, err := os.MkdirTemp(d, "sealdisk-bench-")
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { os.RemoveAll(d) })
		return d
	}
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		d, err := os.MkdirTemp("/dev/shm", "sealdisk-bench-")
		if err == nil {
			b.Cleanup(func() { os.RemoveAll(d) })
			return d
		}
	}
	return b.TempDir()
}

// BenchmarkEngine: random reads and writes of 4 KiB and 64 KiB through the engine on a
// 1 GiB image held in the page cache, benchDepth requests in flight. Each case also reports
// its throughput as a share of cores × single-core AES-GCM (the goal: ≥ 70 % at
// 64 KiB), with the AES measured just before and just after the case, so that the ratio
// holds up on a machine whose speed drifts between cases. BenchmarkRawAESGCM is the same
// ceiling as a benchmark of its own (docs: BENCHMARKS.md).
func BenchmarkEngine(b *testing.B) {
	for _, l := range []struct {
		name string
		l    format.Layout
	}{{"tree", format.Layout{}}, {"notree", format.Layout{NoTree: true}}} {
		b.Run(l.name, func(b *testing.B) { benchEngine(b, l.l) })
	}
}

// benchEngine is BenchmarkEngine on one layout: with the integrity tree (the default) or
// without, so that the tree's cost is the ratio of two cases of one run.
func benchEngine(b *testing.B, l format.Layout) {
	const size = 1 << 30
	im := newTestImageLayout(b, size, 4096, l)
	p := filepath.Join(benchDir(b), "vm.img")
	f, err := store.CreateFile(p)
	if err != nil {
		b.Fatal(err)
	}
	defer os.Remove(p)
	im.create(b, f)
	placed, _ := strconv.ParseInt(os.Getenv("SEALDISK_BENCH_PLACED"), 10, 64) // bytes; unset: off
	e := New(Options{CacheBytes: 64 << 20, Shards: benchShards, NoMap: os.Getenv("SEALDISK_BENCH_NOMAP") != "", PlacedBytes: placed})
	defer e.Close()
	d := im.attach(b, e, 1, f)
	buf := make([]byte, 4<<20)
	rand.New(rand.NewSource(1)).Read(buf)
	for off := int64(0); off < size; off += int64(len(buf)) {
		must(b, d.WriteAt(ctx, buf, off, false))
	}
	must(b, d.Flush(ctx))
	for _, bs := range []int{4096, 65536} {
		for _, op := range []string{"read", "write"} {
			b.Run(fmt.Sprintf("%s-%dk", op, bs/1024), func(b *testing.B) {
				runShare(b, bs, max(1, benchDepth/runtime.GOMAXPROCS(0)), func(r *rand.Rand) func() error {
					p := make([]byte, bs)
					r.Read(p)
					return func() error {
						off := r.Int63n(size/int64(bs)) * int64(bs)
						if op == "read" {
							return d.ReadAt(ctx, p, off)
						}
						return d.WriteAt(ctx, p, off, false)
					}
				})
			})
		}
	}
}

// runShare runs one case of bs-byte operations on every core, par goroutines per core (each
// from newOp, with its own random source), and reports its throughput as a share of cores ×
// single-core AES-GCM, the AES measured for 200 ms just before and just after the case.
func runShare(b *testing.B, bs, par int, newOp func(r *rand.Rand) func() error) {
	b.SetBytes(int64(bs))
	b.SetParallelism(par)
	aes := rawAESRate(200 * time.Millisecond)
	b.ResetTimer()
	var seed atomic.Int64
	b.RunParallel(func(pb *testing.PB) {
		op := newOp(rand.New(rand.NewSource(seed.Add(1))))
		for pb.Next() {
			if err := op(); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.StopTimer()
	aes = (aes + rawAESRate(200*time.Millisecond)) / 2
	rate := float64(b.N) * float64(bs) / b.Elapsed().Seconds()
	b.ReportMetric(100*rate/(float64(runtime.GOMAXPROCS(0))*aes), "%cores×AES")
}

// BenchmarkEngineFloor measures, in the units of BenchmarkEngine, the work its 64 KiB cases
// cannot avoid, with no engine around it: one goroutine per core, each doing only that work,
// on a 1 GiB file in the same place as BenchmarkEngine's image. It is the ceiling the engine's
// share of cores × AES is measured against (BENCHMARKS.md).
//
//   - read: copy a random 64 KiB of ciphertext from the store's mapping into a private buffer
//     (ciphertext is copied before it is authenticated, docs/ENGINE.md), then open its 16
//     sectors there.
//   - write: copy 64 KiB of guest data into 16 cache lines; seal 16 other lines, last written
//     long ago (the write-back cache seals on eviction, so the plaintext is cold), into a
//     scratch buffer; pwrite that to a random 64 KiB of the file.
//   - write-memstore: write, with the pwrite replaced by a memory copy into a 1 GiB buffer:
//     the least any store could cost.
//   - write-direct: seal the guest's 64 KiB where it is (hot, no cache lines) into scratch and
//     pwrite it: the least any design that seals what it stores and writes with pwrite could
//     cost.
//
// Each sector's last 16 bytes stand in for its tag, so a sector seals and opens 4080 bytes,
// not 4096: the floor is the higher for it, by 0.4 %.
func BenchmarkEngineFloor(b *testing.B) {
	const size, bs, ss = 1 << 30, 65536, 4096
	f, err := store.CreateFile(filepath.Join(benchDir(b), "floor.img"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	blk, _ := aes.NewCipher(make([]byte, 32))
	g, _ := cipher.NewGCM(blk)
	nonce := make([]byte, g.NonceSize())
	buf := make([]byte, 4<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		for s := 0; s < len(buf); s += ss {
			g.Seal(buf[s:s], nonce, buf[s:s+ss-g.Overhead()], nil)
		}
		if _, err := f.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
	}
	if err := f.SetMapped(true); err != nil || f.Mapped() != size {
		b.Fatalf("mapping the file: %v (%d bytes mapped)", err, f.Mapped())
	}
	lines := make([][]byte, 64<<20/ss) // a 64 MiB cache, as BenchmarkEngine's
	for i := range lines {
		lines[i] = make([]byte, ss)
	}
	var mem []byte
	for _, op := range []string{"read", "write", "write-memstore", "write-direct"} {
		if op == "write-memstore" {
			mem = make([]byte, size)
			for i := 0; i < size; i += 4096 {
				mem[i] = 1
			}
		}
		b.Run(op+"-64k", func(b *testing.B) {
			var next atomic.Int64
			runShare(b, bs, 1, func(r *rand.Rand) func() error {
				// one goroutine per core; each has its own share of the lines and of mem
				n, k := int64(runtime.GOMAXPROCS(0)), next.Add(1)-1
				lines := lines[k*int64(len(lines))/n : (k+1)*int64(len(lines))/n]
				memBase := k * (size / n)
				g, _ := cipher.NewGCM(blk)
				p, ct := make([]byte, bs), make([]byte, bs)
				r.Read(p)
				return func() error {
					off := r.Int63n(size/bs) * bs
					if op == "read" {
						if _, err := f.ReadAt(p, off); err != nil {
							return err
						}
						for s := 0; s < bs; s += ss {
							if _, err := g.Open(p[s:s], nonce, p[s:s+ss], nil); err != nil {
								return err
							}
						}
						return nil
					}
					in, out := r.Intn(len(lines)-bs/ss), r.Intn(len(lines)-bs/ss)
					for i := range bs / ss {
						if op == "write-direct" {
							g.Seal(ct[i*ss:i*ss], nonce, p[i*ss:(i+1)*ss-g.Overhead()], nil)
							continue
						}
						copy(lines[in+i], p[i*ss:])
						g.Seal(ct[i*ss:i*ss], nonce, lines[out+i][:ss-g.Overhead()], nil)
					}
					if op == "write-memstore" {
						copy(mem[memBase+off%(size/n):], ct)
						return nil
					}
					_, err := f.WriteAt(ct, off)
					return err
				}
			})
		})
	}
}

// rawAESRate measures single-core AES-256-GCM sealing of 4 KiB for about d, in bytes per
// second: BenchmarkRawAESGCM's loop, timed by hand.
func rawAESRate(d time.Duration) float64 {
	blk, _ := aes.NewCipher(make([]byte, 32))
	g, _ := cipher.NewGCM(blk)
	pt, dst, nonce := make([]byte, 4096), make([]byte, 0, 4096+16), make([]byte, 12)
	start := time.Now()
	n := 0
	for time.Since(start) < d {
		for range 256 {
			g.Seal(dst[:0], nonce, pt, nil)
		}
		n += 256
	}
	return float64(n) * 4096 / time.Since(start).Seconds()
}

// BenchmarkRawAESGCM is the ceiling: AES-256-GCM sealing of 4 KiB on one core.
func BenchmarkRawAESGCM(b *testing.B) {
	key := make([]byte, 32)
	blk, _ := aes.NewCipher(key)
	g, _ := cipher.NewGCM(blk)
	pt, dst, nonce := make([]byte, 4096), make([]byte, 0, 4096+16), make([]byte, 12)
	b.SetBytes(4096)
	for b.Loop() {
		g.Seal(dst[:0], nonce, pt, nil)
	}
	b.ReportMetric(float64(runtime.GOMAXPROCS(0)), "cores")
}

// BenchmarkRawIO is the other floor under the engine's figures: 64 KiB random pread and pwrite
// of a 1 GiB file in the same place as BenchmarkEngine's image, one goroutine, no crypto. An
// engine read costs at least one pread plus the AES of its sectors, a write one pwrite plus
// the AES (and its journal records), so these bound what share of raw AES the engine can reach.
func BenchmarkRawIO(b *testing.B) {
	const size, bs = 1 << 30, 65536
	f, err := store.CreateFile(filepath.Join(benchDir(b), "raw.img"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4<<20)
	rand.New(rand.NewSource(1)).Read(buf)
	for off := int64(0); off < size; off += int64(len(buf)) {
		if _, err := f.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
	}
	// Writes always go through pwrite (a store into a mapped page that is not resident
	// makes the kernel read it from disk first), so only reads have a mapped variant.
	for _, op := range []string{"pread", "pwrite", "mapped-read"} {
		mapped := op == "mapped-read"
		if err := f.SetMapped(mapped); err != nil {
			b.Fatal(err)
		}
		if mapped != (f.Mapped() == size) {
			b.Fatalf("mapping %v: %d bytes mapped", mapped, f.Mapped())
		}
		b.Run(op+"-64k", func(b *testing.B) {
			r := rand.New(rand.NewSource(2))
			p := buf[:bs]
			b.SetBytes(bs)
			for b.Loop() {
				off := r.Int63n(size/bs) * bs
				if op == "pread" || op == "mapped-read" {
					_, err = f.ReadAt(p, off)
				} else {
					_, err = f.WriteAt(p, off)
				}
				if err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// benchDepth is the number of requests in flight: 32, the queue depth of the anchors' random
// 4 KiB fio jobs (../shared/bench); SEALDISK_BENCH_DEPTH overrides it.
var benchDepth = func() int {
	n := 32
	fmt.Sscan(os.Getenv("SEALDISK_BENCH_DEPTH"), &n)
	return n
}()

// benchShards: SEALDISK_BENCH_SHARDS overrides the default (one per core).
var benchShards = func() int {
	var n int
	fmt.Sscan(os.Getenv("SEALDISK_BENCH_SHARDS"), &n)
	return n
}()

// BenchmarkFlushDirtyPages: the latency of a flush after 1,000 writes of 4 KiB, each in
// another metadata page (so the commit's tree root covers 1,000 changed leaves), with and
// without the integrity tree; reports p50 and p99 in ms. SEALDISK_BENCH_DIR puts the image on
// a disk's file system (the default is tmpfs, where a sync is free).
func BenchmarkFlushDirtyPages(b *testing.B) {
	for _, l := range []struct {
		name string
		l    format.Layout
	}{{"tree", format.Layout{}}, {"notree", format.Layout{NoTree: true}}} {
		b.Run(l.name, func(b *testing.B) {
			const size = 1 << 30
			im := newTestImageLayout(b, size, 4096, l.l)
			p := filepath.Join(benchDir(b), "vm.img")
			f, err := store.CreateFile(p)
			if err != nil {
				b.Fatal(err)
			}
			defer os.Remove(p)
			im.create(b, f)
			e := New(Options{CacheBytes: 64 << 20})
			defer e.Close()
			d := im.attach(b, e, 1, f)
			buf := make([]byte, 4096)
			r := rand.New(rand.NewSource(1))
			pages := int64(size / 4096 / entriesPerPage)
			var lat []time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				for _, pg := range r.Perm(int(pages))[:1000] {
					r.Read(buf)
					must(b, d.WriteAt(ctx, buf, (int64(pg)*entriesPerPage+r.Int63n(entriesPerPage))*4096, false))
				}
				b.StartTimer()
				t0 := time.Now()
				must(b, d.Flush(ctx))
				lat = append(lat, time.Since(t0))
			}
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
		})
	}
}
