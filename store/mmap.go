package store

import (
	"fmt"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// maxMapped is the largest file mapped; larger ones use pread only. It keeps the address space
// (128 TiB on amd64) available for many images.
const maxMapped = 4 << 40

// warmBlock is the granularity of the record of which parts of the mapping are in memory.
const warmBlock = 64 << 10

// mapping is a shared read-only mapping of a whole file. A read that lies inside it is a memory
// copy instead of a pread: a 64 KiB pread of a page-cached file costs about twice the copy on
// the machines measured (BENCHMARKS.md), the same order as the AES-GCM the engine spends on
// those bytes. Writes stay pwrite: a store to a page not in memory would make the kernel read
// the page from disk first, which a whole-page pwrite never does.
//
// Page faults on the mapping replace the syscall's work, and must not cost more:
//   - MADV_RANDOM: a fault reads only its page, not the 128 KiB around it (read-around of a
//     sparse image at random reads and maps holes: 4x slower and 6x the resident pages measured).
//   - So that large cold reads still cost one I/O, not one per page, warm records which 64 KiB
//     blocks were read through the mapping: a read touching a block not yet warm first asks
//     for its exact range with MADV_WILLNEED (one batched read, as pread would issue).
//   - A copy much slower than memory (the kernel evicted the pages, and the faults read them
//     back one by one) marks its blocks cold again.
//
// Failures that pread would report as an error arrive as SIGBUS on a mapping (the file was
// truncated underneath, a device error): the copy runs with debug.SetPanicOnFault and a fault
// inside the mapping becomes an EIO error for that call.
type mapping struct {
	mu     sync.RWMutex // read-held for a copy through m; write-held to map, unmap or close
	m      []byte       // the file's [0, len(m)); nil when unmapped
	warm   []atomic.Uint64
	on     bool // mapping wanted (SetMapped)
	closed bool
}

// mapLocked maps f at its current size when mapping is on and the file is a non-empty regular
// file no larger than maxMapped. A filesystem that cannot map (mmap fails) keeps pread: the
// mapping is an optimisation, never a requirement. mu is write-held.
func (mp *mapping) mapLocked(f *os.File) error {
	if !mp.on || mp.closed {
		return nil
	}
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("failed to stat %s: %w", f.Name(), err)
	}
	if !fi.Mode().IsRegular() || fi.Size() == 0 || fi.Size() > maxMapped || int64(int(fi.Size())) != fi.Size() {
		return nil
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil
	}
	if err := unix.Madvise(m, unix.MADV_RANDOM); err != nil {
		unix.Munmap(m)
		return fmt.Errorf("failed to madvise the mapping of %s: %w", f.Name(), err)
	}
	mp.m = m
	mp.warm = make([]atomic.Uint64, (fi.Size()+64*warmBlock-1)/(64*warmBlock))
	return nil
}

// unmapLocked removes the mapping; mu is write-held, so no copy is using it.
func (mp *mapping) unmapLocked() {
	if mp.m != nil {
		if err := unix.Munmap(mp.m); err != nil {
			panic(fmt.Sprintf("BUG: store: munmap of a live mapping: %v", err))
		}
		mp.m, mp.warm = nil, nil
	}
}

// readMapped copies [off, off+len(p)) from the mapping when it lies inside it; ok false means
// the caller must pread.
func (mp *mapping) readMapped(p []byte, off int64, f *os.File) (n int, ok bool, err error) {
	if len(p) == 0 || off < 0 {
		return 0, false, nil
	}
	mp.mu.RLock()
	defer mp.mu.RUnlock()
	if off > int64(len(mp.m))-int64(len(p)) {
		return 0, false, nil
	}
	end := off + int64(len(p))
	region := mp.m[off:end]
	first, last := off/warmBlock, (end-1)/warmBlock
	mp.adviseUnlessWarm(off, end)
	start := time.Now()
	if err := faultCopy(p, region, region); err != nil {
		mp.setWarm(first, last, false)
		return 0, true, &os.PathError{Op: "read (mapped)", Path: f.Name(), Err: err}
	}
	mp.setWarm(first, last, time.Since(start) < time.Duration(len(p)>>12+1)*warmPer4K)
	return len(p), true, nil
}

// readAheadMapped asks for [off, off+n) with MADV_WILLNEED unless its blocks are warm; false when
// the range is not inside the mapping.
func (mp *mapping) readAheadMapped(off, n int64) bool {
	if n <= 0 || off < 0 {
		return true
	}
	mp.mu.RLock()
	defer mp.mu.RUnlock()
	if off > int64(len(mp.m))-n {
		return false
	}
	mp.adviseUnlessWarm(off, off+n)
	return true
}

// adviseUnlessWarm asks for the mapping's [off, end) with MADV_WILLNEED (one batched read)
// unless its blocks are warm. mu is read-held and the range lies inside the mapping.
func (mp *mapping) adviseUnlessWarm(off, end int64) {
	if !mp.isWarm(off/warmBlock, (end-1)/warmBlock) {
		pg := off &^ int64(os.Getpagesize()-1)
		_ = unix.Madvise(mp.m[pg:end], unix.MADV_WILLNEED) // advice: a failure only costs speed
	}
}

func (mp *mapping) isWarm(first, last int64) bool {
	for b := first; b <= last; b++ {
		if mp.warm[b/64].Load()&(1<<(b%64)) == 0 {
			return false
		}
	}
	return true
}

func (mp *mapping) setWarm(first, last int64, warm bool) {
	for b := first; b <= last; b++ {
		w, bit := &mp.warm[b/64], uint64(1)<<(b%64)
		if warm && w.Load()&bit == 0 {
			w.Or(bit)
		} else if !warm && w.Load()&bit != 0 {
			w.And(^bit)
		}
	}
}

// warmPer4K is the copy time per 4 KiB below which the copied blocks count as in memory: 1 µs
// is 4 GB/s, slower than any memory copy and faster than any disk read. A variable for tests.
var warmPer4K = time.Microsecond

// errMappedFault is what a copy that faulted on the mapping returns: an I/O error, so every
// caller treats it as it treats a failed pread.
var errMappedFault = fmt.Errorf("page fault in the file mapping (file truncated underneath, or a device error): %w", syscall.EIO)

// faultCopy is copy(dst, src) where a memory fault inside region — the mapped side — returns
// errMappedFault instead of crashing the process. Any other fault is re-raised.
func faultCopy(dst, src, region []byte) (err error) {
	defer func() {
		r := recover()
		if r == nil {
			return
		}
		if f, ok := r.(interface{ Addr() uintptr }); ok {
			lo := uintptr(unsafe.Pointer(unsafe.SliceData(region)))
			if a := f.Addr(); a >= lo && a < lo+uintptr(len(region)) {
				err = errMappedFault
				return
			}
		}
		panic(r)
	}()
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	copy(dst, src)
	return nil
}
