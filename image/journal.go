package image

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/sealdisk/sealdisk/sector"
)

// JournalState describes the journal of an image (FORMAT.md §6) and, after Recover, what the
// in-memory replay chose for each record.
type JournalState struct {
	Epoch   uint64 // 0: empty journal
	Records int    // valid records of the current epoch

	// Filled by Recover.
	UsedNew    int      // write records whose new entry authenticates the data on disk
	UsedOld    int      // write records rolled back to the old entry (the data write did not land)
	Trimmed    int      // zero records (trim / write-zeroes) completed
	Unresolved []uint64 // journaled LBAs none of whose records matched the data: left as on disk
	Ignored    error    // the journal header failed its checks, so Recover skipped the journal
}

// journalBatch is how much of the journal is read per syscall while scanning records.
const journalBatch = 1 << 20

// ReadJournal scans the journal and returns its valid records of the current epoch, in
// order. A header that fails its MAC is an error; scanning stops at the first invalid record.
func ReadJournal(img *Image, c *sector.Cipher) (JournalState, []sector.JournalRecord, error) {
	h := img.Header
	hdr := make([]byte, sector.JournalHeaderSize)
	if _, err := img.Store.ReadAt(hdr, int64(h.JournalOffset)); err != nil && !errors.Is(err, io.EOF) {
		return JournalState{}, nil, fmt.Errorf("failed to read journal header: %w", err)
	}
	epoch, err := c.ParseJournalHeader(hdr)
	if err != nil {
		return JournalState{}, nil, fmt.Errorf("failed to read journal: %w", err)
	}
	st := JournalState{Epoch: epoch}
	if epoch == 0 {
		return st, nil, nil
	}
	var recs []sector.JournalRecord
	capacity := (h.JournalSize - sector.JournalHeaderSize) / sector.JournalRecordSize
	buf := make([]byte, journalBatch)
	base := int64(h.JournalOffset) + sector.JournalHeaderSize
	for i := uint64(0); i < capacity; {
		n := min(capacity-i, journalBatch/sector.JournalRecordSize)
		b := buf[:n*sector.JournalRecordSize]
		if _, err := img.Store.ReadAt(b, base+int64(i)*sector.JournalRecordSize); err != nil && !errors.Is(err, io.EOF) {
			return st, nil, fmt.Errorf("failed to read journal records from %d: %w", i, err)
		}
		for k := uint64(0); k < n; k, i = k+1, i+1 {
			r, err := c.ParseJournalRecord(b[k*sector.JournalRecordSize : (k+1)*sector.JournalRecordSize])
			if err != nil || r.Epoch != epoch || r.Seq != i || r.LBA >= h.Sectors() {
				st.Records = len(recs)
				return st, recs, nil
			}
			recs = append(recs, r)
		}
	}
	st.Records = len(recs)
	return st, recs, nil
}

// PeekJournal reports the journal's epoch and the number of records that look valid, without
// the image key: neither the header's nor the records' MACs are checked, so the answer is a
// hint for inspect, not a recovery decision. A header that is neither all zero nor starts
// with the journal magic is an error.
func PeekJournal(img *Image) (JournalState, error) {
	h := img.Header
	hdr := make([]byte, sector.JournalHeaderSize)
	if _, err := img.Store.ReadAt(hdr, int64(h.JournalOffset)); err != nil && !errors.Is(err, io.EOF) {
		return JournalState{}, fmt.Errorf("failed to read journal header: %w", err)
	}
	if isZero(hdr) {
		return JournalState{}, nil
	}
	if string(hdr[:8]) != "SDJOURN1" {
		return JournalState{}, fmt.Errorf("%w: journal header magic is %q", sector.ErrJournal, hdr[:8])
	}
	st := JournalState{Epoch: binary.BigEndian.Uint64(hdr[8:16])}
	if st.Epoch == 0 {
		return st, nil
	}
	capacity := (h.JournalSize - sector.JournalHeaderSize) / sector.JournalRecordSize
	buf := make([]byte, journalBatch)
	base := int64(h.JournalOffset) + sector.JournalHeaderSize
	for i := uint64(0); i < capacity; {
		n := min(capacity-i, journalBatch/sector.JournalRecordSize)
		b := buf[:n*sector.JournalRecordSize]
		if _, err := img.Store.ReadAt(b, base+int64(i)*sector.JournalRecordSize); err != nil && !errors.Is(err, io.EOF) {
			return st, fmt.Errorf("failed to read journal records from %d: %w", i, err)
		}
		for k := uint64(0); k < n; k, i = k+1, i+1 {
			r := b[k*sector.JournalRecordSize:]
			if !bytes.Equal(r[:4], []byte("SDJR")) || binary.BigEndian.Uint64(r[8:16]) != st.Epoch ||
				binary.BigEndian.Uint64(r[16:24]) != i {
				return st, nil
			}
			st.Records++
		}
	}
	return st, nil
}

// Recover applies FORMAT.md §6 recovery in memory: for each journaled sector it picks the
// entry that authenticates the data on disk, records in order so the last match wins. It
// writes nothing (read-only tools use it); the returned state says what it chose.
//
// A journal header that fails its MAC is ignored, as FORMAT.md §6 says (JournalState.Ignored
// carries why): a sector it left inconsistent then fails authentication by name.
func Recover(img *Image, c *sector.Cipher) (Overlay, JournalState, error) {
	st, recs, err := ReadJournal(img, c)
	if errors.Is(err, sector.ErrJournal) {
		return nil, JournalState{Ignored: err}, nil
	}
	if err != nil || len(recs) == 0 {
		return nil, st, err
	}
	ss := int(img.Header.SectorSize)
	ct := make([]byte, ss)
	pt := make([]byte, ss, ss+sector.TagSize)
	defer clear(pt)
	ov := Overlay{}
	matched := map[uint64]bool{} // per journaled LBA: did any of its records match?
	for _, r := range recs {
		if r.Kind == sector.RecordZero {
			ov[r.LBA] = sector.Entry{}
			st.Trimmed++
			matched[r.LBA] = true
			continue
		}
		if !matched[r.LBA] {
			matched[r.LBA] = false
		}
		if _, err := img.Store.ReadAt(ct, img.Header.DataPos(r.LBA)); err != nil && !errors.Is(err, io.EOF) {
			return nil, st, fmt.Errorf("failed to read sector %d for journal recovery: %w", r.LBA, err)
		}
		switch {
		case c.Open(r.LBA, pt, ct, &r.New) == nil:
			ov[r.LBA] = r.New
			st.UsedNew++
		case r.Old.IsZero() && isZero(ct):
			ov[r.LBA] = sector.Entry{}
			st.UsedOld++
		case !r.Old.IsZero() && c.Open(r.LBA, pt, ct, &r.Old) == nil:
			ov[r.LBA] = r.Old
			st.UsedOld++
		default:
			continue // leave the sector as it is
		}
		matched[r.LBA] = true
	}
	for lba, ok := range matched {
		if !ok {
			st.Unresolved = append(st.Unresolved, lba)
		}
	}
	slices.Sort(st.Unresolved)
	return ov, st, nil
}
