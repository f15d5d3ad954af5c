package engine

import "github.com/sealdisk/sealdisk/dma"

// status fills desc.Buf with one byte per sector: 1 when the sector is allocated (written, or
// dirty in the cache), 0 for a hole.
func (p *part) status(desc *dma.Descriptor) error {
	for i := int64(0); i < int64(desc.Count); i++ {
		lba := desc.LBA + uint64(i)
		allocated := false
		if l := p.cached(lba); l != nil && l.dirty {
			allocated = true
		} else {
			e, err := p.entry(lba)
			if err != nil {
				return err
			}
			allocated = !e.IsZero()
		}
		if allocated {
			desc.Buf[i] = 1
		} else {
			desc.Buf[i] = 0
		}
	}
	return nil
}
