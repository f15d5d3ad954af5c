package engine

import "github.com/sealdisk/sealdisk/dma"

// span is the part of one sector that a descriptor's guest buffer covers: buffer bytes
// [lo, hi) hold the sector's bytes from off on. Only a descriptor's first and last sectors
// can be partial.
type span struct{ lo, hi, off int64 }

// spanOf is the span of sector i (0-based in the descriptor) of sector size ss.
func spanOf(desc *dma.Descriptor, i, ss int64) span {
	start := i*ss - int64(desc.Head) // sector i's first byte, relative to the buffer
	lo := max(0, start)
	return span{lo: lo, hi: min(int64(desc.Len), start+ss), off: lo - start}
}

// len is the number of bytes covered.
func (s span) len() int64 { return s.hi - s.lo }

// runSpan is the guest buffer bytes [lo, hi) covered by sectors i..j-1 of desc, and where in
// sector i they begin.
func runSpan(desc *dma.Descriptor, i, j, ss int64) span {
	first, last := spanOf(desc, i, ss), spanOf(desc, j-1, ss)
	return span{lo: first.lo, hi: last.hi, off: first.off}
}

// forRuns calls fn(i, j) for each run [i, j) of consecutive sectors among n sectors in
// ascending order, sector i being lba(i): one system call per run instead of per sector.
func forRuns(n int, lba func(i int) uint64, fn func(i, j int) error) error {
	for i := 0; i < n; {
		j := i + 1
		for j < n && lba(j) == lba(j-1)+1 {
			j++
		}
		if err := fn(i, j); err != nil {
			return err
		}
		i = j
	}
	return nil
}
