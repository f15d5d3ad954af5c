package image

import (
	"crypto"
	"errors"
	"fmt"
	"io"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/internal/zeros"
	"github.com/sealdisk/sealdisk/provider"
	"github.com/sealdisk/sealdisk/sector"
	"github.com/sealdisk/sealdisk/tree"
)

// WriteFirstRoot completes a new version-2 image (create, seal): it builds the integrity tree
// over the metadata pages written so far (FORMAT.md §7), writes its nodes, and writes the
// provider's first root record over that root into slot 0 (§8), then syncs. A version-1
// image needs none of this.
func (img *Image) WriteFirstRoot(signer crypto.Signer) error {
	return img.writeFirstRoot(format.RootByProvider, func(body []byte) ([]byte, error) { return provider.SignRoot(signer, body) })
}

// writeFirstRoot is WriteFirstRoot with the record authenticated by auth, as kind.
func (img *Image) writeFirstRoot(kind format.RootAuth, auth func(body []byte) ([]byte, error)) error {
	h := img.Header
	if h.Version < format.HeaderVersion2 {
		return nil
	}
	var root tree.Digest
	if h.Tree {
		var err error
		if root, err = img.buildTree(); err != nil {
			return err
		}
	}
	rec := sector.FirstRoot(h, root)
	rec.Auth = kind
	body := rec.MarshalBody()
	a, err := auth(body)
	if err != nil {
		return err
	}
	if _, err := img.Store.WriteAt(format.MarshalRootSlot(body, a), h.RootSlotPos(0)); err != nil {
		return fmt.Errorf("failed to write the first root record: %w", err)
	}
	return img.Store.Sync()
}

// buildTree writes the integrity tree over the metadata pages that hold an entry (the others
// are the zero leaf of a never-written page) and returns its root.
func (img *Image) buildTree() (tree.Digest, error) { return img.computeTree(img.Store) }

// TreeRoot recomputes the integrity tree's root from the metadata region, writing nothing
// (scrub compares it with the committed root record's).
func (img *Image) TreeRoot() (tree.Digest, error) { return img.computeTree(nil) }

func (img *Image) computeTree(st tree.Store) (tree.Digest, error) {
	b := tree.NewBuilder(img.Header, st)
	err := img.eachMetaPage(func(idx uint64, pg []byte) error {
		return b.Add(idx, tree.LeafDigest(img.Header.UUID, idx, pg))
	})
	if err != nil {
		return tree.Digest{}, err
	}
	return b.Root()
}

// eachMetaPage calls fn, in page order, for every metadata page that is not all zeros,
// walking only the allocated part of the metadata region (store.Image.Extents). pg is the
// whole page, zero past the last sector's entry.
func (img *Image) eachMetaPage(fn func(idx uint64, pg []byte) error) error {
	h := img.Header
	metaEnd := int64(h.MetaOffset + h.Sectors()*format.MetaEntrySize)
	ext, err := img.Store.Extents(int64(h.MetaOffset), metaEnd)
	if err != nil {
		return fmt.Errorf("failed to map the metadata region: %w", err)
	}
	pg := make([]byte, format.MetaPageSize)
	next := uint64(0)
	for _, e := range ext {
		first := max(uint64(e[0]-int64(h.MetaOffset))/format.MetaPageSize, next)
		end := min((uint64(e[1]-int64(h.MetaOffset))+format.MetaPageSize-1)/format.MetaPageSize, h.Pages())
		for idx := first; idx < end; idx++ {
			pos := int64(h.MetaOffset) + int64(idx)*format.MetaPageSize
			n := min(int64(format.MetaPageSize), metaEnd-pos)
			clear(pg)
			if _, err := img.Store.ReadAt(pg[:n], pos); err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("failed to read metadata page %d: %w", idx, err)
			}
			if zeros.All(pg) {
				continue
			}
			if err := fn(idx, pg); err != nil {
				return err
			}
		}
		next = max(next, end)
	}
	return nil
}
