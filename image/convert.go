package image

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/sealdisk/sealdisk/internal/zeros"
	"github.com/sealdisk/sealdisk/sector"
	"github.com/sealdisk/sealdisk/store"
)

// chunkBytes is the unit of bulk conversion: large enough that syscalls are rare, small
// enough that each worker's buffers stay small.
const chunkBytes = 1 << 20

// Progress is called with bytes done out of total; it must be cheap and goroutine-safe.
type Progress func(done, total int64)

// extents returns the data ranges of f in [0, size), using SEEK_DATA/SEEK_HOLE so that a
// mostly-sparse input is walked in time proportional to its data, not its size.
func extents(f *os.File, size int64) ([][2]int64, error) {
	ext, err := store.Extents(int(f.Fd()), 0, size)
	if err != nil {
		return nil, fmt.Errorf("failed to map %s: %w", f.Name(), err)
	}
	return ext, nil
}

// chunks splits extents into chunk-aligned sector ranges [first, end) of at most chunkBytes.
func chunks(ext [][2]int64, ss, sectors int64) [][2]int64 {
	ext = slices.Clone(ext)
	slices.SortFunc(ext, func(a, b [2]int64) int { return cmp.Compare(a[0], b[0]) })
	per := chunkBytes / ss
	var out [][2]int64
	next := int64(0) // first sector not yet covered, so adjacent extents never repeat a chunk
	for _, e := range ext {
		first := max(e[0]/ss, next)
		end := min((e[1]+ss-1)/ss, sectors)
		for first < end {
			stop := min((first/per+1)*per, end)
			out = append(out, [2]int64{first, stop})
			first = stop
		}
		next = max(next, end)
	}
	return out
}

// parallel runs fn for each job on GOMAXPROCS workers, stopping at the first error.
func parallel(ctx context.Context, jobs [][2]int64, fn func(w int, job [2]int64) error) error {
	n := min(runtime.GOMAXPROCS(0), max(len(jobs), 1))
	var next atomic.Int64
	var once sync.Once
	var first error
	var failed atomic.Bool
	var wg sync.WaitGroup
	for w := 0; w < n; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for !failed.Load() {
				i := next.Add(1) - 1
				if i >= int64(len(jobs)) {
					return
				}
				err := ctx.Err()
				if err == nil {
					err = fn(w, jobs[i])
				}
				if err != nil {
					once.Do(func() { first = err })
					failed.Store(true)
				}
			}
		}(w)
	}
	wg.Wait()
	return first
}

// writeEntries writes the chunk's entries, skipping 4 KiB metadata pages that are all zero
// so never-written sectors cost no metadata space.
func writeEntries(img *Image, first int64, ents []byte) error {
	const page = 4096
	pos := img.Header.EntryPos(uint64(first))
	for off := 0; off < len(ents); {
		end := min(off+page-int((pos+int64(off))%page), len(ents))
		if !zeros.All(ents[off:end]) {
			if _, err := img.Store.WriteAt(ents[off:end], pos+int64(off)); err != nil {
				return fmt.Errorf("failed to write metadata: %w", err)
			}
		}
		off = end
	}
	return nil
}

// Seal encrypts the raw file src into img (a freshly created image with the same virtual
// size rounded up). All-zero input sectors and input holes stay holes.
func Seal(ctx context.Context, src *os.File, img *Image, sess *sector.Session, progress Progress) error {
	h := img.Header
	ss := int64(h.SectorSize)
	fi, err := src.Stat()
	if err != nil {
		return fmt.Errorf("failed to stat input: %w", err)
	}
	size := fi.Size()
	if uint64(size) > h.VirtualSize {
		return fmt.Errorf("input is %d bytes, larger than the image's %d", size, h.VirtualSize)
	}
	ext, err := extents(src, size)
	if err != nil {
		return err
	}
	jobs := chunks(ext, ss, int64(h.Sectors()))
	var total int64
	for _, j := range jobs {
		total += (j[1] - j[0]) * ss
	}
	var done atomic.Int64
	type bufs struct{ in, out, ents []byte }
	per := chunkBytes / ss
	ws := make([]bufs, runtime.GOMAXPROCS(0))
	for i := range ws {
		ws[i] = bufs{make([]byte, chunkBytes), make([]byte, chunkBytes+sector.TagSize), make([]byte, per*sector.EntrySize)}
	}
	err = parallel(ctx, jobs, func(w int, j [2]int64) error {
		b := ws[w]
		n := (j[1] - j[0]) * ss
		in := b.in[:n]
		got, err := src.ReadAt(in, j[0]*ss)
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("failed to read input at %d: %w", j[0]*ss, err)
		}
		clear(in[got:]) // the last sector of an odd-sized input is zero padded
		ents := b.ents[:(j[1]-j[0])*sector.EntrySize]
		clear(ents)
		// Seal forward: sector i's transient tag lands in out[i+1]'s head, overwritten next.
		runStart := int64(-1)
		flush := func(end int64) error {
			if runStart < 0 {
				return nil
			}
			if _, err := img.Store.WriteAt(b.out[runStart*ss:end*ss], h.DataPos(uint64(j[0]+runStart))); err != nil {
				return fmt.Errorf("failed to write data: %w", err)
			}
			runStart = -1
			return nil
		}
		for i := int64(0); i < j[1]-j[0]; i++ {
			pt := in[i*ss : (i+1)*ss]
			if zeros.All(pt) {
				if err := flush(i); err != nil {
					return err
				}
				continue
			}
			var e sector.Entry
			sess.Seal(uint64(j[0]+i), b.out[i*ss:(i+1)*ss], pt, &e)
			copy(ents[i*sector.EntrySize:], e[:])
			if runStart < 0 {
				runStart = i
			}
		}
		if err := flush(j[1] - j[0]); err != nil {
			return err
		}
		if err := writeEntries(img, j[0], ents); err != nil {
			return err
		}
		if progress != nil {
			progress(done.Add(n), total)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return img.Store.Sync()
}

// Output is where Unseal writes plaintext: a raw file, or (Upgrade) a new image.
type Output interface {
	io.WriterAt
	Truncate(size int64) error
	Sync() error
}

// Overlay holds entries recovered from the journal that supersede the metadata region.
type Overlay map[uint64]sector.Entry

// Unseal decrypts img into dst (truncated to the virtual size). Never-written sectors and
// all-zero plaintext stay holes. The first sector that fails authentication stops it with an
// error naming the sector.
func Unseal(ctx context.Context, img *Image, c *sector.Cipher, ov Overlay, dst Output, progress Progress) error {
	h := img.Header
	ss := int64(h.SectorSize)
	sectors := int64(h.Sectors())
	if err := dst.Truncate(0); err != nil {
		return fmt.Errorf("failed to truncate output: %w", err)
	}
	if err := dst.Truncate(int64(h.VirtualSize)); err != nil {
		return fmt.Errorf("failed to size output: %w", err)
	}
	// Walk the metadata region's data: sectors whose metadata page is a hole were never written.
	metaExt, err := metaExtents(img)
	if err != nil {
		return err
	}
	for lba := range ov {
		metaExt = append(metaExt, [2]int64{int64(lba), int64(lba) + 1})
	}
	jobs := chunks(scale(metaExt, ss), ss, sectors)
	var total int64
	for _, j := range jobs {
		total += (j[1] - j[0]) * ss
	}
	per := chunkBytes / ss
	type bufs struct{ ct, out, ents []byte }
	ws := make([]bufs, runtime.GOMAXPROCS(0))
	for i := range ws {
		ws[i] = bufs{make([]byte, chunkBytes), make([]byte, chunkBytes+sector.TagSize), make([]byte, per*sector.EntrySize)}
	}
	var done atomic.Int64
	err = parallel(ctx, jobs, func(w int, j [2]int64) error {
		b := ws[w]
		cnt := j[1] - j[0]
		ents := b.ents[:cnt*sector.EntrySize]
		if _, err := img.Store.ReadAt(ents, h.EntryPos(uint64(j[0]))); err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("failed to read metadata: %w", err)
		}
		if len(ov) > 0 {
			for i := int64(0); i < cnt; i++ {
				if e, ok := ov[uint64(j[0]+i)]; ok {
					copy(ents[i*sector.EntrySize:], e[:])
				}
			}
		}
		if zeros.All(ents) {
			return nil
		}
		ct := b.ct[:cnt*ss]
		if _, err := img.Store.ReadAt(ct, h.DataPos(uint64(j[0]))); err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("failed to read data: %w", err)
		}
		runStart := int64(-1)
		flush := func(end int64) error {
			if runStart < 0 {
				return nil
			}
			if _, err := dst.WriteAt(b.out[runStart*ss:end*ss], (j[0]+runStart)*ss); err != nil {
				return fmt.Errorf("failed to write output: %w", err)
			}
			runStart = -1
			return nil
		}
		for i := int64(0); i < cnt; i++ {
			var e sector.Entry
			copy(e[:], ents[i*sector.EntrySize:])
			out := b.out[i*ss : (i+1)*ss]
			if err := c.Open(uint64(j[0]+i), out, ct[i*ss:(i+1)*ss], &e); err != nil {
				return err
			}
			if e.IsZero() || zeros.All(out) {
				if err := flush(i); err != nil {
					return err
				}
				continue
			}
			if runStart < 0 {
				runStart = i
			}
		}
		if err := flush(cnt); err != nil {
			return err
		}
		if progress != nil {
			progress(done.Add(cnt*ss), total)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return dst.Sync()
}

// metaExtents lists sector ranges whose metadata is allocated.
func metaExtents(img *Image) ([][2]int64, error) {
	h := img.Header
	ext, err := img.Store.Extents(int64(h.MetaOffset), int64(h.MetaOffset+h.MetaSize))
	if err != nil {
		return nil, err
	}
	var out [][2]int64
	for _, e := range ext {
		first := (e[0] - int64(h.MetaOffset)) / sector.EntrySize
		end := min((e[1]-int64(h.MetaOffset)+sector.EntrySize-1)/sector.EntrySize, int64(h.Sectors()))
		if first < end {
			out = append(out, [2]int64{first, end})
		}
	}
	return out, nil
}

func scale(ext [][2]int64, ss int64) [][2]int64 {
	out := make([][2]int64, len(ext))
	for i, e := range ext {
		out[i] = [2]int64{e[0] * ss, e[1] * ss}
	}
	return out
}
