package engine

import (
	"errors"
	"fmt"
	"io"

	"github.com/sealdisk/sealdisk/sector"
)

// recover replays the journal at attach (FORMAT.md §6): sector.Cipher.Decide decides every
// journaled sector's entry in memory, then each decided sector is written and the image
// synced before a new epoch retires the records.
func (j *journal) recover() error {
	d := j.d
	epoch, recs, err := d.c.ReadJournal(d.st, d.h, j.capacity)
	if errors.Is(err, sector.ErrJournal) {
		// A header that fails its MAC never covered an in-place write: start afresh.
		d.e.opts.Logger.Warn("journal header invalid; starting a new journal", "error", err)
		epoch, recs, err = 0, nil, nil
	}
	if err != nil {
		return err
	}
	rp, err := d.c.Decide(recs, func(lba uint64, ct []byte) error {
		n, err := d.st.ReadAt(ct, d.h.DataPos(lba))
		clear(ct[n:]) // past the end of a sparse file: zeros
		if errors.Is(err, io.EOF) {
			err = nil
		}
		return err
	})
	if err != nil {
		return err
	}
	// Each decided sector's data is written again too, as read: after a failed sync, the
	// page cache can hold data that reads see but that never reached the disk, and no later
	// sync writes it unless it is written again (syncs.go). The sync below then makes entry
	// and data durable together, before the new epoch retires their records.
	ct := make([]byte, d.ss)
	for _, lba := range rp.Order {
		e := rp.Entries[lba]
		if err := d.writeSector(lba, &e, ct); err != nil {
			return fmt.Errorf("recovery: %w", err)
		}
	}
	if err := d.st.Sync(); err != nil {
		return fmt.Errorf("failed to sync recovery: %w", err)
	}
	if len(rp.Order) > 0 {
		d.e.opts.Logger.Info("recovered journal", "epoch", epoch, "records", len(rp.Order))
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if err := j.newEpochLocked(epoch + 1); err != nil {
		return err
	}
	if err := d.st.Sync(); err != nil {
		return fmt.Errorf("failed to sync journal header: %w", err)
	}
	j.fresh = false
	return nil
}
