package format

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/sealdisk/sealdisk/internal/zeros"
)

// memFile is an in-memory image file: ReaderAt and SyncWriterAt. It logs operations and can
// fail the write or sync with a given index, persisting only a prefix of a failed write.
type memFile struct {
	b   []byte
	ops []string

	failWrite, failSync int // 1-based index of the operation to fail; 0 = never
	cut                 int // bytes of the failing write that still land
	writes, syncs       int
}

var errInjected = errors.New("injected I/O error")

func (m *memFile) WriteAt(p []byte, off int64) (int, error) {
	m.writes++
	m.ops = append(m.ops, fmt.Sprintf("write %d+%d", off, len(p)))
	n := len(p)
	if m.writes == m.failWrite {
		n = m.cut
	}
	if need := int(off) + n; need > len(m.b) {
		m.b = append(m.b, make([]byte, need-len(m.b))...)
	}
	copy(m.b[off:], p[:n])
	if n < len(p) {
		return n, errInjected
	}
	return n, nil
}

func (m *memFile) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(m.b)) {
		return 0, io.EOF
	}
	n := copy(p, m.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memFile) Sync() error {
	m.syncs++
	m.ops = append(m.ops, "sync")
	if m.syncs == m.failSync {
		return errInjected
	}
	return nil
}

func written(t testing.TB, h *Header) *memFile {
	t.Helper()
	f := &memFile{}
	if err := WriteHeaders(f, h); err != nil {
		t.Fatal(err)
	}
	f.ops = nil
	return f
}

// sameHeader compares two headers by their encoding.
func sameHeader(t testing.TB, a, b *Header) bool {
	return bytes.Equal(mustMarshal(t, a, 0), mustMarshal(t, b, 0))
}

func TestHeaderRoundTrip(t *testing.T) {
	ro, err := NewHeader(testUUID, 8<<20, 512, SuiteSM4GCM, true, Layout{Version: 1, JournalSize: 16 << 20}, certFor(t, testUUID, 8<<20, 512, SuiteSM4GCM, true))
	if err != nil {
		t.Fatal(err)
	}
	remote := testHeader(t)
	remote.Cert = certBytes(t, remoteCert())
	remote.Generation = 1<<64 - 1
	for name, h := range map[string]*Header{"default": testHeader(t), "read-only sm4": ro, "remote": remote} {
		for c := 0; c < 2; c++ {
			b := mustMarshal(t, h, c)
			if len(b) != HeaderFixedSize+len(h.Cert)+ChecksumSize {
				t.Fatalf("%s: length %d", name, len(b))
			}
			// As read from a slot: zero padding, and bytes after the checksum are ignored.
			slot := make([]byte, HeaderSlotSize)
			copy(slot, b)
			slot[len(slot)-1] = 0xff
			for _, in := range [][]byte{b, slot} {
				got, err := ParseHeader(in, c)
				if err != nil {
					t.Fatalf("%s copy %d: %v", name, c, err)
				}
				if !sameHeader(t, got, h) {
					t.Fatalf("%s copy %d: got %+v", name, c, got)
				}
				if !bytes.Equal(mustMarshal(t, got, c), b) {
					t.Fatalf("%s copy %d: re-marshal differs", name, c)
				}
			}
			_, err := ParseHeader(b, 1-c)
			wantField(t, name+" in the other slot", err, fmt.Sprintf("header copy %d", 1-c), "copy")
		}
	}
}

// reseal fixes the checksum after a test patched field bytes, so that the field rule itself
// (not the checksum) must refuse them.
func reseal(b []byte) []byte {
	hl := int(binary.BigEndian.Uint32(b[12:]))
	if hl+ChecksumSize <= len(b) {
		sum := sha256.Sum256(b[:hl])
		copy(b[hl:], sum[:])
	}
	return b
}

func be(n int, v uint64) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint64(b, v)
	return b[8-n:]
}

// TestHeaderRefusals: each field of §2 refused on its own, as ParseHeader sees it.
func TestHeaderRefusals(t *testing.T) {
	good := mustMarshal(t, testHeader(t), 0)
	hl := len(good) - ChecksumSize
	patch := func(off int, val []byte) []byte {
		b := bytes.Clone(good)
		copy(b[off:], val)
		return reseal(b)
	}
	// Fields the struct cannot express: patch the bytes.
	for _, tc := range []struct {
		field string
		in    []byte
	}{
		{"magic", patch(0, []byte("SEALDISX"))},
		{"version", patch(8, be(2, 0))},
		{"version", patch(8, be(2, 3))},
		{"copy", patch(10, be(2, 1))},
		{"copy", patch(10, be(2, 2))},
		{"header_len", patch(12, be(4, 128))},            // cert_len would be 0
		{"header_len", patch(12, be(4, maxHeaderLen+1))}, // beyond the slot
		{"header_len", patch(12, be(4, uint64(hl+1)))},   // checksum would run past the input
		{"flags", patch(54, be(2, 2))},
		{"flags", patch(54, be(2, 0x8000))},
		{"meta_entry_size", patch(96, be(4, 32))},
		{"cert_len", patch(100, be(4, uint64(hl-HeaderFixedSize-1)))},
		{"cert_len", patch(100, be(4, 0))},
		{"cert_len", patch(100, be(4, 1<<32-1))},
		{"reserved", patch(104, []byte{1})},
		{"reserved", patch(127, []byte{0x80})},
		{"checksum", func() []byte { b := bytes.Clone(good); b[200] ^= 1; return b }()},
		{"checksum", func() []byte { b := bytes.Clone(good); b[len(b)-1] ^= 1; return b }()},
		{"magic", good[:7]},
		{"header_len", good[:15]},
		{"header_len", good[:len(good)-1]},
		{"magic", nil},
	} {
		_, err := ParseHeader(tc.in, 0)
		wantField(t, tc.field, err, "header copy 0", tc.field)
	}
	_, err := ParseHeader(patch(8, be(2, 3)), 0)
	if err == nil || !strings.Contains(err.Error(), "unsupported header version 3") {
		t.Errorf("version message: %v", err)
	}

	// Fields the struct holds: encode an invalid header as-is.
	otherCert := certFor(t, testUUID, 2<<30, 4096, SuiteAES256GCM, false)
	for _, tc := range []struct {
		field string
		mod   func(h *Header)
	}{
		{"generation", func(h *Header) { h.Generation = 0 }},
		{"image_uuid", func(h *Header) { h.UUID = [16]byte{} }},
		{"image_uuid", func(h *Header) { h.UUID[8] = 0xc0 }}, // wrong variant
		{"image_uuid", func(h *Header) { h.UUID[15]++ }},     // not the certificate's
		{"virtual_size", func(h *Header) { h.VirtualSize++ }},
		{"virtual_size", func(h *Header) { h.VirtualSize = 0 }},
		{"virtual_size", func(h *Header) { h.VirtualSize = 1<<50 + 4096 }},
		{"virtual_size", func(h *Header) { // regions fit the size, the certificate does not
			h.VirtualSize, h.MetaSize = 2<<30, metaSize(2<<30, 4096)
			h.DataOffset = h.MetaOffset + h.MetaSize
		}},
		{"sector_size", func(h *Header) { h.SectorSize = 1024 }},
		{"sector_size", func(h *Header) { h.SectorSize = 0 }},
		{"sector_size", func(h *Header) { // regions fit 512-byte sectors, the certificate does not
			h.SectorSize, h.MetaSize = 512, metaSize(h.VirtualSize, 512)
			h.DataOffset = h.MetaOffset + h.MetaSize
		}},
		{"meta_size", func(h *Header) { h.SectorSize = 512 }}, // 512 is allowed, but the regions no longer fit
		{"data_suite", func(h *Header) { h.Suite = 0 }},
		{"data_suite", func(h *Header) { h.Suite = SuiteSM4GCM }}, // valid suite, not the certificate's
		{"flags", func(h *Header) { h.ReadOnly = true }},          // read-only bit disagrees with the certificate
		{"journal_offset", func(h *Header) { h.JournalOffset = 0 }},
		{"journal_size", func(h *Header) { h.JournalSize = 3 }},
		{"journal_size", func(h *Header) { h.JournalSize = 0 }},
		{"journal_size", func(h *Header) { h.JournalSize = 2 << 30 }},
		{"journal_size", func(h *Header) { h.JournalSize = 3 << 19 }},
		{"meta_offset", func(h *Header) { h.MetaOffset = 7 }},
		{"meta_size", func(h *Header) { h.MetaSize = 0 }},
		{"data_offset", func(h *Header) { h.DataOffset = h.MetaOffset }},
		{"header_len", func(h *Header) { h.Cert = nil }}, // 128 + 0: refused before cert_len is read
		{"certificate", func(h *Header) { h.Cert = []byte{1} }},
		{"certificate", func(h *Header) { h.Cert = append(bytes.Clone(h.Cert), 0) }}, // trailing byte
		{"virtual_size", func(h *Header) { h.Cert = otherCert }},
	} {
		h := testHeader(t)
		tc.mod(h)
		_, err := ParseHeader(h.encode(0), 0)
		wantField(t, tc.field, err, "header copy 0", tc.field)
	}

	// The certificate's own error stays reachable, and mismatches wrap ErrImageMismatch.
	h := testHeader(t)
	h.Cert = bytes.Clone(h.Cert)
	h.Cert[9] = 2 // certificate version
	_, err = ParseHeader(h.encode(1), 1)
	var inner *FieldError
	if !errors.As(errors.Unwrap(err), &inner) || inner.Where != "certificate" || inner.Field != "version" {
		t.Errorf("certificate cause lost: %v", err)
	}
	h = testHeader(t)
	h.Cert = otherCert
	if _, err := ParseHeader(h.encode(0), 0); !errors.Is(err, ErrImageMismatch) {
		t.Errorf("mismatch: %v", err)
	}
}

// TestReadHeaderFallsBack flips every byte of one copy's header_len+32 bytes: the reader must
// use the other copy and return exactly the original header, never a changed one.
func TestReadHeaderFallsBack(t *testing.T) {
	h := testHeader(t)
	f := written(t, h)
	n := HeaderFixedSize + len(h.Cert) + ChecksumSize
	for c := 0; c < 2; c++ {
		base := c * HeaderSlotSize
		for i := 0; i < n; i++ {
			for _, mask := range []byte{0x01, 0x80, 0xff} {
				f.b[base+i] ^= mask
				got, st, err := ReadHeader(f)
				f.b[base+i] ^= mask
				if err != nil {
					t.Fatalf("copy %d byte %d ^%02x: %v", c, i, mask, err)
				}
				if !sameHeader(t, got, h) {
					t.Fatalf("copy %d byte %d ^%02x: returned a changed header", c, i, mask)
				}
				bad := [2]error{st.PrimaryErr, st.BackupErr}
				if st.Copy != 1-c || bad[c] == nil || bad[1-c] != nil {
					t.Fatalf("copy %d byte %d ^%02x: status %+v", c, i, mask, st)
				}
			}
		}
	}
	if _, st, err := ReadHeader(f); err != nil || st != (HeaderStatus{}) {
		t.Fatalf("restored file: %+v %v", st, err)
	}
}

func TestReadHeaderNeitherValid(t *testing.T) {
	f := written(t, testHeader(t))
	f.b[0] = 'X'                   // primary: magic
	f.b[HeaderSlotSize+300] ^= 0x4 // backup: checksum
	_, st, err := ReadHeader(f)
	wantField(t, "both bad", err, "header copy 0", "magic")
	msg := err.Error()
	if p, b := strings.Index(msg, "magic"), strings.Index(msg, "header copy 1 field checksum"); p < 0 || b < p {
		t.Errorf("want the primary's error, then the backup's: %v", err)
	}
	wantField(t, "status primary", st.PrimaryErr, "header copy 0", "magic")
	wantField(t, "status backup", st.BackupErr, "header copy 1", "checksum")

	for name, r := range map[string]io.ReaderAt{"empty file": &memFile{}, "zero file": &memFile{b: make([]byte, 2*HeaderSlotSize)}} {
		if _, _, err := ReadHeader(r); err == nil {
			t.Errorf("%s accepted", name)
		}
	}
}

// failingReader fails reads at one offset.
type failingReader struct {
	io.ReaderAt
	off int64
}

func (r failingReader) ReadAt(p []byte, off int64) (int, error) {
	if off == r.off {
		return 0, errInjected
	}
	return r.ReaderAt.ReadAt(p, off)
}

func TestReadHeaderShortOrFailingFile(t *testing.T) {
	h := testHeader(t)
	f := written(t, h)
	// Only the primary present (a file cut inside the backup slot).
	short := &memFile{b: f.b[:HeaderSlotSize+100]}
	got, st, err := ReadHeader(short)
	if err != nil || st.Copy != 0 || st.PrimaryErr != nil || st.BackupErr == nil || !sameHeader(t, got, h) {
		t.Fatalf("short file: %+v %v", st, err)
	}
	got, st, err = ReadHeader(failingReader{f, 0})
	if err != nil || st.Copy != 1 || !errors.Is(st.PrimaryErr, errInjected) || !sameHeader(t, got, h) {
		t.Fatalf("failing primary read: %+v %v", st, err)
	}
	_, _, err = ReadHeader(failingReader{&memFile{}, 0})
	if !errors.Is(err, errInjected) {
		t.Fatalf("read error not wrapped: %v", err)
	}
}

func TestReadHeaderGeneration(t *testing.T) {
	for _, tc := range []struct {
		primary, backup uint64
		copy            int
	}{{1, 1, 0}, {1, 2, 1}, {2, 1, 0}, {7, 8, 1}, {1<<64 - 1, 1, 0}} {
		h := testHeader(t)
		f := written(t, h)
		h.Generation = tc.primary
		f.WriteAt(mustMarshal(t, h, 0), 0)
		h.Generation = tc.backup
		f.WriteAt(mustMarshal(t, h, 1), HeaderSlotSize)
		got, st, err := ReadHeader(f)
		if err != nil {
			t.Fatalf("%+v: %v", tc, err)
		}
		want := max(tc.primary, tc.backup)
		if got.Generation != want || st.Copy != tc.copy {
			t.Errorf("%+v: got generation %d from copy %d", tc, got.Generation, st.Copy)
		}
		stale := [2]error{st.PrimaryErr, st.BackupErr}[1-tc.copy]
		if (tc.primary != tc.backup) != errors.Is(stale, ErrStaleHeader) {
			t.Errorf("%+v: losing copy's status %v", tc, stale)
		}
	}
}

func TestReadHeaderDisagree(t *testing.T) {
	h := testHeader(t)
	other := testCert()
	other.Signature = bytes.Repeat([]byte{0x78}, 103) // same length, other bytes
	for name, mod := range map[string]func(h *Header){
		"journal size": func(h *Header) {
			h.JournalSize = 8 << 20
			h.MetaOffset = h.JournalOffset + h.JournalSize
			h.DataOffset = h.MetaOffset + h.MetaSize
		},
		"certificate signature": func(h *Header) { h.Cert = certBytes(t, other) },
		"certificate length":    func(h *Header) { o := testCert(); o.Signature = o.Signature[:50]; h.Cert = certBytes(t, o) },
	} {
		f := written(t, h)
		h2 := *h
		mod(&h2)
		f.WriteAt(mustMarshal(t, &h2, 0), 0)
		_, _, err := ReadHeader(f)
		if !errors.Is(err, ErrHeadersDisagree) || !strings.Contains(err.Error(), "header copies disagree") {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestWriteHeadersOrderAndSlots(t *testing.T) {
	h := testHeader(t)
	h.Generation = 5
	f := &memFile{b: bytes.Repeat([]byte{0xee}, 3*HeaderSlotSize)}
	if err := WriteHeaders(f, h); err != nil {
		t.Fatal(err)
	}
	want := []string{fmt.Sprintf("write %d+%d", HeaderSlotSize, HeaderSlotSize), "sync", fmt.Sprintf("write 0+%d", HeaderSlotSize), "sync"}
	if fmt.Sprint(f.ops) != fmt.Sprint(want) {
		t.Fatalf("operations %v, want %v", f.ops, want)
	}
	for c := 0; c < 2; c++ {
		slot := f.b[c*HeaderSlotSize : (c+1)*HeaderSlotSize]
		b := mustMarshal(t, h, c)
		if !bytes.Equal(slot[:len(b)], b) || !zeros.All(slot[len(b):]) {
			t.Errorf("slot %d: not the copy followed by zeros", c)
		}
	}
	if !bytes.Equal(f.b[2*HeaderSlotSize:], bytes.Repeat([]byte{0xee}, HeaderSlotSize)) {
		t.Error("wrote outside the header slots")
	}
	got, _, err := ReadHeader(f)
	if err != nil || got.Generation != 5 {
		t.Fatalf("read back: %v", err)
	}

	// An invalid header is refused before anything is written.
	bad := *h
	bad.Generation = 0
	f = &memFile{}
	if err := WriteHeaders(f, &bad); err == nil || len(f.ops) != 0 {
		t.Fatalf("invalid header: err %v, ops %v", err, f.ops)
	}
}

// TestTornRewrite interrupts a reseal (generation 1 → 2, new certificate of another length) at
// every write and sync, with every interesting amount of the torn write landing. The reader
// must always find generation 1 or 2, exactly, and WriteHeaders must stop at the failure.
func TestTornRewrite(t *testing.T) {
	h1 := testHeader(t)
	h2 := *h1
	h2.Generation = 2
	c := testCert()
	c.NotAfter = c.NotAfter.Add(1 << 40) // a later expiry: same length, other bytes
	c.Measurements = append(c.Measurements, bytes.Repeat([]byte{0xcd}, 48))
	h2.Cert = certBytes(t, c)
	n2 := HeaderFixedSize + len(h2.Cert) + ChecksumSize
	cuts := []int{0, 1, 10, 12, 16, 24, 127, 128, 129, 1000, n2 - ChecksumSize, n2 - 1, n2, HeaderSlotSize - 1}

	check := func(name string, f *memFile, wantGen uint64) {
		t.Helper()
		got, _, err := ReadHeader(f)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		want := map[uint64]*Header{1: h1, 2: &h2}[wantGen]
		if got.Generation != wantGen || !sameHeader(t, got, want) {
			t.Fatalf("%s: got generation %d, want exactly generation %d", name, got.Generation, wantGen)
		}
	}
	for write := 1; write <= 2; write++ {
		for _, cut := range cuts {
			f := written(t, h1)
			before := bytes.Clone(f.b)
			f.failWrite, f.cut, f.writes = write, cut, 0
			if err := WriteHeaders(f, &h2); !errors.Is(err, errInjected) {
				t.Fatalf("write %d cut %d: %v", write, cut, err)
			}
			// Write 1 is the backup: the primary must be untouched. Write 2 is the primary.
			wantGen := uint64(1)
			if write == 1 && !bytes.Equal(f.b[:HeaderSlotSize], before[:HeaderSlotSize]) {
				t.Fatalf("cut %d: primary touched after the backup write failed", cut)
			}
			if write == 2 || cut >= n2 {
				wantGen = 2 // the backup holds a whole generation-2 copy
			}
			check(fmt.Sprintf("write %d cut %d", write, cut), f, wantGen)
		}
	}
	for sync := 1; sync <= 2; sync++ {
		f := written(t, h1)
		f.failSync, f.syncs = sync, 0
		if err := WriteHeaders(f, &h2); !errors.Is(err, errInjected) {
			t.Fatalf("sync %d: %v", sync, err)
		}
		if sync == 1 && len(f.ops) != 2 {
			t.Fatalf("kept writing after a failed sync: %v", f.ops)
		}
		check(fmt.Sprintf("sync %d", sync), f, 2)
	}
}
