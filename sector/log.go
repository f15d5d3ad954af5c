package sector

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/internal/zeros"
)

// The version-2 data journal (FORMAT.md §6.2): a run of blocks from the start of the journal
// region, each a 4096-byte header naming up to Entries(kind) sectors with their new entries,
// followed (kind data) by their ciphertexts, sector after sector; a placed block names each
// sector's old entry too, its ciphertext being written in the data region instead. Each header carries the chain
// digest of the block before it and ends with its own, so the root record's head digest
// authenticates every block it commits; each sector's AEAD tag authenticates its data.
//
//	header (4096): magic "SDJB" | kind u8 | 0 | count u16 | epoch u64 | seq u64 | pos u64 |
//	               prev (32) | count × (lba u64 | entry (64) [| old entry (64), placed]) | zero |
//	               digest (32) at 4064
//	digest = SHA-256 of header bytes [0, 4064)
//	chain start of an epoch = SHA-256("sealdisk v2 journal" || image_uuid || u64(epoch))

const (
	BlockHeaderSize = 4096
	BlockEntries    = 55 // per data or zero block: (4064 − 64) / 72
	PlacedEntries   = 29 // per placed block: (4064 − 64) / 136

	BlockData   = 1 // sectors written: entries and ciphertexts
	BlockZero   = 2 // sectors trimmed or zeroed: entries zero, no data
	BlockPlaced = 3 // sectors written in place: new and old entries, no data

	blockMagic     = "SDJB"
	blockDigestOff = BlockHeaderSize - 32
	chainLabel     = "sealdisk v2 journal"
)

// LogEntry is one sector of a block: its LBA and its new entry (zero in a zero block); in a
// placed block also the entry it had before (Old), which recovery falls back to when the new
// ciphertext did not reach the data region.
type LogEntry struct {
	LBA   uint64
	Entry Entry
	Old   Entry
}

// Entries is the most sectors one block of kind names.
func Entries(kind uint8) int {
	if kind == BlockPlaced {
		return PlacedEntries
	}
	return BlockEntries
}

// entrySize is the bytes one sector takes in a header of kind.
func entrySize(kind uint8) int {
	if kind == BlockPlaced {
		return 8 + 2*EntrySize
	}
	return 8 + EntrySize
}

// Block is one parsed journal block.
type Block struct {
	Kind    uint8
	Seq     uint64
	Pos     uint64 // offset of its header in the journal region
	Ents    []LogEntry
	DataPos int64 // file offset of its first ciphertext (kind data)
	Digest  [32]byte
}

// BlockLen is the bytes a block of n sectors takes in the journal.
func BlockLen(kind uint8, n, sectorSize int) int {
	if kind == BlockData {
		return BlockHeaderSize + n*sectorSize
	}
	return BlockHeaderSize
}

// ChainStart is the chain digest before an epoch's first block.
func ChainStart(uuid [16]byte, epoch uint64) [32]byte {
	b := make([]byte, 0, len(chainLabel)+24)
	b = append(b, chainLabel...)
	b = append(b, uuid[:]...)
	b = binary.BigEndian.AppendUint64(b, epoch)
	return sha256.Sum256(b)
}

// MarshalBlockHeader writes a block header into dst (BlockHeaderSize) and returns its digest,
// the chain digest after the block.
func MarshalBlockHeader(dst []byte, kind uint8, epoch, seq, pos uint64, prev [32]byte, ents []LogEntry) [32]byte {
	if len(dst) != BlockHeaderSize || len(ents) == 0 || kind < BlockData || kind > BlockPlaced || len(ents) > Entries(kind) {
		panic(fmt.Sprintf("BUG: sector: block header of kind %d with %d entries into %d bytes", kind, len(ents), len(dst)))
	}
	clear(dst)
	copy(dst, blockMagic)
	dst[4] = kind
	binary.BigEndian.PutUint16(dst[6:], uint16(len(ents)))
	binary.BigEndian.PutUint64(dst[8:], epoch)
	binary.BigEndian.PutUint64(dst[16:], seq)
	binary.BigEndian.PutUint64(dst[24:], pos)
	copy(dst[32:64], prev[:])
	es := entrySize(kind)
	for i, e := range ents {
		o := 64 + i*es
		binary.BigEndian.PutUint64(dst[o:], e.LBA)
		if kind != BlockZero {
			copy(dst[o+8:o+72], e.Entry[:])
		}
		if kind == BlockPlaced {
			copy(dst[o+72:o+136], e.Old[:])
		}
	}
	d := sha256.Sum256(dst[:blockDigestOff])
	copy(dst[blockDigestOff:], d[:])
	return d
}

// parseBlockHeader checks a header against where the chain says it must be: its epoch, seq,
// position and the previous digest.
func parseBlockHeader(b []byte, h *format.Header, epoch, seq, pos uint64, prev [32]byte) (*Block, error) {
	bad := func(why string, args ...any) (*Block, error) {
		return nil, fmt.Errorf("%w: journal block %d at %d: %s", ErrJournal, seq, pos, fmt.Sprintf(why, args...))
	}
	if string(b[:4]) != blockMagic {
		return bad("magic is %q", b[:4])
	}
	if d := sha256.Sum256(b[:blockDigestOff]); [32]byte(b[blockDigestOff:]) != d {
		return bad("digest does not match (torn or changed)")
	}
	blk := &Block{Kind: b[4], Seq: seq, Pos: pos, Digest: [32]byte(b[blockDigestOff:])}
	n := int(binary.BigEndian.Uint16(b[6:]))
	if blk.Kind < BlockData || blk.Kind > BlockPlaced {
		return bad("kind %d", blk.Kind)
	}
	es := entrySize(blk.Kind)
	switch {
	case b[5] != 0:
		return bad("reserved byte is not zero")
	case n == 0 || n > Entries(blk.Kind):
		return bad("%d entries", n)
	case binary.BigEndian.Uint64(b[8:]) != epoch || binary.BigEndian.Uint64(b[16:]) != seq || binary.BigEndian.Uint64(b[24:]) != pos:
		return bad("epoch %d, seq %d, pos %d where the chain expects %d, %d, %d", binary.BigEndian.Uint64(b[8:]), binary.BigEndian.Uint64(b[16:]), binary.BigEndian.Uint64(b[24:]), epoch, seq, pos)
	case [32]byte(b[32:64]) != prev:
		return bad("does not follow the block before it")
	case !zeros.All(b[64+n*es : blockDigestOff]):
		return bad("padding is not zero")
	}
	for i := range n {
		o := 64 + i*es
		e := LogEntry{LBA: binary.BigEndian.Uint64(b[o:])}
		copy(e.Entry[:], b[o+8:o+72])
		if blk.Kind == BlockPlaced {
			copy(e.Old[:], b[o+72:o+136])
		}
		if e.LBA >= h.Sectors() {
			return bad("sector %d beyond the %d-sector disk", e.LBA, h.Sectors())
		}
		if blk.Kind != BlockZero && e.Entry.IsZero() || blk.Kind == BlockZero && !e.Entry.IsZero() {
			return bad("entry of sector %d does not fit the block's kind", e.LBA)
		}
		blk.Ents = append(blk.Ents, e)
	}
	blk.DataPos = int64(h.JournalOffset + pos + BlockHeaderSize)
	return blk, nil
}

// ReadLog reads the journal blocks of epoch that a root record commits: [0, head) of the
// journal region, whose last block's digest must be headDigest. Every block header must
// follow the chain and every sector of a data block must open under its entry: anything else
// means the record's commit did not reach the disk whole, and is an error wrapping ErrJournal
// (the caller falls back to the other root record). A placed block's sectors are in the data
// region, which recovery checks (the engine), not here.
func (c *Cipher) ReadLog(r io.ReaderAt, h *format.Header, epoch, head uint64, headDigest [32]byte) ([]Block, error) {
	ss := int64(h.SectorSize)
	prev := ChainStart(h.UUID, epoch)
	hdr := make([]byte, BlockHeaderSize)
	ct := make([]byte, ss)
	pt := make([]byte, ss, ss+TagSize)
	defer clear(pt)
	var out []Block
	for pos, seq := uint64(0), uint64(0); pos < head; seq++ {
		if pos+BlockHeaderSize > head {
			return nil, fmt.Errorf("%w: committed head %d ends inside the block at %d", ErrJournal, head, pos)
		}
		if _, err := r.ReadAt(hdr, int64(h.JournalOffset+pos)); err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("failed to read journal block at %d: %w", pos, err)
		}
		blk, err := parseBlockHeader(hdr, h, epoch, seq, pos, prev)
		if err != nil {
			return nil, err
		}
		if blk.Kind == BlockData {
			for i, e := range blk.Ents {
				n, err := r.ReadAt(ct, blk.DataPos+int64(i)*ss)
				if err != nil && !errors.Is(err, io.EOF) {
					return nil, fmt.Errorf("failed to read journal block %d's sector %d: %w", seq, e.LBA, err)
				}
				clear(ct[n:])
				if err := c.Open(e.LBA, pt, ct, &e.Entry); err != nil {
					return nil, fmt.Errorf("%w: journal block %d: sector %d does not open (%v)", ErrJournal, seq, e.LBA, err)
				}
			}
		}
		pos += uint64(BlockLen(blk.Kind, len(blk.Ents), int(ss)))
		if pos > head {
			return nil, fmt.Errorf("%w: journal block %d runs past the committed head %d", ErrJournal, seq, head)
		}
		prev = blk.Digest
		out = append(out, *blk)
	}
	if prev != headDigest {
		return nil, fmt.Errorf("%w: the journal's chain ends at another digest than the root record's", ErrJournal)
	}
	return out, nil
}
