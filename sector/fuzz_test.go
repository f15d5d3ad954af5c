package sector

import (
	"bytes"
	"errors"
	"testing"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/internal/zeros"
)

// FuzzOpen: no entry and data but the authentic ones open, failures name the LBA, and no
// plaintext is released on failure.
func FuzzOpen(f *testing.F) {
	c := newCipher(f, format.SuiteAES256GCM, 512)
	sess, err := c.newSession(&vecSalt)
	if err != nil {
		f.Fatal(err)
	}
	ct, e := sealed(f, sess, 7)
	f.Add(uint64(7), ct, e[:])
	f.Add(uint64(8), ct, e[:])
	f.Add(uint64(7), ct, make([]byte, EntrySize))
	f.Fuzz(func(t *testing.T, lba uint64, data, entry []byte) {
		if len(data) != 512 || len(entry) != EntrySize {
			return
		}
		var fe Entry
		copy(fe[:], entry)
		out := buf(512)
		err := c.Open(lba, out, data, &fe)
		switch {
		case fe.IsZero():
			if err != nil || !zeros.All(out) {
				t.Fatalf("zero entry: %v", err)
			}
		case err == nil:
			if lba != 7 || fe != e || !bytes.Equal(data, ct) {
				t.Fatalf("forged sector opened: lba %d entry %x", lba, fe)
			}
		default:
			var ae *AuthError
			if !errors.As(err, &ae) || ae.LBA != lba || !zeros.All(out[:cap(out)]) {
				t.Fatalf("failure %v", err)
			}
		}
	})
}

// FuzzParseJournal: the parsers never panic, and whatever they accept re-encodes to the
// same bytes.
func FuzzParseJournal(f *testing.F) {
	c := newCipher(f, format.SuiteAES256GCM, 4096)
	rec := make([]byte, JournalRecordSize)
	c.MarshalJournalRecord(&JournalRecord{Kind: RecordWrite, Epoch: 1, LBA: 7, New: Entry{1}}, rec)
	hdr := make([]byte, JournalHeaderSize)
	c.MarshalJournalHeader(3, hdr)
	f.Add(rec)
	f.Add(hdr[:JournalRecordSize])
	f.Add(make([]byte, JournalRecordSize))
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > JournalHeaderSize {
			return
		}
		if len(b) == JournalRecordSize {
			if r, err := c.ParseJournalRecord(b); err == nil {
				again := make([]byte, JournalRecordSize)
				c.MarshalJournalRecord(&r, again)
				if !bytes.Equal(again, b) {
					t.Fatalf("record %x re-encodes as %x", b, again)
				}
			}
		}
		h := make([]byte, JournalHeaderSize)
		copy(h, b)
		if epoch, err := c.ParseJournalHeader(h); err == nil {
			again := make([]byte, JournalHeaderSize)
			c.MarshalJournalHeader(epoch, again)
			if !bytes.Equal(again, h) {
				t.Fatalf("header re-encodes differently (epoch %d)", epoch)
			}
		}
	})
}

// FuzzParseBlockHeader: a journal block header never panics the parser, and one that parses
// (its digest, chain position and entries all valid) re-marshals to the same bytes.
func FuzzParseBlockHeader(f *testing.F) {
	h, err := format.NewHeader(vecUUID, 1<<30, 4096, format.SuiteAES256GCM, false, format.Layout{}, nil)
	if err != nil {
		h = &format.Header{UUID: vecUUID, SectorSize: 4096, VirtualSize: 1 << 30, JournalOffset: format.JournalOffset}
	}
	prev := ChainStart(vecUUID, 1)
	for _, kind := range []uint8{BlockData, BlockZero, BlockPlaced} {
		ents := []LogEntry{{LBA: 7}, {LBA: 9}}
		if kind != BlockZero {
			ents[0].Entry[0], ents[1].Entry[3] = 1, 2
		}
		if kind == BlockPlaced {
			ents[1].Old[5] = 3
		}
		hdr := make([]byte, BlockHeaderSize)
		MarshalBlockHeader(hdr, kind, 1, 0, 0, prev, ents)
		f.Add(hdr)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		hdr := make([]byte, BlockHeaderSize)
		copy(hdr, data)
		blk, err := parseBlockHeader(hdr, h, 1, 0, 0, prev)
		if err != nil {
			return
		}
		again := make([]byte, BlockHeaderSize)
		if MarshalBlockHeader(again, blk.Kind, 1, 0, 0, prev, blk.Ents) != blk.Digest || !bytes.Equal(again, hdr) {
			t.Fatal("a parsed block header re-marshals differently")
		}
	})
}
