package engine

import (
	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/sector"
	"github.com/sealdisk/sealdisk/store"
)

// liveV1Journal is the number of records a version-1 image's journal seems to hold (no key
// needed): the engine reads version-1 images only when there are none, since it does not
// replay that journal (the offline tools do).
func liveV1Journal(st store.Store, h *format.Header) (int, error) {
	_, n, err := sector.PeekJournal(st, h)
	return n, err
}
