package engine

import (
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/store"
)

// syncer makes an image's writes durable and keeps count of the syncs that failed.
//
// On Linux a failed fdatasync may drop the writes it could not write: reads still see them, a
// later sync that succeeds does not write them, and of concurrent syncs of one file only one
// learns of the failure. So syncs are serialised and every failure is counted before any later
// sync returns, and a sync vouches only for writes made since a mark (the count read before
// them): since fails when another sync failed after the mark. A commit that sees a failure
// since the last good commit writes the journal's blocks since then again, and a checkpoint
// that sees one in its epoch writes the whole epoch in place again, before either trusts a
// sync (commit.go, checkpoint.go; FORMAT.md §6.2).
type syncer struct {
	st    store.Store
	stats *Stats
	log   *slog.Logger
	asid  psp.ASID

	mu    sync.Mutex            // held for each sync, so failures are counted in order
	fails atomic.Uint64         // failed syncs so far
	lost  atomic.Pointer[error] // the first failure since the last checkpoint (logged once)
	last  atomic.Pointer[error] // the latest failure
}

// mark is the failure count to pass to since, read before the writes it is to vouch for.
func (s *syncer) mark() uint64 { return s.fails.Load() }

// since syncs the image. It fails when this sync fails, or when another failed after mark,
// since that one may have dropped the writes made after mark.
func (s *syncer) since(mark uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.st.Sync(); err != nil {
		s.last.Store(&err)
		s.fails.Add(1)
		s.stats.SyncFailures.Add(1)
		if s.lost.CompareAndSwap(nil, &err) {
			s.log.Error("sync of the image failed; writes before it may be missing on disk, so the journal and the journaled sectors are written again before a sync is trusted",
				"asid", s.asid, "error", err)
		}
		return err
	}
	if s.fails.Load() != mark {
		return fmt.Errorf("a sync of the image failed after these writes were made: %w", *s.last.Load())
	}
	return nil
}

// checkpointed forgets the first failure once a checkpoint has written everything again and
// no sync failed after mark.
func (s *syncer) checkpointed(mark uint64) {
	if s.fails.Load() == mark {
		s.lost.Store(nil)
	}
}
