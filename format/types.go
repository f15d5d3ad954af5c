// Package format encodes and parses the bytes of a sealed image: the two header copies and the
// image certificate. docs/FORMAT.md is the authority; this package follows it field by field.
//
// It does no key handling and no sector crypto (package sector) and imports no frontend.
//
// Compatibility: the bytes of version 1 never change. A new layout bumps the version (which
// this parser refuses as unsupported) or adds a flag (unknown flag bits are refused), and
// comes with a FORMAT.md update, a test vector and a fixture image under tests/fixtures.
package format

import (
	"fmt"
	"time"
)

// Fixed sizes and offsets (FORMAT.md §1, §2).
const (
	HeaderVersion1  = 1 // metadata journal, no integrity tree: opened read-only, upgraded by `sealdisk upgrade`
	HeaderVersion2  = 2 // data journal, integrity tree, root records
	HeaderVersion   = HeaderVersion2
	CertVersion     = 1
	HeaderMagic     = "SEALDISK"
	CertMagic       = "SDCERT01"
	HeaderSlotSize  = 64 << 10 // each header copy's slot
	HeaderFixedSize = 128      // fixed header fields before the certificate
	ChecksumSize    = 32       // SHA-256 after the certificate
	JournalOffset   = 1 << 20
	DefaultJournal  = 4 << 20   // version 1
	DefaultJournal2 = 256 << 20 // version 2: the data journal holds sealed sectors
	RootSlotOffset  = 128 << 10 // version 2: root record slot i at RootSlotOffset + i×RootSlotSize
	RootSlotSize    = 4096
	MetaEntrySize   = 64
	RegionAlign     = 1 << 20
	MaxVirtualSize  = 1 << 50
)

// Suite is a per-sector AEAD suite id (FORMAT.md §4.1).
type Suite uint16

const (
	SuiteAES256GCM        Suite = 1
	SuiteChaCha20Poly1305 Suite = 2
	SuiteSM4GCM           Suite = 3
)

// MeasureAlg is a firmware measurement hash id (FORMAT.md §9).
type MeasureAlg uint16

const (
	MeasureSHA384 MeasureAlg = 1
	MeasureSM3    MeasureAlg = 2
)

// SigAlg is the provider's signature algorithm id (FORMAT.md §3.2).
type SigAlg uint16

const (
	SigECDSAP384 SigAlg = 1
	SigEd25519   SigAlg = 2
)

// HPKE identifiers used in certificates (RFC 9180 registry values).
const (
	KEMMLKEM768X25519 uint16 = 0x647a
	KEMDHKEMP384      uint16 = 0x0011
	KDFHKDFSHA384     uint16 = 0x0002
	AEADAES256GCM     uint16 = 0x0002
)

// Header is one parsed header copy (FORMAT.md §2).
type Header struct {
	Version       uint16 // HeaderVersion1 or HeaderVersion2
	Generation    uint64
	UUID          [16]byte
	VirtualSize   uint64
	SectorSize    uint32
	Suite         Suite
	ReadOnly      bool
	JournalOffset uint64
	JournalSize   uint64
	MetaOffset    uint64
	MetaSize      uint64
	DataOffset    uint64
	// Version 2: the integrity tree over metadata pages (FORMAT.md §7), present when Tree is
	// set (flags bit 1); TreeSize is 0 without it.
	Tree       bool
	TreeOffset uint64
	TreeSize   uint64
	Cert       []byte // the certificate bytes, verbatim (body || signature)
}

// Certificate is a parsed image certificate (FORMAT.md §3). Body holds the exact signed
// bytes as parsed or as produced by MarshalBody; verifiers use Body, never a re-encoding.
type Certificate struct {
	ReadOnly     bool
	Remote       bool
	UUID         [16]byte
	VirtualSize  uint64
	SectorSize   uint32
	Suite        Suite
	MeasureAlg   MeasureAlg
	NotBefore    time.Time
	NotAfter     time.Time
	ChipID       [32]byte
	KEM          uint16
	KDF          uint16
	AEAD         uint16
	ProviderAlg  SigAlg
	ProviderKey  []byte   // PKIX DER
	Measurements [][]byte // each of the MeasureAlg's digest length
	SealedKey    []byte   // HPKE enc || ct; empty when Remote
	BrokerURL    string   // set only when Remote
	KeyID        string   // set only when Remote

	Body      []byte // signed bytes
	Signature []byte
}

// FieldError names the field of a header or certificate that was refused.
type FieldError struct {
	Where  string // "header", "header copy 1", "certificate"
	Field  string // the field's name in FORMAT.md, e.g. "sector_size"
	Reason string
	Err    error // optional cause (the certificate's own error, ErrImageMismatch), for errors.Is/As
}

func (e *FieldError) Error() string {
	return fmt.Sprintf("invalid %s field %s: %s", e.Where, e.Field, e.Reason)
}

func (e *FieldError) Unwrap() error { return e.Err }
