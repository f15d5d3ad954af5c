package engine

import (
	"errors"
	"fmt"

	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/sector"
)

// Key slots by ASID: the PSP loads and clears them (psp.KeyBinder); every descriptor is checked
// against its ASID's slot (shard.check).

// keySlot is one ASID's loaded key.
type keySlot struct {
	b      psp.Binding // Key cleared after the cipher is made
	cipher *sector.Cipher
}

// ErrSlotBusy: a key is already loaded for the ASID.
var ErrSlotBusy = errors.New("key slot already loaded")

// LoadKey loads a key slot (psp.KeyBinder). The key is copied into the sector cipher.
func (e *Engine) LoadKey(asid psp.ASID, b psp.Binding) error {
	c, err := sector.NewCipher(b.Suite, b.Key, b.UUID, b.SectorSize)
	if err != nil {
		return fmt.Errorf("failed to load key slot %d: %w", asid, err)
	}
	b.Key = nil
	e.slotsMu.Lock()
	defer e.slotsMu.Unlock()
	if e.slots[asid] != nil {
		c.Destroy()
		return fmt.Errorf("%w: ASID %d", ErrSlotBusy, asid)
	}
	if e.mem != nil {
		// the VM's memory key is born with its key slot and dies with it
		if err := e.mem.Load(uint32(asid)); err != nil {
			c.Destroy()
			return fmt.Errorf("failed to load key slot %d: %w", asid, err)
		}
	}
	e.slots[asid] = &keySlot{b: b, cipher: c}
	return nil
}

// ClearKey detaches the ASID's disk (writing back and zeroising its cache) and zeroises the
// key slot (psp.KeyBinder).
func (e *Engine) ClearKey(asid psp.ASID) error {
	var derr error
	e.disksMu.Lock()
	d := e.disks[asid]
	e.disksMu.Unlock()
	if d != nil {
		derr = d.Close()
	}
	e.slotsMu.Lock()
	s := e.slots[asid]
	delete(e.slots, asid)
	if e.mem != nil {
		e.mem.Clear(uint32(asid))
	}
	e.slotsMu.Unlock()
	if s == nil {
		return fmt.Errorf("failed to clear key slot: %w: ASID %d", ErrPermission, asid)
	}
	s.cipher.Destroy()
	return derr
}

func (e *Engine) slot(asid uint32) *keySlot {
	e.slotsMu.RLock()
	defer e.slotsMu.RUnlock()
	return e.slots[psp.ASID(asid)]
}
