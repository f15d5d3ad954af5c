package image

import (
	"errors"
	"fmt"
	"io"

	"github.com/sealdisk/sealdisk/sector"
)

// JournalState describes the journal of an image (FORMAT.md §6) and, after Recover, what the
// in-memory replay chose for each record. The journal's bytes and its recovery rule belong to
// package sector; this is what the offline tools report of them.
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

// ReadJournal scans the journal and returns its valid records of the current epoch, in
// order. A header that fails its MAC is an error; scanning stops at the first invalid record.
func ReadJournal(img *Image, c *sector.Cipher) (JournalState, []sector.JournalRecord, error) {
	epoch, recs, err := c.ReadJournal(img.Store, img.Header, sector.JournalCapacity(img.Header))
	if err != nil {
		return JournalState{}, nil, fmt.Errorf("failed to read journal: %w", err)
	}
	return JournalState{Epoch: epoch, Records: len(recs)}, recs, nil
}

// PeekJournal reports the journal's epoch and the number of records that look valid, without
// the image key (sector.PeekJournal): a hint for inspect, not a recovery decision.
func PeekJournal(img *Image) (JournalState, error) {
	epoch, n, err := sector.PeekJournal(img.Store, img.Header)
	return JournalState{Epoch: epoch, Records: n}, err
}

// Recover applies FORMAT.md §6 recovery in memory (sector.Cipher.Decide): the returned overlay
// holds each decided sector's entry. It writes nothing (read-only tools use it).
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
	rp, err := c.Decide(recs, func(lba uint64, ct []byte) error {
		n, err := img.Store.ReadAt(ct, img.Header.DataPos(lba))
		clear(ct[n:])
		if errors.Is(err, io.EOF) {
			err = nil
		}
		return err
	})
	if err != nil {
		return nil, st, err
	}
	st.UsedNew, st.UsedOld, st.Trimmed, st.Unresolved = rp.UsedNew, rp.UsedOld, rp.Trimmed, rp.Unresolved
	return Overlay(rp.Entries), st, nil
}
