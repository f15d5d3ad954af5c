package sector

import (
	"errors"
	"fmt"
	"io"

	"github.com/sealdisk/sealdisk/format"
)

// Committed is the state a version-2 image's current root record commits: the record, the
// slot it is in, and the journal blocks it covers, in order.
type Committed struct {
	Rec    *format.RootRecord
	Slot   int
	Blocks []Block
	// Other says why the other slot was not used (nil: it held an older, valid record).
	Other error
}

// ErrNoCommit: neither root record slot holds a record that authenticates and whose journal is
// whole.
var ErrNoCommit = errors.New("no committed state: neither root record is valid")

// CurrentRoot reads both root record slots, keeps those that parse and that check (the PSP's
// authentication) accepts, and returns the one with the highest seq whose journal blocks
// ReadLog finds whole; a newer record whose commit did not reach the disk whole loses to the
// older (FORMAT.md §8, "Choosing a record").
func (c *Cipher) CurrentRoot(r io.ReaderAt, h *format.Header, check func(rec *format.RootRecord, body, auth []byte) error) (*Committed, error) {
	type cand struct {
		rec *format.RootRecord
		err error
	}
	var cs [2]cand
	slot := make([]byte, format.RootSlotSize)
	for i := range 2 {
		if _, err := r.ReadAt(slot, h.RootSlotPos(i)); err != nil && !errors.Is(err, io.EOF) {
			cs[i].err = fmt.Errorf("failed to read root record slot %d: %w", i, err)
			continue
		}
		rec, body, auth, err := format.ParseRootSlot(slot, h)
		if err == nil {
			err = check(rec, body, auth)
		}
		cs[i] = cand{rec, err}
		clear(slot)
	}
	order := []int{0, 1}
	if cs[0].err == nil && cs[1].err == nil && cs[1].rec.Seq > cs[0].rec.Seq || cs[0].err != nil {
		order = []int{1, 0}
	}
	var errs [2]error
	for _, i := range order {
		if cs[i].err != nil {
			errs[i] = cs[i].err
			continue
		}
		blocks, err := c.ReadLog(r, h, cs[i].rec.Epoch, cs[i].rec.Head, cs[i].rec.HeadDigest)
		if err != nil {
			errs[i] = fmt.Errorf("root record seq %d: %w", cs[i].rec.Seq, err)
			continue
		}
		return &Committed{Rec: cs[i].rec, Slot: i, Blocks: blocks, Other: errs[1-i]}, nil
	}
	return nil, fmt.Errorf("%w: slot 0: %v; slot 1: %v", ErrNoCommit, errs[0], errs[1])
}

// FirstRoot is the record a new version-2 image starts from (FORMAT.md §8): seq 1, counter 0,
// the empty epoch 0, and root, the tree's root over what was written (zero for a blank image
// or one without the tree). The caller sets Auth and authenticates its body.
func FirstRoot(h *format.Header, root [32]byte) *format.RootRecord {
	rec := format.RootFor(h)
	rec.Seq, rec.HeadDigest = 1, ChainStart(h.UUID, 0)
	if h.Tree {
		rec.Root = root
	}
	return rec
}
