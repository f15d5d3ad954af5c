package sector

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// Journal bytes (FORMAT.md §6).
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

func (c *Cipher) mac(dst, msg []byte) {
	c.mu.Lock()
	m := hmac.New(sha256.New, c.jkey)
	c.mu.Unlock()
	m.Write(msg)
	var sum [sha256.Size]byte
	copy(dst, m.Sum(sum[:0])[:macSize])
}

// MarshalJournalHeader writes the journal header for epoch into dst (JournalHeaderSize).
func (c *Cipher) MarshalJournalHeader(epoch uint64, dst []byte) {
	if len(dst) != JournalHeaderSize {
		panic("BUG: sector: journal header buffer size")
	}
	clear(dst)
	copy(dst, journalMagic)
	binary.BigEndian.PutUint64(dst[8:], epoch)
	c.mac(dst[16:32], dst[:16])
}

// ParseJournalHeader returns the journal's epoch; an all-zero header is epoch 0 (empty).
func (c *Cipher) ParseJournalHeader(b []byte) (uint64, error) {
	if len(b) != JournalHeaderSize {
		panic("BUG: sector: journal header buffer size")
	}
	if allZero(b) {
		return 0, nil
	}
	if string(b[:8]) != journalMagic {
		return 0, fmt.Errorf("%w: journal header magic is %q", ErrJournal, b[:8])
	}
	var want [macSize]byte
	c.mac(want[:], b[:16])
	if !hmac.Equal(want[:], b[16:32]) {
		return 0, fmt.Errorf("%w: journal header MAC does not verify", ErrJournal)
	}
	if !allZero(b[32:]) {
		return 0, fmt.Errorf("%w: journal header padding is not zero", ErrJournal)
	}
	return binary.BigEndian.Uint64(b[8:16]), nil
}

// MarshalJournalRecord encodes r into dst (JournalRecordSize).
func (c *Cipher) MarshalJournalRecord(r *JournalRecord, dst []byte) {
	if len(dst) != JournalRecordSize {
		panic("BUG: sector: journal record buffer size")
	}
	clear(dst)
	copy(dst, recordMagic)
	dst[4] = r.Kind
	binary.BigEndian.PutUint64(dst[8:], r.Epoch)
	binary.BigEndian.PutUint64(dst[16:], r.Seq)
	binary.BigEndian.PutUint64(dst[24:], r.LBA)
	copy(dst[32:96], r.New[:])
	copy(dst[96:160], r.Old[:])
	c.mac(dst[240:256], dst[:240])
}

// ParseJournalRecord decodes and authenticates one record.
func (c *Cipher) ParseJournalRecord(b []byte) (JournalRecord, error) {
	if len(b) != JournalRecordSize {
		panic("BUG: sector: journal record buffer size")
	}
	var r JournalRecord
	if string(b[:4]) != recordMagic {
		return r, fmt.Errorf("%w: record magic is %q", ErrJournal, b[:4])
	}
	var want [macSize]byte
	c.mac(want[:], b[:240])
	if !hmac.Equal(want[:], b[240:]) {
		return r, fmt.Errorf("%w: record MAC does not verify", ErrJournal)
	}
	r.Kind = b[4]
	if r.Kind != RecordWrite && r.Kind != RecordZero {
		return r, fmt.Errorf("%w: record kind %d", ErrJournal, r.Kind)
	}
	if !allZero(b[5:8]) || !allZero(b[160:240]) {
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
