package sector

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/internal/zeros"
)

// The journal's reading and its recovery rule (FORMAT.md §6) live here, beside its bytes, so
// that the engine (which recovers and writes) and the offline tools (which replay in memory)
// decide every journaled sector the same way.

// JournalCapacity is the number of record slots of an image's journal region.
func JournalCapacity(h *format.Header) uint64 {
	return (h.JournalSize - JournalHeaderSize) / JournalRecordSize
}

// JournalRecordPos is the file offset of record slot i.
func JournalRecordPos(h *format.Header, i uint64) int64 {
	return int64(h.JournalOffset) + JournalHeaderSize + int64(i)*JournalRecordSize
}

// journalBatch is how much of the journal is read per call while scanning records.
const journalBatch = 1 << 20

// ReadJournal reads the journal of the image with header h through r and returns its epoch
// (0: empty) and the valid records of that epoch in slot order: scanning stops at the first
// slot whose magic, MAC, epoch, seq or LBA is not valid, and scans at most capacity slots
// (JournalCapacity, or fewer when a writer was configured to use fewer). A header that fails
// its checks is an error wrapping ErrJournal.
func (c *Cipher) ReadJournal(r io.ReaderAt, h *format.Header, capacity uint64) (epoch uint64, recs []JournalRecord, err error) {
	hdr := make([]byte, JournalHeaderSize)
	if _, err := r.ReadAt(hdr, int64(h.JournalOffset)); err != nil && !errors.Is(err, io.EOF) {
		return 0, nil, fmt.Errorf("failed to read journal header: %w", err)
	}
	if epoch, err = c.ParseJournalHeader(hdr); err != nil || epoch == 0 {
		return 0, nil, err
	}
	err = scanSlots(r, h, capacity, func(i uint64, b []byte) bool {
		rec, err := c.ParseJournalRecord(b)
		if err != nil || rec.Epoch != epoch || rec.Seq != i || rec.LBA >= h.Sectors() {
			return false
		}
		recs = append(recs, rec)
		return true
	})
	return epoch, recs, err
}

// PeekJournal reports the journal's epoch and how many records of that epoch look valid,
// without the image key: no MAC is checked, so the answer is a hint for inspect, never a
// recovery decision. A header that is neither all zero nor starts with the journal magic is
// an error wrapping ErrJournal.
func PeekJournal(r io.ReaderAt, h *format.Header) (epoch uint64, records int, err error) {
	hdr := make([]byte, JournalHeaderSize)
	if _, err := r.ReadAt(hdr, int64(h.JournalOffset)); err != nil && !errors.Is(err, io.EOF) {
		return 0, 0, fmt.Errorf("failed to read journal header: %w", err)
	}
	if zeros.All(hdr) {
		return 0, 0, nil
	}
	if string(hdr[:8]) != journalMagic {
		return 0, 0, fmt.Errorf("%w: journal header magic is %q", ErrJournal, hdr[:8])
	}
	if epoch = binary.BigEndian.Uint64(hdr[8:16]); epoch == 0 {
		return 0, 0, nil
	}
	err = scanSlots(r, h, JournalCapacity(h), func(i uint64, b []byte) bool {
		if string(b[:4]) != recordMagic || binary.BigEndian.Uint64(b[8:16]) != epoch || binary.BigEndian.Uint64(b[16:24]) != i {
			return false
		}
		records++
		return true
	})
	return epoch, records, err
}

// scanSlots reads record slots from 0 on, at most capacity of them, in batches, and calls
// next for each until it returns false.
func scanSlots(r io.ReaderAt, h *format.Header, capacity uint64, next func(i uint64, rec []byte) bool) error {
	buf := make([]byte, min(journalBatch, capacity*JournalRecordSize))
	for i := uint64(0); i < capacity; {
		n := min(capacity-i, uint64(len(buf))/JournalRecordSize)
		b := buf[:n*JournalRecordSize]
		if _, err := r.ReadAt(b, JournalRecordPos(h, i)); err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("failed to read journal records from %d: %w", i, err)
		}
		for k := uint64(0); k < n; k, i = k+1, i+1 {
			if !next(i, b[k*JournalRecordSize:(k+1)*JournalRecordSize]) {
				return nil
			}
		}
	}
	return nil
}

// Replay is what recovery decides for a journal's records (FORMAT.md §6).
type Replay struct {
	// Entries is the decided entry of each decided sector; Order lists those sectors in the
	// order of their first decision (the order the engine writes them in).
	Entries map[uint64]Entry
	Order   []uint64

	UsedNew    int      // write records whose new entry authenticates the data on disk
	UsedOld    int      // write records whose old entry does (the data write did not land)
	Trimmed    int      // zero records (trim / write-zeroes), completed
	Unresolved []uint64 // journaled sectors none of whose records matches the data, sorted
}

// Decide applies the recovery rule to recs, in order, deciding in memory: a zero record
// decides the zero entry; a write record decides whichever of its entries authenticates the
// sector's data on disk (Authentic), else leaves an earlier decision standing (with none, the
// sector was damaged by more than a crash and keeps failing its reads). Nothing is written
// while deciding: punching a trimmed sector before a later write record of it is checked
// would destroy the data that record made durable. data reads sector lba's ciphertext into
// ct (zeros past the end of the file).
func (c *Cipher) Decide(recs []JournalRecord, data func(lba uint64, ct []byte) error) (*Replay, error) {
	rp := &Replay{Entries: map[uint64]Entry{}}
	ss := c.SectorSize()
	ct := make([]byte, ss)
	pt := make([]byte, ss, ss+TagSize)
	defer clear(pt)
	journaled := map[uint64]bool{}
	decide := func(lba uint64, e Entry) {
		if _, ok := rp.Entries[lba]; !ok {
			rp.Order = append(rp.Order, lba)
		}
		rp.Entries[lba] = e
	}
	for i := range recs {
		r := &recs[i]
		journaled[r.LBA] = true
		if r.Kind == RecordZero {
			decide(r.LBA, Entry{})
			rp.Trimmed++
			continue
		}
		if err := data(r.LBA, ct); err != nil {
			return nil, fmt.Errorf("failed to read sector %d for journal recovery: %w", r.LBA, err)
		}
		e, ok := c.Authentic(r.LBA, pt, ct, &r.Old, &r.New)
		if !ok {
			continue
		}
		if e == r.New {
			rp.UsedNew++
		} else {
			rp.UsedOld++
		}
		decide(r.LBA, e)
	}
	for lba := range journaled {
		if _, ok := rp.Entries[lba]; !ok {
			rp.Unresolved = append(rp.Unresolved, lba)
		}
	}
	slices.Sort(rp.Unresolved)
	return rp, nil
}

// Authentic is a write record's verdict on ct, the data on disk of sector lba: its new entry
// if that authenticates ct, else its old one (an all-zero old entry matches all-zero data); ok
// is false when neither does. pt is scratch for the plaintext (sector size, cap + TagSize).
func (c *Cipher) Authentic(lba uint64, pt, ct []byte, old, new *Entry) (e Entry, ok bool) {
	switch {
	case c.Open(lba, pt, ct, new) == nil:
		return *new, true
	case old.IsZero() && zeros.All(ct):
		return Entry{}, true
	case !old.IsZero() && c.Open(lba, pt, ct, old) == nil:
		return *old, true
	}
	return Entry{}, false
}
