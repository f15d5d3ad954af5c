package format

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
)

// Header copy layout (FORMAT.md §2), big-endian:
//
//	0   8  magic "SEALDISK"        56  8  journal_offset
//	8   2  version (1)             64  8  journal_size
//	10  2  copy (0|1)              72  8  meta_offset
//	12  4  header_len              80  8  meta_size
//	16  8  generation              88  8  data_offset
//	24 16  image_uuid              96  4  meta_entry_size (64)
//	40  8  virtual_size           100  4  cert_len
//	48  4  sector_size            104 24  reserved (zero)
//	52  2  data_suite             128  …  certificate
//	54  2  flags (bit0 read-only)  header_len: 32-byte SHA-256 of [0, header_len)

const (
	flagReadOnly   = 1 << 0
	maxHeaderLen   = HeaderSlotSize - ChecksumSize
	maxJournalSize = 1 << 30
)

func align(n, a uint64) uint64 { return (n + a - 1) / a * a }

// RoundUpVirtualSize rounds a raw image length up to a whole number of sectors.
func RoundUpVirtualSize(n uint64, sectorSize uint32) uint64 {
	return align(n, uint64(sectorSize))
}

// NewHeader lays out a new image (FORMAT.md §1) and validates it. Generation starts at 1.
func NewHeader(uuid [16]byte, virtualSize uint64, sectorSize uint32, suite Suite, readOnly bool, journalSize uint64, cert []byte) (*Header, error) {
	if journalSize == 0 {
		journalSize = DefaultJournal
	}
	h := &Header{
		Generation:    1,
		UUID:          uuid,
		VirtualSize:   virtualSize,
		SectorSize:    sectorSize,
		Suite:         suite,
		ReadOnly:      readOnly,
		JournalOffset: JournalOffset,
		JournalSize:   journalSize,
		Cert:          cert,
	}
	if sectorSize != 0 {
		h.MetaOffset = JournalOffset + journalSize
		h.MetaSize = align(virtualSize/uint64(sectorSize)*MetaEntrySize, RegionAlign)
		h.DataOffset = h.MetaOffset + h.MetaSize
	}
	if err := h.validate("header"); err != nil {
		return nil, err
	}
	return h, nil
}

// Sectors is the number of sectors of the virtual disk.
func (h *Header) Sectors() uint64 { return h.VirtualSize / uint64(h.SectorSize) }

// FileSize is the length of the image file.
func (h *Header) FileSize() uint64 { return h.DataOffset + h.VirtualSize }

// DataPos is the file offset of sector lba's ciphertext.
func (h *Header) DataPos(lba uint64) int64 { return int64(h.DataOffset + lba*uint64(h.SectorSize)) }

// EntryPos is the file offset of sector lba's metadata entry.
func (h *Header) EntryPos(lba uint64) int64 { return int64(h.MetaOffset + lba*MetaEntrySize) }

// Validate checks every field rule of FORMAT.md §2.
func (h *Header) Validate() error { return h.validate("header") }

func (h *Header) validate(where string) error {
	bad := func(field, format string, args ...any) error {
		return &FieldError{Where: where, Field: field, Reason: fmt.Sprintf(format, args...)}
	}
	switch {
	case h.Generation == 0:
		return bad("generation", "must be at least 1")
	case h.UUID == [16]byte{}:
		return bad("image_uuid", "is all zero")
	case h.UUID[6]>>4 != 4 || h.UUID[8]&0xc0 != 0x80:
		return bad("image_uuid", "is not an RFC 9562 version-4 UUID")
	case h.SectorSize != 512 && h.SectorSize != 4096:
		return bad("sector_size", "must be 512 or 4096, got %d", h.SectorSize)
	case h.VirtualSize == 0 || h.VirtualSize%uint64(h.SectorSize) != 0:
		return bad("virtual_size", "must be a positive multiple of the %d-byte sector size, got %d", h.SectorSize, h.VirtualSize)
	case h.VirtualSize > MaxVirtualSize:
		return bad("virtual_size", "%d exceeds the 2^50-byte maximum", h.VirtualSize)
	case !h.Suite.Valid():
		return bad("data_suite", "unknown suite %d", uint16(h.Suite))
	case h.JournalOffset != JournalOffset:
		return bad("journal_offset", "must be %d, got %d", JournalOffset, h.JournalOffset)
	case h.JournalSize < RegionAlign || h.JournalSize > maxJournalSize || h.JournalSize%RegionAlign != 0:
		return bad("journal_size", "must be a multiple of 1 MiB between 1 MiB and 1 GiB, got %d", h.JournalSize)
	case h.MetaOffset != h.JournalOffset+h.JournalSize:
		return bad("meta_offset", "must be journal_offset+journal_size = %d, got %d", h.JournalOffset+h.JournalSize, h.MetaOffset)
	case h.MetaSize != align(h.Sectors()*MetaEntrySize, RegionAlign):
		return bad("meta_size", "must be %d for %d sectors, got %d", align(h.Sectors()*MetaEntrySize, RegionAlign), h.Sectors(), h.MetaSize)
	case h.DataOffset != h.MetaOffset+h.MetaSize:
		return bad("data_offset", "must be meta_offset+meta_size = %d, got %d", h.MetaOffset+h.MetaSize, h.DataOffset)
	case len(h.Cert) == 0:
		return bad("cert_len", "is zero: an image needs a certificate")
	case HeaderFixedSize+len(h.Cert) > maxHeaderLen:
		return bad("cert_len", "%d bytes does not fit the 64 KiB header slot", len(h.Cert))
	}
	return nil
}

// Marshal encodes the header as the given copy (0 primary, 1 backup): header_len+32 bytes.
func (h *Header) Marshal(copy int) ([]byte, error) {
	if copy != 0 && copy != 1 {
		panic("BUG: format: header copy must be 0 or 1")
	}
	if err := h.validate("header"); err != nil {
		return nil, err
	}
	hl := HeaderFixedSize + len(h.Cert)
	w := writer{b: make([]byte, 0, hl+ChecksumSize)}
	w.str(HeaderMagic)
	w.u16(Version)
	w.u16(uint16(copy))
	w.u32(uint32(hl))
	w.u64(h.Generation)
	w.raw(h.UUID[:])
	w.u64(h.VirtualSize)
	w.u32(h.SectorSize)
	w.u16(uint16(h.Suite))
	var flags uint16
	if h.ReadOnly {
		flags |= flagReadOnly
	}
	w.u16(flags)
	w.u64(h.JournalOffset)
	w.u64(h.JournalSize)
	w.u64(h.MetaOffset)
	w.u64(h.MetaSize)
	w.u64(h.DataOffset)
	w.u32(MetaEntrySize)
	w.u32(uint32(len(h.Cert)))
	w.raw(make([]byte, 24))
	w.raw(h.Cert)
	sum := sha256.Sum256(w.b)
	w.raw(sum[:])
	return w.b, nil
}

// ParseHeader decodes one header copy from its slot (at most HeaderSlotSize bytes, read from
// copy × HeaderSlotSize). Every refusal is a *FieldError naming the field.
func ParseHeader(slot []byte, copy int) (*Header, error) {
	where := fmt.Sprintf("header copy %d", copy)
	r := &reader{b: slot, where: where}
	if m := r.take("magic", 8); m != nil && string(m) != HeaderMagic {
		r.fail("magic", fmt.Sprintf("is %q, not %q: not a sealdisk image", m, HeaderMagic))
	}
	if v := r.u16("version"); r.err == nil && v != Version {
		r.fail("version", fmt.Sprintf("unsupported header version %d (this build reads version %d)", v, Version))
	}
	if c := r.u16("copy"); r.err == nil && int(c) != copy {
		r.fail("copy", fmt.Sprintf("is %d in slot %d", c, copy))
	}
	hl := r.u32("header_len")
	if r.err == nil && (hl < HeaderFixedSize+1 || hl > maxHeaderLen) {
		r.fail("header_len", fmt.Sprintf("%d is outside [%d, %d]", hl, HeaderFixedSize+1, maxHeaderLen))
	}
	if r.err == nil && len(slot) < int(hl)+ChecksumSize {
		r.fail("header_len", fmt.Sprintf("%d plus checksum exceeds the %d bytes read", hl, len(slot)))
	}
	if r.err != nil {
		return nil, r.err
	}
	want := sha256.Sum256(slot[:hl])
	if !bytes.Equal(want[:], slot[hl:hl+ChecksumSize]) {
		return nil, &FieldError{Where: where, Field: "checksum", Reason: "SHA-256 does not match (torn or corrupted header)"}
	}
	h := &Header{}
	h.Generation = r.u64("generation")
	copy16(h.UUID[:], r.take("image_uuid", 16))
	h.VirtualSize = r.u64("virtual_size")
	h.SectorSize = r.u32("sector_size")
	h.Suite = Suite(r.u16("data_suite"))
	flags := r.u16("flags")
	if flags&^flagReadOnly != 0 {
		r.fail("flags", fmt.Sprintf("unknown bits 0x%04x", flags&^flagReadOnly))
	}
	h.ReadOnly = flags&flagReadOnly != 0
	h.JournalOffset = r.u64("journal_offset")
	h.JournalSize = r.u64("journal_size")
	h.MetaOffset = r.u64("meta_offset")
	h.MetaSize = r.u64("meta_size")
	h.DataOffset = r.u64("data_offset")
	if es := r.u32("meta_entry_size"); r.err == nil && es != MetaEntrySize {
		r.fail("meta_entry_size", fmt.Sprintf("must be %d, got %d", MetaEntrySize, es))
	}
	cl := r.u32("cert_len")
	if r.err == nil && uint64(cl) != uint64(hl)-HeaderFixedSize {
		r.fail("cert_len", fmt.Sprintf("%d disagrees with header_len %d", cl, hl))
	}
	if res := r.take("reserved", 24); res != nil && !allZero(res) {
		r.fail("reserved", "is not zero")
	}
	if c := r.take("certificate", int(cl)); c != nil {
		h.Cert = append([]byte(nil), c...)
	}
	if r.err != nil {
		return nil, r.err
	}
	if err := h.validate(where); err != nil {
		return nil, err
	}
	return h, nil
}

func copy16(dst, src []byte) {
	if src != nil {
		copy(dst, src)
	}
}

// HeaderStatus says which copy ReadHeader used and why the other was not used.
type HeaderStatus struct {
	Copy       int   // 0 primary, 1 backup
	PrimaryErr error // nil when the primary parsed
	BackupErr  error // nil when the backup parsed
}

// ErrHeadersDisagree: both copies are valid at one generation but differ.
var ErrHeadersDisagree = errors.New("header copies disagree")

// ReadHeader parses both header copies and returns the valid one with the highest
// generation (FORMAT.md §2 "Choosing a copy").
func ReadHeader(r io.ReaderAt) (*Header, HeaderStatus, error) {
	var hs [2]*Header
	var errs [2]error
	for c := 0; c < 2; c++ {
		slot := make([]byte, HeaderSlotSize)
		n, err := r.ReadAt(slot, int64(c)*HeaderSlotSize)
		if err != nil && !errors.Is(err, io.EOF) {
			errs[c] = fmt.Errorf("failed to read header copy %d: %w", c, err)
			continue
		}
		hs[c], errs[c] = ParseHeader(slot[:n], c)
	}
	st := HeaderStatus{PrimaryErr: errs[0], BackupErr: errs[1]}
	switch {
	case hs[0] == nil && hs[1] == nil:
		return nil, st, fmt.Errorf("no valid header: primary: %w; backup: %v", errs[0], errs[1])
	case hs[1] == nil:
		return hs[0], st, nil
	case hs[0] == nil:
		st.Copy = 1
		return hs[1], st, nil
	case hs[1].Generation > hs[0].Generation:
		st.Copy = 1
		return hs[1], st, nil
	case hs[0].Generation > hs[1].Generation:
		return hs[0], st, nil
	}
	a, _ := hs[0].Marshal(0)
	b, _ := hs[1].Marshal(0)
	if !bytes.Equal(a, b) {
		return nil, st, fmt.Errorf("%w at generation %d", ErrHeadersDisagree, hs[0].Generation)
	}
	return hs[0], st, nil
}

// SyncWriterAt is what WriteHeaders needs of a store.
type SyncWriterAt interface {
	io.WriterAt
	Sync() error
}

// WriteHeaders writes both copies with h.Generation: the backup first, synced, then the
// primary, synced, so a tear in either write leaves the other copy valid.
func WriteHeaders(w SyncWriterAt, h *Header) error {
	for _, c := range []int{1, 0} {
		b, err := h.Marshal(c)
		if err != nil {
			return err
		}
		slot := make([]byte, HeaderSlotSize)
		copy(slot, b)
		if _, err := w.WriteAt(slot, int64(c)*HeaderSlotSize); err != nil {
			return fmt.Errorf("failed to write header copy %d: %w", c, err)
		}
		if err := w.Sync(); err != nil {
			return fmt.Errorf("failed to sync header copy %d: %w", c, err)
		}
	}
	return nil
}
