package image

import (
	"context"
	"fmt"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/sector"
)

// Upgrade turns the version-1 image src into dst, a new version-2 image created with the same
// UUID, certificate and key (FORMAT.md §6.3): every sector src holds — its journal replayed in
// memory (ov, from Recover) — is authenticated, decrypted and sealed afresh into dst, holes
// stay holes, then dst's integrity tree is built and its first root record written,
// authenticated by mac (the PSP's). The first sector of src that fails authentication stops
// it. src is not changed.
func Upgrade(ctx context.Context, src *Image, c *sector.Cipher, ov Overlay, dst *Image, sess *sector.Session, mac func(body []byte) []byte, progress Progress) error {
	if src.Header.Version != format.HeaderVersion1 || dst.Header.Version < format.HeaderVersion2 {
		return fmt.Errorf("upgrade: from version %d to version %d: want version 1 to version 2", src.Header.Version, dst.Header.Version)
	}
	if src.Header.UUID != dst.Header.UUID || src.Header.VirtualSize != dst.Header.VirtualSize || src.Header.SectorSize != dst.Header.SectorSize {
		return fmt.Errorf("upgrade: the new image is not the same disk (uuid, size or sector size differ)")
	}
	if err := Unseal(ctx, src, c, ov, &sealingOutput{img: dst, sess: sess}, progress); err != nil {
		return err
	}
	return dst.writeFirstRoot(format.RootByPSP, func(body []byte) ([]byte, error) { return mac(body), nil })
}

// sealingOutput is an Unseal output that seals what it is given into an image: each WriteAt
// (whole sectors, disjoint between concurrent calls) becomes sealed data and its entries.
type sealingOutput struct {
	img  *Image
	sess *sector.Session
}

func (o *sealingOutput) WriteAt(p []byte, off int64) (int, error) {
	h := o.img.Header
	ss := int64(h.SectorSize)
	if off%ss != 0 || int64(len(p))%ss != 0 {
		return 0, fmt.Errorf("BUG: image: sealing output given %d bytes at %d, not whole sectors", len(p), off)
	}
	first, n := off/ss, int64(len(p))/ss
	ct := make([]byte, len(p)+sector.TagSize)
	ents := make([]byte, n*sector.EntrySize)
	for i := int64(0); i < n; i++ {
		var e sector.Entry
		o.sess.Seal(uint64(first+i), ct[i*ss:(i+1)*ss], p[i*ss:(i+1)*ss], &e)
		copy(ents[i*sector.EntrySize:], e[:])
	}
	if _, err := o.img.Store.WriteAt(ct[:len(p)], h.DataPos(uint64(first))); err != nil {
		return 0, fmt.Errorf("failed to write data: %w", err)
	}
	if _, err := o.img.Store.WriteAt(ents, h.EntryPos(uint64(first))); err != nil {
		return 0, fmt.Errorf("failed to write metadata: %w", err)
	}
	return len(p), nil
}

// Truncate checks the size Unseal asks for: the image's size is fixed.
func (o *sealingOutput) Truncate(size int64) error {
	if size != 0 && uint64(size) != o.img.Header.VirtualSize {
		return fmt.Errorf("BUG: image: sealing output sized to %d, the image is %d", size, o.img.Header.VirtualSize)
	}
	return nil
}

func (o *sealingOutput) Sync() error { return o.img.Store.Sync() }
