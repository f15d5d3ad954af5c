package sector

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"sync"

	"github.com/sealdisk/sealdisk/internal/zeros"
)

// Journal bytes (FORMAT.md §6).
//
//	header (4096): magic "SDJOURN1" | epoch u64 | HMAC(Kj, [0,16))[:16] | zero
//	record (256):  magic "SDJR" | kind u8 | 3 zero | epoch u64 | seq u64 | lba u64 |
//	               new entry (64) | old entry (64) | 80 zero | HMAC(Kj, [0,240))[:16]
const (
	JournalHeaderSize = 4096
	JournalRecordSize = 256

	RecordWrite = 1
	RecordZero  = 2

	journalMagic = "SDJOURN1"
	recordMagic  = "SDJR"
	macSize      = 16
)

// JournalRecord is one journaled sector update: New replaces Old.
type JournalRecord struct {
	Kind  uint8
	Epoch uint64
	Seq   uint64
	LBA   uint64
	New   Entry
	Old   Entry
}

// ErrJournal is wrapped by every invalid journal header or record: scanning stops there.
var ErrJournal = errors.New("invalid journal data")

// hmacStates returns the SHA-256 states after absorbing key⊕ipad and key⊕opad. Every write
// journals a record, so the MAC is on the data path: starting from these states saves two
// compressions and all allocations per MAC, and unlike crypto/hmac's internal copies they
// are ours to zeroise.
func hmacStates(key []byte) (inner, outer []byte) {
	var pad [sha256.BlockSize]byte
	defer clear(pad[:])
	copy(pad[:], key) // key is 32 bytes, shorter than a block
	for i := range pad {
		pad[i] ^= 0x36
	}
	h := sha256.New()
	defer h.Reset()
	h.Write(pad[:])
	inner, err := h.(encoding.BinaryMarshaler).MarshalBinary()
	if err != nil {
		panic("BUG: sector: cannot save a SHA-256 state: " + err.Error())
	}
	for i := range pad {
		pad[i] ^= 0x36 ^ 0x5c
	}
	h.Reset()
	h.Write(pad[:])
	if outer, err = h.(encoding.BinaryMarshaler).MarshalBinary(); err != nil {
		panic("BUG: sector: cannot save a SHA-256 state: " + err.Error())
	}
	return inner, outer
}

type macScratch struct {
	h   hash.Hash
	u   encoding.BinaryUnmarshaler
	sum [sha256.Size]byte
}

var macPool = sync.Pool{New: func() any {
	h := sha256.New()
	return &macScratch{h: h, u: h.(encoding.BinaryUnmarshaler)}
}}

// mac writes HMAC-SHA256(Kj, msg) truncated to len(dst). The caller holds c.mu for reading
// and has checked that the cipher is not destroyed.
func (c *Cipher) mac(dst, msg []byte) {
	m := macPool.Get().(*macScratch)
	if err := m.u.UnmarshalBinary(c.jinner); err != nil {
		panic("BUG: sector: cannot restore a SHA-256 state: " + err.Error())
	}
	m.h.Write(msg)
	inner := m.h.Sum(m.sum[:0])
	if err := m.u.UnmarshalBinary(c.jouter); err != nil {
		panic("BUG: sector: cannot restore a SHA-256 state: " + err.Error())
	}
	m.h.Write(inner)
	copy(dst, m.h.Sum(m.sum[:0]))
	m.h.Reset() // pooled scratch keeps no key-derived state
	clear(m.sum[:])
	macPool.Put(m)
}

// lockLive takes c.mu for reading unless the cipher is destroyed.
func (c *Cipher) lockLive() bool {
	c.mu.RLock()
	if c.destroyed {
		c.mu.RUnlock()
		return false
	}
	return true
}

// MarshalJournalHeader writes the journal header for epoch into dst (JournalHeaderSize).
// Epoch 0 is the empty journal, which FORMAT.md §6 writes as all zeros.
func (c *Cipher) MarshalJournalHeader(epoch uint64, dst []byte) {
	if len(dst) != JournalHeaderSize {
		panic("BUG: sector: journal header buffer size")
	}
	clear(dst)
	if epoch == 0 {
		return
	}
	copy(dst, journalMagic)
	binary.BigEndian.PutUint64(dst[8:], epoch)
	if !c.lockLive() {
		panic("BUG: sector: use after Destroy (MarshalJournalHeader)")
	}
	c.mac(dst[16:32], dst[:16])
	c.mu.RUnlock()
}

// ParseJournalHeader returns the journal's epoch; an all-zero header is epoch 0 (empty).
func (c *Cipher) ParseJournalHeader(b []byte) (uint64, error) {
	if len(b) != JournalHeaderSize {
		panic("BUG: sector: journal header buffer size")
	}
	if zeros.All(b) {
		return 0, nil
	}
	if string(b[:8]) != journalMagic {
		return 0, fmt.Errorf("%w: journal header magic is %q", ErrJournal, b[:8])
	}
	if !c.lockLive() {
		return 0, fmt.Errorf("failed to check journal header: %w", ErrDestroyed)
	}
	var want [macSize]byte
	c.mac(want[:], b[:16])
	c.mu.RUnlock()
	if !hmac.Equal(want[:], b[16:32]) {
		return 0, fmt.Errorf("%w: journal header MAC does not verify", ErrJournal)
	}
	if !zeros.All(b[32:]) {
		return 0, fmt.Errorf("%w: journal header padding is not zero", ErrJournal)
	}
	return binary.BigEndian.Uint64(b[8:16]), nil
}

// MarshalJournalRecord encodes r into dst (JournalRecordSize). It does not allocate.
func (c *Cipher) MarshalJournalRecord(r *JournalRecord, dst []byte) {
	if len(dst) != JournalRecordSize {
		panic("BUG: sector: journal record buffer size")
	}
	if r.Kind != RecordWrite && r.Kind != RecordZero || r.Kind == RecordZero && !r.New.IsZero() {
		panic(fmt.Sprintf("BUG: sector: journal record of kind %d with new entry zero=%t", r.Kind, r.New.IsZero()))
	}
	clear(dst)
	copy(dst, recordMagic)
	dst[4] = r.Kind
	binary.BigEndian.PutUint64(dst[8:], r.Epoch)
	binary.BigEndian.PutUint64(dst[16:], r.Seq)
	binary.BigEndian.PutUint64(dst[24:], r.LBA)
	copy(dst[32:96], r.New[:])
	copy(dst[96:160], r.Old[:])
	if !c.lockLive() {
		panic("BUG: sector: use after Destroy (MarshalJournalRecord)")
	}
	c.mac(dst[240:256], dst[:240])
	c.mu.RUnlock()
}

// ParseJournalRecord decodes and authenticates one record: magic, MAC, kind and the zero
// fields. Epoch and seq are the caller's to compare (they depend on the scan).
func (c *Cipher) ParseJournalRecord(b []byte) (JournalRecord, error) {
	if len(b) != JournalRecordSize {
		panic("BUG: sector: journal record buffer size")
	}
	var r JournalRecord
	if string(b[:4]) != recordMagic {
		return r, fmt.Errorf("%w: record magic is %q", ErrJournal, b[:4])
	}
	if !c.lockLive() {
		return r, fmt.Errorf("failed to check journal record: %w", ErrDestroyed)
	}
	var want [macSize]byte
	c.mac(want[:], b[:240])
	c.mu.RUnlock()
	if !hmac.Equal(want[:], b[240:]) {
		return r, fmt.Errorf("%w: record MAC does not verify", ErrJournal)
	}
	r.Kind = b[4]
	if r.Kind != RecordWrite && r.Kind != RecordZero {
		return r, fmt.Errorf("%w: record kind %d", ErrJournal, r.Kind)
	}
	if !zeros.All(b[5:8]) || !zeros.All(b[160:240]) {
		return r, fmt.Errorf("%w: record padding is not zero", ErrJournal)
	}
	r.Epoch = binary.BigEndian.Uint64(b[8:])
	r.Seq = binary.BigEndian.Uint64(b[16:])
	r.LBA = binary.BigEndian.Uint64(b[24:])
	copy(r.New[:], b[32:96])
	copy(r.Old[:], b[96:160])
	if r.Kind == RecordZero && !r.New.IsZero() {
		return r, fmt.Errorf("%w: zero record carries an entry", ErrJournal)
	}
	return r, nil
}
