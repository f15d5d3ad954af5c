package format

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"

	"github.com/sealdisk/sealdisk/internal/zeros"
)

// Header copy layout (FORMAT.md §2), big-endian. Each copy sits in its own 64 KiB slot; the
// bytes after the checksum are zero and ignored.
//
//	off  size  field            rule
//	0    8     magic            "SEALDISK"
//	8    2     version          1 or 2 ("unsupported header version N")
//	10   2     copy             0 in the primary slot, 1 in the backup slot
//	12   4     header_len       128 + cert_len; at most 65504
//	16   8     generation       ≥ 1, +1 on every rewrite
//	24   16    image_uuid       version-4 UUID, not all zero
//	40   8     virtual_size     positive multiple of sector_size, ≤ 2^50
//	48   4     sector_size      512 or 4096
//	52   2     data_suite       1..3
//	54   2     flags            bit 0 read-only; v2: bit 1 integrity tree; other bits 0
//	56   8     journal_offset   1 MiB
//	64   8     journal_size     multiple of 1 MiB, 1 MiB..1 GiB (v1: metadata, v2: data journal)
//	72   8     meta_offset      journal_offset + journal_size
//	80   8     meta_size        align(sectors × 64, 1 MiB)
//	88   8     data_offset      meta_offset + meta_size
//	96   4     meta_entry_size  64
//	100  4     cert_len         ≥ 1
//	104  24    reserved         v1: zero
//	104  8     tree_offset      v2: meta_offset + meta_size
//	112  8     tree_size        v2: TreeSize(sectors) with the tree flag, else 0
//	120  8     reserved         v2: zero
//	data_offset is meta_offset + meta_size in v1, tree_offset + tree_size in v2.
//	128  n     certificate      §3, verbatim as signed; must describe this image
//	hl   32    checksum         SHA-256 of bytes [0, header_len)

const (
	flagReadOnly   = 1 << 0
	flagTree       = 1 << 1                        // version 2
	maxHeaderLen   = HeaderSlotSize - ChecksumSize // 65504
	maxCertLen     = maxHeaderLen - HeaderFixedSize
	maxJournalSize = 1 << 30
	copyFieldOff   = 10 // the only header byte range that differs between the two copies
)

func align(n, a uint64) uint64 { return (n + a - 1) / a * a }

// RoundUpVirtualSize rounds a raw image length up to a whole number of sectors (FORMAT.md §1:
// the added tail reads as zeros).
func RoundUpVirtualSize(n uint64, sectorSize uint32) uint64 {
	return align(n, uint64(sectorSize))
}

// metaSize is align(sectors × 64, 1 MiB); zero for an invalid sector size.
func metaSize(virtualSize uint64, sectorSize uint32) uint64 {
	if sectorSize == 0 {
		return 0
	}
	return align(virtualSize/uint64(sectorSize)*MetaEntrySize, RegionAlign)
}

// Layout chooses how a new image is laid out. The zero value is the current version (2)
// with its default journal and the integrity tree.
type Layout struct {
	Version     uint16 // 0: HeaderVersion
	JournalSize uint64 // 0: the version's default (DefaultJournal, DefaultJournal2)
	NoTree      bool   // version 2 without the integrity tree
}

// NewHeader lays out a new image (FORMAT.md §1) with generation 1 and validates every field,
// including that cert is a well-formed certificate for this image.
func NewHeader(uuid [16]byte, virtualSize uint64, sectorSize uint32, suite Suite, readOnly bool, l Layout, cert []byte) (*Header, error) {
	if l.Version == 0 {
		l.Version = HeaderVersion
	}
	if l.JournalSize == 0 {
		l.JournalSize = DefaultJournal
		if l.Version >= HeaderVersion2 {
			l.JournalSize = DefaultJournal2
		}
	}
	h := &Header{
		Version:       l.Version,
		Generation:    1,
		UUID:          uuid,
		VirtualSize:   virtualSize,
		SectorSize:    sectorSize,
		Suite:         suite,
		ReadOnly:      readOnly,
		JournalOffset: JournalOffset,
		JournalSize:   l.JournalSize,
		MetaOffset:    JournalOffset + l.JournalSize,
		MetaSize:      metaSize(virtualSize, sectorSize),
		Cert:          cert,
	}
	h.DataOffset = h.MetaOffset + h.MetaSize
	if l.Version >= HeaderVersion2 {
		h.Tree = !l.NoTree
		h.TreeOffset = h.DataOffset
		if h.Tree && sectorSize != 0 {
			h.TreeSize = TreeRegionSize(MetaPages(virtualSize / uint64(sectorSize)))
		}
		h.DataOffset = h.TreeOffset + h.TreeSize
	}
	if err := h.Validate(); err != nil {
		return nil, err
	}
	return h, nil
}

// Sectors is the number of sectors of the virtual disk.
func (h *Header) Sectors() uint64 { return h.VirtualSize / uint64(h.SectorSize) }

// FileSize is the length of the image file.
func (h *Header) FileSize() uint64 { return h.DataOffset + h.VirtualSize }

// Pages is the number of 4 KiB metadata pages (the tree's leaves in version 2).
func (h *Header) Pages() uint64 { return MetaPages(h.Sectors()) }

// RootSlotPos is the file offset of root record slot i (0 or 1; version 2).
func (h *Header) RootSlotPos(i int) int64 { return RootSlotOffset + int64(i)*RootSlotSize }

// DataPos is the file offset of sector lba's ciphertext.
func (h *Header) DataPos(lba uint64) int64 {
	h.checkLBA(lba)
	return int64(h.DataOffset + lba*uint64(h.SectorSize))
}

// EntryPos is the file offset of sector lba's metadata entry.
func (h *Header) EntryPos(lba uint64) int64 {
	h.checkLBA(lba)
	return int64(h.MetaOffset + lba*MetaEntrySize)
}

// checkLBA: requests are validated at the frontend edge, so an out-of-range sector here is
// a bug, and its offset would land in another region.
func (h *Header) checkLBA(lba uint64) {
	if lba >= h.Sectors() {
		panic(fmt.Sprintf("BUG: format: sector %d beyond the %d-sector disk", lba, h.Sectors()))
	}
}

// Validate checks every field rule of FORMAT.md §2, including the certificate (it must parse
// and describe this image). It returns a *FieldError naming the first bad field.
func (h *Header) Validate() error { return h.validate("header") }

func (h *Header) validate(where string) error {
	r := &reader{where: where}
	if h.Version != HeaderVersion1 && h.Version != HeaderVersion2 {
		r.check("version", fmt.Sprintf("unsupported header version %d", h.Version))
	}
	r.check("generation", ruleGeneration(h.Generation))
	r.check("image_uuid", ruleUUID(h.UUID))
	r.check("sector_size", ruleSectorSize(h.SectorSize))
	r.check("virtual_size", ruleVirtualSize(h.VirtualSize, h.SectorSize))
	r.check("data_suite", ruleSuite(h.Suite))
	h.checkRegions(r)
	r.check("cert_len", ruleCertLen(len(h.Cert)))
	h.checkCert(r)
	return r.err
}

func ruleGeneration(g uint64) string {
	if g == 0 {
		return "must be at least 1"
	}
	return ""
}

func ruleCertLen(n int) string {
	if n == 0 || n > maxCertLen {
		return fmt.Sprintf("%d is outside [1, %d]", n, maxCertLen)
	}
	return ""
}

// checkRegions checks the §1 layout fields; sizes and offsets are bounded by the earlier
// rules, so none of the sums can overflow.
func (h *Header) checkRegions(r *reader) {
	if h.JournalOffset != JournalOffset {
		r.check("journal_offset", fmt.Sprintf("must be %d, got %d", JournalOffset, h.JournalOffset))
	}
	if h.JournalSize < RegionAlign || h.JournalSize > maxJournalSize || h.JournalSize%RegionAlign != 0 {
		r.check("journal_size", fmt.Sprintf("must be a multiple of 1 MiB between 1 MiB and 1 GiB, got %d", h.JournalSize))
	}
	if want := h.JournalOffset + h.JournalSize; h.MetaOffset != want {
		r.check("meta_offset", fmt.Sprintf("must be journal_offset+journal_size = %d, got %d", want, h.MetaOffset))
	}
	if want := metaSize(h.VirtualSize, h.SectorSize); h.MetaSize != want {
		r.check("meta_size", fmt.Sprintf("must be %d for a %d-byte disk, got %d", want, h.VirtualSize, h.MetaSize))
	}
	if h.Version < HeaderVersion2 {
		if want := h.MetaOffset + h.MetaSize; h.DataOffset != want {
			r.check("data_offset", fmt.Sprintf("must be meta_offset+meta_size = %d, got %d", want, h.DataOffset))
		}
		return
	}
	if want := h.MetaOffset + h.MetaSize; h.TreeOffset != want {
		r.check("tree_offset", fmt.Sprintf("must be meta_offset+meta_size = %d, got %d", want, h.TreeOffset))
	}
	want := uint64(0)
	if h.Tree && h.SectorSize != 0 {
		want = TreeRegionSize(MetaPages(h.Sectors()))
	}
	if h.TreeSize != want {
		r.check("tree_size", fmt.Sprintf("must be %d for a %d-byte disk (tree flag %t), got %d", want, h.VirtualSize, h.Tree, h.TreeSize))
	}
	if want := h.TreeOffset + h.TreeSize; h.DataOffset != want {
		r.check("data_offset", fmt.Sprintf("must be tree_offset+tree_size = %d, got %d", want, h.DataOffset))
	}
}

// checkCert applies the certificate field's rule: a §3 certificate for this image.
func (h *Header) checkCert(r *reader) {
	if r.err != nil {
		return
	}
	c, err := ParseCertificate(h.Cert)
	if err != nil {
		r.checkErr("certificate", err.Error(), err)
		return
	}
	if field, reason := imageMismatch(c, h); field != "" {
		r.checkErr(field, reason, ErrImageMismatch)
	}
}

// Marshal encodes the header as the given copy (0 primary, 1 backup): header_len+32 bytes,
// to be written at copy × HeaderSlotSize.
func (h *Header) Marshal(copy int) ([]byte, error) {
	if copy != 0 && copy != 1 {
		panic(fmt.Sprintf("BUG: format: header copy %d, must be 0 or 1", copy))
	}
	if err := h.Validate(); err != nil {
		return nil, err
	}
	return h.encode(copy), nil
}

// encode writes the fields as they are, valid or not (tests use it to build bad bytes).
func (h *Header) encode(copy int) []byte {
	hl := HeaderFixedSize + len(h.Cert)
	w := writer{b: make([]byte, 0, hl+ChecksumSize)}
	w.str(HeaderMagic)
	w.u16(h.Version)
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
	if h.Tree {
		flags |= flagTree
	}
	w.u16(flags)
	w.u64(h.JournalOffset)
	w.u64(h.JournalSize)
	w.u64(h.MetaOffset)
	w.u64(h.MetaSize)
	w.u64(h.DataOffset)
	w.u32(MetaEntrySize)
	w.u32(uint32(len(h.Cert)))
	if h.Version >= HeaderVersion2 {
		w.u64(h.TreeOffset)
		w.u64(h.TreeSize)
		w.raw(make([]byte, 8))
	} else {
		w.raw(make([]byte, 24))
	}
	w.raw(h.Cert)
	sum := sha256.Sum256(w.b)
	w.raw(sum[:])
	return w.b
}

// ParseHeader decodes one header copy from its slot (at most HeaderSlotSize bytes read from
// copy × HeaderSlotSize) in one pass over the table above, checking each field as it is
// read. Every refusal is a *FieldError with Where "header copy N".
func ParseHeader(slot []byte, copy int) (*Header, error) {
	where := fmt.Sprintf("header copy %d", copy)
	r := &reader{b: slot, where: where}
	if m := r.take("magic", 8); m != nil && string(m) != HeaderMagic {
		r.fail("magic", fmt.Sprintf("is %q, not %q: not a sealdisk image", m, HeaderMagic))
	}
	// A later version may lay out everything after this differently: stop here.
	version := r.u16("version")
	if r.err == nil && version != HeaderVersion1 && version != HeaderVersion2 {
		r.fail("version", fmt.Sprintf("unsupported header version %d (this build reads versions 1 and 2)", version))
	}
	if c := r.u16("copy"); r.err == nil && int(c) != copy {
		r.fail("copy", fmt.Sprintf("is %d in slot %d", c, copy))
	}
	hl := int(r.u32("header_len"))
	if r.err == nil && (hl < HeaderFixedSize+1 || hl > maxHeaderLen) {
		r.fail("header_len", fmt.Sprintf("%d is outside [%d, %d]", hl, HeaderFixedSize+1, maxHeaderLen))
	}
	if r.err == nil && len(slot) < hl+ChecksumSize {
		r.fail("header_len", fmt.Sprintf("%d plus the checksum exceeds the %d bytes read (truncated header)", hl, len(slot)))
	}
	if r.err != nil {
		return nil, r.err
	}
	// Checksum before the remaining fields: a torn copy reports as torn, not as some field.
	if sum := sha256.Sum256(slot[:hl]); !bytes.Equal(sum[:], slot[hl:hl+ChecksumSize]) {
		return nil, &FieldError{Where: where, Field: "checksum", Reason: "SHA-256 does not match (torn or corrupted header)"}
	}
	r.b = slot[:hl] // the certificate must end exactly at header_len
	h := &Header{Version: version}
	h.Generation = r.u64("generation")
	r.check("generation", ruleGeneration(h.Generation))
	h.UUID = r.array16("image_uuid")
	r.check("image_uuid", ruleUUID(h.UUID))
	h.VirtualSize = r.u64("virtual_size")
	h.SectorSize = r.u32("sector_size")
	r.check("sector_size", ruleSectorSize(h.SectorSize))
	r.check("virtual_size", ruleVirtualSize(h.VirtualSize, h.SectorSize))
	h.Suite = Suite(r.u16("data_suite"))
	r.check("data_suite", ruleSuite(h.Suite))
	flags := r.u16("flags")
	known := uint16(flagReadOnly)
	if version >= HeaderVersion2 {
		known |= flagTree
	}
	if flags&^known != 0 {
		r.check("flags", fmt.Sprintf("unknown bits 0x%04x", flags&^known))
	}
	h.ReadOnly = flags&flagReadOnly != 0
	h.Tree = flags&flagTree != 0
	h.JournalOffset = r.u64("journal_offset")
	h.JournalSize = r.u64("journal_size")
	h.MetaOffset = r.u64("meta_offset")
	h.MetaSize = r.u64("meta_size")
	h.DataOffset = r.u64("data_offset")
	es := r.u32("meta_entry_size")
	cl := int(r.u32("cert_len"))
	if version >= HeaderVersion2 {
		h.TreeOffset = r.u64("tree_offset")
		h.TreeSize = r.u64("tree_size")
		if res := r.take("reserved", 8); !zeros.All(res) {
			r.check("reserved", "is not zero")
		}
	} else if res := r.take("reserved", 24); !zeros.All(res) {
		r.check("reserved", "is not zero")
	}
	h.checkRegions(r)
	if es != MetaEntrySize {
		r.check("meta_entry_size", fmt.Sprintf("must be %d, got %d", MetaEntrySize, es))
	}
	if cl != hl-HeaderFixedSize {
		r.check("cert_len", fmt.Sprintf("%d disagrees with header_len %d (want %d)", cl, hl, hl-HeaderFixedSize))
	}
	h.Cert = clone(r.take("certificate", cl))
	h.checkCert(r)
	if r.err != nil {
		return nil, r.err
	}
	if r.off != hl {
		panic("BUG: format: header parser did not consume header_len bytes")
	}
	return h, nil
}

// HeaderStatus says which copy ReadHeader used and why the other was not used (nil when that
// copy was valid and agreed).
type HeaderStatus struct {
	Copy       int   // 0 primary, 1 backup
	PrimaryErr error // why the primary was not used, or nil
	BackupErr  error // why the backup was not used, or nil
}

var (
	// ErrHeadersDisagree: both copies are valid at one generation but differ.
	ErrHeadersDisagree = errors.New("header copies disagree")
	// ErrStaleHeader: a valid copy lost to the other copy's higher generation (a rewrite was
	// interrupted after the backup was written).
	ErrStaleHeader = errors.New("header copy has an older generation than the other copy")
)

// ReadHeader parses both header copies and returns the valid one with the highest generation
// (FORMAT.md §2 "Choosing a copy"). If neither is valid the error wraps the primary's error
// and mentions the backup's.
func ReadHeader(r io.ReaderAt) (*Header, HeaderStatus, error) {
	var hs [2]*Header
	var raw [2][]byte
	var errs [2]error
	for c := range 2 {
		slot := make([]byte, HeaderSlotSize)
		n, err := r.ReadAt(slot, int64(c)*HeaderSlotSize)
		if err != nil && !errors.Is(err, io.EOF) {
			errs[c] = fmt.Errorf("failed to read header copy %d: %w", c, err)
			continue
		}
		raw[c] = slot[:n]
		hs[c], errs[c] = ParseHeader(raw[c], c)
	}
	st := HeaderStatus{PrimaryErr: errs[0], BackupErr: errs[1]}
	stale := func(lost, won *Header) error {
		return fmt.Errorf("%w: generation %d, the other copy has %d", ErrStaleHeader, lost.Generation, won.Generation)
	}
	switch {
	case hs[0] == nil && hs[1] == nil:
		return nil, st, fmt.Errorf("no valid image header: primary: %w; backup: %v", errs[0], errs[1])
	case hs[1] == nil:
		return hs[0], st, nil
	case hs[0] == nil:
		st.Copy = 1
		return hs[1], st, nil
	case hs[1].Generation > hs[0].Generation:
		st.Copy, st.PrimaryErr = 1, stale(hs[0], hs[1])
		return hs[1], st, nil
	case hs[0].Generation > hs[1].Generation:
		st.BackupErr = stale(hs[1], hs[0])
		return hs[0], st, nil
	}
	// Equal generations: byte-identical apart from copy and the checksum.
	a := raw[0][:HeaderFixedSize+len(hs[0].Cert)]
	b := raw[1][:HeaderFixedSize+len(hs[1].Cert)]
	if len(a) != len(b) || !bytes.Equal(a[:copyFieldOff], b[:copyFieldOff]) || !bytes.Equal(a[copyFieldOff+2:], b[copyFieldOff+2:]) {
		return nil, st, fmt.Errorf("%w at generation %d", ErrHeadersDisagree, hs[0].Generation)
	}
	return hs[0], st, nil
}

// SyncWriterAt is what WriteHeaders needs of a store.
type SyncWriterAt interface {
	io.WriterAt
	Sync() error
}

// WriteHeaders writes both copies with h.Generation (the caller sets it: 1 at create, +1 on
// reseal): the backup slot first, synced, then the primary, synced, so a tear in either write
// leaves the other copy valid (FORMAT.md §2 "Rewriting"). Each slot is written whole, its
// remainder zeroed. Nothing outside the two slots is touched.
func WriteHeaders(w SyncWriterAt, h *Header) error {
	var slots [2][]byte
	for c := range 2 {
		b, err := h.Marshal(c)
		if err != nil {
			return fmt.Errorf("failed to encode header copy %d: %w", c, err)
		}
		slots[c] = make([]byte, HeaderSlotSize)
		copy(slots[c], b)
	}
	for _, c := range []int{1, 0} {
		if _, err := w.WriteAt(slots[c], int64(c)*HeaderSlotSize); err != nil {
			return fmt.Errorf("failed to write header copy %d: %w", c, err)
		}
		if err := w.Sync(); err != nil {
			return fmt.Errorf("failed to sync header copy %d: %w", c, err)
		}
	}
	return nil
}

// JournalPos is the file offset of byte pos of the journal region.
func (h *Header) JournalPos(pos uint64) int64 { return int64(h.JournalOffset + pos) }
