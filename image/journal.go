package image

import (
	"errors"
	"fmt"
	"io"

	"github.com/sealdisk/sealdisk/sector"
)

// JournalState describes the journal of an image (FORMAT.md §6).
type JournalState struct {
	Epoch   uint64 // 0: empty journal
	Records int    // valid records of the current epoch
}

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
	buf := make([]byte, sector.JournalRecordSize)
	capacity := (h.JournalSize - sector.JournalHeaderSize) / sector.JournalRecordSize
	for i := uint64(0); i < capacity; i++ {
		off := int64(h.JournalOffset) + sector.JournalHeaderSize + int64(i)*sector.JournalRecordSize
		if _, err := img.Store.ReadAt(buf, off); err != nil && !errors.Is(err, io.EOF) {
			return st, nil, fmt.Errorf("failed to read journal record %d: %w", i, err)
		}
		r, err := c.ParseJournalRecord(buf)
		if err != nil || r.Epoch != epoch || r.Seq != i || r.LBA >= h.Sectors() {
			break
		}
		recs = append(recs, r)
	}
	st.Records = len(recs)
	return st, recs, nil
}

// Recover applies FORMAT.md §6 recovery in memory: for each journaled sector it picks the
// entry that authenticates the data on disk. It writes nothing (read-only tools use it).
func Recover(img *Image, c *sector.Cipher) (Overlay, JournalState, error) {
	st, recs, err := ReadJournal(img, c)
	if err != nil || len(recs) == 0 {
		return nil, st, err
	}
	ss := int(img.Header.SectorSize)
	ct := make([]byte, ss)
	pt := make([]byte, ss, ss+sector.TagSize)
	ov := Overlay{}
	for _, r := range recs {
		if r.Kind == sector.RecordZero {
			ov[r.LBA] = sector.Entry{}
			continue
		}
		if _, err := img.Store.ReadAt(ct, img.Header.DataPos(r.LBA)); err != nil && !errors.Is(err, io.EOF) {
			return nil, st, fmt.Errorf("failed to read sector %d for journal recovery: %w", r.LBA, err)
		}
		switch {
		case c.Open(r.LBA, pt, ct, &r.New) == nil:
			ov[r.LBA] = r.New
		case r.Old.IsZero() && isZero(ct):
			ov[r.LBA] = sector.Entry{}
		case !r.Old.IsZero() && c.Open(r.LBA, pt, ct, &r.Old) == nil:
			ov[r.LBA] = r.Old
		}
	}
	clear(pt)
	return ov, st, nil
}
