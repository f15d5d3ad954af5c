package engine

import (
	"errors"
	"fmt"
	"io"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/sector"
	"github.com/sealdisk/sealdisk/tree"
)

// Origin is the committed state a version-2 image's attach chose (FORMAT.md §8): for the
// offline tools' reports, which must not choose it a second time.
type Origin struct {
	Record format.RootRecord // the root record in use
	// Recovered counts the committed journal blocks that were not yet in place: a
	// read-write attach wrote them in place and checked the tree they make against
	// Record.Root; a read-only attach refuses such an image.
	Recovered int
	Other     error // why the other slot's record was not used; nil: it held an older valid one
}

// open chooses a version-2 image's committed state (FORMAT.md §8) and, for a writable attach,
// recovers it (§6.2): the committed journal blocks are written in place, their pages and the
// tree brought up to date, the tree's root checked against the record's, and a new epoch
// begun. A record behind the PSP's counter refuses the attach (psp.ErrRolledBack).
func (d *Disk) open() error {
	com, err := d.c.CurrentRoot(d.st, d.h, d.roots.CheckRoot)
	if err != nil {
		return err
	}
	rec := com.Rec
	d.origin = Origin{Record: *rec, Recovered: len(com.Blocks), Other: com.Other}
	if com.Other != nil {
		d.e.opts.Logger.Warn("using the older root record", "asid", d.asid, "seq", rec.Seq, "other", com.Other)
	}
	if err := d.roots.Admit(rec); err != nil {
		return err
	}
	d.cs = commitState{seq: rec.Seq, slot: com.Slot, counter: rec.Counter, adv: admitted()}
	if d.readOnly {
		if len(com.Blocks) > 0 {
			return fmt.Errorf("the image's journal holds %d committed blocks not yet in place: attach it read-write once (which recovers them), or unseal it", len(com.Blocks))
		}
		if d.h.Tree {
			d.tree = tree.New(d.h, d.st, rec.Root, d.e.opts.TreeNodes)
		}
		return nil
	}
	root, err := d.replay(rec, com.Blocks)
	if err != nil {
		return err
	}
	d.meta.hashed = d.tree != nil
	d.jr.reset(rec.Epoch)
	d.ckpt.Lock()
	defer d.ckpt.Unlock()
	return d.nextEpochLocked(rec.Epoch+1, root)
}

// replay brings the committed blocks' sectors in place and their pages and tree nodes up to
// date, checking that the tree they make has the record's root, and syncs (FORMAT.md §6.2).
// Each sector takes one version (decide): its last one in the journal, or, for a placed block
// the record does not name settled whose new ciphertext is not in place, the one before.
func (d *Disk) replay(rec *format.RootRecord, blocks []sector.Block) ([32]byte, error) {
	pages := map[uint64][]byte{} // pages the blocks touch, as the record's root has them
	for _, b := range blocks {
		for _, e := range b.Ents {
			idx := e.LBA / entriesPerPage
			pg := pages[idx]
			if pg == nil {
				pg = make([]byte, format.MetaPageSize)
				n := min(entriesPerPage, d.sectors-idx*entriesPerPage) * format.MetaEntrySize
				if _, err := d.st.ReadAt(pg[:n], d.h.EntryPos(idx*entriesPerPage)); err != nil && !errors.Is(err, io.EOF) {
					return [32]byte{}, fmt.Errorf("failed to recover: failed to read metadata: %w", err)
				}
				pages[idx] = pg
			}
			copy(pg[(e.LBA%entriesPerPage)*format.MetaEntrySize:], e.Entry[:])
		}
	}
	if d.h.Tree {
		t := tree.New(d.h, d.st, rec.Root, d.e.opts.TreeNodes)
		if len(pages) > 0 {
			var err error
			if t, err = tree.Recovering(d.h, d.st, d.e.opts.TreeNodes); err != nil {
				return [32]byte{}, fmt.Errorf("failed to recover: %w", err)
			}
			for idx, pg := range pages {
				if err := t.SetLeaf(idx, tree.LeafDigest(d.h.UUID, idx, pg)); err != nil {
					return [32]byte{}, fmt.Errorf("failed to recover: %w", err)
				}
			}
			if got := t.Root(); got != rec.Root {
				d.e.Stats.AuthFailures.Add(1)
				return [32]byte{}, fmt.Errorf("%w: after replaying the journal the integrity tree's root is %x, the committed root record (seq %d) says %x: the image was changed by more than a crash",
					ErrIntegrity, got[:8], rec.Seq, rec.Root[:8])
			}
			t.Trust()
		}
		d.tree = t
	}
	vs, err := d.decide(rec, blocks)
	if err != nil {
		return [32]byte{}, fmt.Errorf("failed to recover: %w", err)
	}
	back := map[uint64]bool{} // pages with a sector that falls back to its older version
	for lba, v := range vs {
		slot := pages[lba/entriesPerPage][(lba%entriesPerPage)*format.MetaEntrySize:][:format.MetaEntrySize]
		if sector.Entry(slot) != v.entry {
			copy(slot, v.entry[:])
			back[lba/entriesPerPage] = true
		}
	}
	if d.tree != nil {
		for idx := range back {
			if err := d.tree.SetLeaf(idx, tree.LeafDigest(d.h.UUID, idx, pages[idx])); err != nil {
				return [32]byte{}, fmt.Errorf("failed to recover: %w", err)
			}
		}
	}
	if err := d.writeVersions(blocks, vs, nil); err != nil {
		return [32]byte{}, fmt.Errorf("failed to recover: %w", err)
	}
	for idx, pg := range pages {
		if err := d.writePage(idx, pg); err != nil {
			return [32]byte{}, fmt.Errorf("failed to recover: %w", err)
		}
	}
	if d.tree != nil {
		if err := d.tree.WriteBack(); err != nil {
			return [32]byte{}, fmt.Errorf("failed to recover: %w", err)
		}
	}
	if err := d.st.Sync(); err != nil {
		return [32]byte{}, fmt.Errorf("failed to sync recovery: %w", err)
	}
	if len(blocks) > 0 {
		d.e.opts.Logger.Info("recovered journal", "asid", d.asid, "epoch", rec.Epoch, "blocks", len(blocks))
	}
	root := rec.Root
	if d.tree != nil {
		root = d.tree.Root() // the record's, unless a sector fell back to its older version
	}
	return root, nil
}

// decide picks each sector's version among the committed blocks, in order. A data or zero
// block's is its own; so is a placed block's the record names settled (rec.Settled): its
// ciphertext was in place before a sync that preceded the record, so only its new entry may
// open what is in place now — an older ciphertext put back fails its reads. A placed block
// past that may have been cut short by the crash: its new entry if it opens the ciphertext in
// place; else its old entry if that does (a zero one: the sector was unwritten); else the
// version before it in the journal, whose ciphertext is not in place yet; with none, the old
// entry (the sector was damaged by more than a crash, and its reads fail).
func (d *Disk) decide(rec *format.RootRecord, blocks []sector.Block) (map[uint64]version, error) {
	ss := d.ss
	ct := make([]byte, ss)
	pt := make([]byte, ss, ss+sector.TagSize)
	defer clear(pt)
	opens := func(lba uint64, e *sector.Entry) bool { return d.c.Open(lba, pt, ct, e) == nil }
	vs := map[uint64]version{}
	for bi := range blocks {
		b := &blocks[bi]
		for i, e := range b.Ents {
			if b.Kind != sector.BlockPlaced || b.Seq < uint64(rec.Settled) {
				vs[e.LBA] = version{bi, i, e.Entry}
				continue
			}
			n, err := d.st.ReadAt(ct, d.h.DataPos(e.LBA))
			if err != nil && !errors.Is(err, io.EOF) {
				return nil, fmt.Errorf("failed to read sector %d in place: %w", e.LBA, err)
			}
			clear(ct[n:])
			_, before := vs[e.LBA]
			switch {
			case opens(e.LBA, &e.Entry):
				vs[e.LBA] = version{bi, i, e.Entry}
			case e.Old.IsZero():
				vs[e.LBA] = version{bi, i, sector.Entry{}}
			case opens(e.LBA, &e.Old) || !before:
				vs[e.LBA] = version{bi, i, e.Old}
			}
		}
	}
	return vs, nil
}
