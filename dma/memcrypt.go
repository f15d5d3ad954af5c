package dma

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"
	"sync"
)

// MemCrypt models the memory controller of a confidential-VM host (SEV's per-ASID VEK): guest
// memory, and so every DMA payload a descriptor points at, is encrypted under a key that
// belongs to the VM's ASID and that neither the hypervisor nor the disk controller holds. The
// coprocessor asks the memory controller to open a write's payload before sealing it to disk,
// and to seal a read's payload before it lands in guest memory.
//
// It is a simulation stage, off by default: on a host service the plaintext already crosses
// NBD/FUSE, so re-encrypting it only costs. Each payload is AES-256-CTR under the ASID's VEK
// with a fresh random 16-byte IV carried in the descriptor (MemIV), so no keystream is ever
// reused. Like SEV's memory encryption it is confidentiality only, not integrity.
type MemCrypt struct {
	mu   sync.RWMutex // guards veks (the map and the keys in it)
	veks map[uint32]*[32]byte
}

// ErrNoVEK: the descriptor's ASID has no memory-encryption key loaded.
var ErrNoVEK = errors.New("no memory-encryption key (VEK) for this ASID")

// NewMemCrypt returns a memory controller with no keys.
func NewMemCrypt() *MemCrypt { return &MemCrypt{veks: map[uint32]*[32]byte{}} }

// Load draws a fresh random VEK for asid, replacing any previous one (a VM relaunch gets a new
// memory key, as on SEV).
func (m *MemCrypt) Load(asid uint32) error {
	k := new([32]byte)
	if _, err := rand.Read(k[:]); err != nil {
		return fmt.Errorf("failed to draw a VEK: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if old := m.veks[asid]; old != nil {
		clear(old[:])
	}
	m.veks[asid] = k
	return nil
}

// Clear zeroises and forgets asid's VEK.
func (m *MemCrypt) Clear(asid uint32) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if k := m.veks[asid]; k != nil {
		clear(k[:])
		delete(m.veks, asid)
	}
}

// Loaded reports whether asid has a VEK.
func (m *MemCrypt) Loaded(asid uint32) bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.veks[asid] != nil
}

func (m *MemCrypt) stream(asid uint32, iv []byte) (cipher.Stream, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	k := m.veks[asid]
	if k == nil {
		return nil, fmt.Errorf("%w: ASID %d", ErrNoVEK, asid)
	}
	b, err := aes.NewCipher(k[:])
	if err != nil {
		panic("BUG: dma: AES-256 refused a 32-byte key")
	}
	return cipher.NewCTR(b, iv), nil
}

// Seal encrypts d.Buf in place under d.ASID's VEK with a fresh IV, which it stores in d.MemIV:
// the memory controller writing d's payload into guest memory.
func (m *MemCrypt) Seal(d *Descriptor) error {
	if _, err := rand.Read(d.MemIV[:]); err != nil {
		return fmt.Errorf("failed to draw a memory IV: %w", err)
	}
	s, err := m.stream(d.ASID, d.MemIV[:])
	if err != nil {
		return err
	}
	s.XORKeyStream(d.Buf, d.Buf)
	return nil
}

// Open decrypts d.Buf in place under d.ASID's VEK and d.MemIV: the memory controller reading
// d's payload out of guest memory.
func (m *MemCrypt) Open(d *Descriptor) error {
	s, err := m.stream(d.ASID, d.MemIV[:])
	if err != nil {
		return err
	}
	s.XORKeyStream(d.Buf, d.Buf)
	return nil
}
