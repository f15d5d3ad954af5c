package sector

import (
	"strings"
	"testing"

	"github.com/sealdisk/sealdisk/format"
)

// TestPlacedBlockHeader: a placed block names up to 29 sectors with their new and old entries,
// which parse back as written; it holds no ciphertext (4096 bytes whatever its count), and a
// zero new entry does not fit its kind.
func TestPlacedBlockHeader(t *testing.T) {
	h := &format.Header{UUID: vecUUID, SectorSize: 4096, VirtualSize: 1 << 30, JournalOffset: format.JournalOffset}
	prev := ChainStart(vecUUID, 3)
	ents := make([]LogEntry, PlacedEntries)
	for i := range ents {
		ents[i].LBA = uint64(100 + i)
		ents[i].Entry[0], ents[i].Entry[63] = byte(i+1), 0xaa
		ents[i].Old[1], ents[i].Old[62] = byte(i+2), 0x55
	}
	ents[4].Old = Entry{} // the sector was never written before
	hdr := make([]byte, BlockHeaderSize)
	d := MarshalBlockHeader(hdr, BlockPlaced, 3, 5, 8192, prev, ents)
	blk, err := parseBlockHeader(hdr, h, 3, 5, 8192, prev)
	if err != nil {
		t.Fatal(err)
	}
	if blk.Kind != BlockPlaced || blk.Digest != d || len(blk.Ents) != len(ents) {
		t.Fatalf("parsed kind %d, %d entries", blk.Kind, len(blk.Ents))
	}
	for i := range ents {
		if blk.Ents[i] != ents[i] {
			t.Fatalf("entry %d parses as %+v, written %+v", i, blk.Ents[i], ents[i])
		}
	}
	if n := BlockLen(BlockPlaced, PlacedEntries, 4096); n != BlockHeaderSize {
		t.Fatalf("a placed block takes %d bytes of the journal", n)
	}
	func() {
		defer func() {
			if recover() == nil {
				t.Fatal("a placed block of 30 sectors was marshalled")
			}
		}()
		MarshalBlockHeader(hdr, BlockPlaced, 3, 5, 8192, prev, make([]LogEntry, PlacedEntries+1))
	}()
	ents[2].Entry = Entry{}
	MarshalBlockHeader(hdr, BlockPlaced, 3, 5, 8192, prev, ents)
	if _, err := parseBlockHeader(hdr, h, 3, 5, 8192, prev); err == nil || !strings.Contains(err.Error(), "does not fit the block's kind") {
		t.Fatalf("a placed block with a zero new entry: %v", err)
	}
}
