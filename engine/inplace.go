package engine

import "fmt"

// inPlaceChunk is the most bytes one pwrite puts in the data region. The page cache sizes a
// folio by the write that creates it (ext4 since Linux 6.16 caches a file in folios of up to
// 2 MiB), and every later one-sector write into a folio, and the writeback of it, walks each
// block of the whole folio: after 1 MiB writes placed in one pwrite each, random 4 KiB writes
// ran a third slower (ext4_block_write_begin 27 % of the server's cycles against 9 %). Chunks
// of 64 KiB keep the folios small enough for random writes and large enough for sequential
// ones (BENCHMARKS.md, "folio size of in-place writes").
const inPlaceChunk = 64 << 10

// writeData writes the ciphertexts b of consecutive sectors from lba on in place, in
// chunks of at most inPlaceChunk.
func (d *Disk) writeData(b []byte, lba uint64) error {
	for pos, rest := d.h.DataPos(lba), b; len(rest) > 0; {
		n := min(inPlaceChunk, len(rest))
		if _, err := d.st.WriteAt(rest[:n], pos); err != nil {
			return fmt.Errorf("failed to write sectors %d..%d in place: %w", lba, lba+uint64(len(b))/uint64(d.ss)-1, err)
		}
		rest, pos = rest[n:], pos+int64(n)
	}
	return nil
}
