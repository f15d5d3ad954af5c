package engine

// inPlaceChunk is the most bytes one pwrite puts in the data region. The page cache sizes a
// folio by the write that creates it (ext4 since Linux 6.16 caches a file in folios of up to
// 2 MiB), and every later one-sector write into a folio, and the writeback of it, walks each
// block of the whole folio: after 1 MiB writes placed in one pwrite each, random 4 KiB writes
// ran a third slower (ext4_block_write_begin 27 % of the server's cycles against 9 %). Chunks
// of 64 KiB keep the folios small enough for random writes and large enough for sequential
// ones (BENCHMARKS.md, "folio size of in-place writes").
const inPlaceChunk = 64 << 10

// writeData writes ciphertexts at pos of the data region, in chunks of at most inPlaceChunk.
func (d *Disk) writeData(b []byte, pos int64) error {
	for len(b) > 0 {
		n := min(inPlaceChunk, len(b))
		if _, err := d.st.WriteAt(b[:n], pos); err != nil {
			return err
		}
		b, pos = b[n:], pos+int64(n)
	}
	return nil
}
