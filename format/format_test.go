package format

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
	"time"
)

var testUUID = [16]byte{0x5e, 0xa1, 0xd1, 0x5c, 0, 0, 0x40, 0, 0x80, 0, 0, 0, 0, 0, 0, 1}

// testCert is a fixed, unsigned-but-well-formed certificate for codec tests.
func testCert() *Certificate {
	m := bytes.Repeat([]byte{0xab}, 48)
	return &Certificate{
		UUID: testUUID, VirtualSize: 1 << 30, SectorSize: 4096, Suite: SuiteAES256GCM,
		MeasureAlg: MeasureSHA384, NotBefore: time.Unix(1700000000, 0).UTC(), NotAfter: time.Unix(1900000000, 0).UTC(),
		ChipID: [32]byte{1, 2, 3}, KEM: KEMMLKEM768X25519, KDF: KDFHKDFSHA384, AEAD: AEADAES256GCM,
		ProviderAlg: SigECDSAP384, ProviderKey: bytes.Repeat([]byte{0x30}, 120), Measurements: [][]byte{m},
		SealedKey: bytes.Repeat([]byte{0x5a}, 1168), Signature: bytes.Repeat([]byte{0x77}, 103),
	}
}

func testCertBytes(t testing.TB) []byte {
	c := testCert()
	if _, err := c.MarshalBody(); err != nil {
		t.Fatal(err)
	}
	return c.Bytes()
}

func testHeader(t testing.TB) *Header {
	h, err := NewHeader(testUUID, 1<<30, 4096, SuiteAES256GCM, false, 0, testCertBytes(t))
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// memFile is an in-memory SyncWriterAt/ReaderAt.
type memFile struct{ b []byte }

func (m *memFile) WriteAt(p []byte, off int64) (int, error) {
	if need := int(off) + len(p); need > len(m.b) {
		m.b = append(m.b, make([]byte, need-len(m.b))...)
	}
	return copy(m.b[off:], p), nil
}

func (m *memFile) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(m.b)) {
		return 0, nil
	}
	return copy(p, m.b[off:]), nil
}

func (m *memFile) Sync() error { return nil }

func TestLayoutWorkedExample(t *testing.T) {
	// FORMAT.md §1: 20 GiB, 4096-byte sectors.
	h, err := NewHeader(testUUID, 20<<30, 4096, SuiteAES256GCM, false, 0, []byte{1})
	if err != nil {
		t.Fatal(err)
	}
	if h.MetaSize != 320<<20 || h.MetaOffset != 5<<20 || h.DataOffset != 325<<20 || h.FileSize() != 20805<<20 {
		t.Fatalf("layout %+v", h)
	}
	if h.DataPos(1) != 325<<20+4096 || h.EntryPos(2) != 5<<20+128 {
		t.Fatal("positions")
	}
}

func TestHeaderRoundTrip(t *testing.T) {
	h := testHeader(t)
	for c := 0; c < 2; c++ {
		b, err := h.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		got, err := ParseHeader(b, c)
		if err != nil {
			t.Fatal(err)
		}
		b2, _ := got.Marshal(c)
		if !bytes.Equal(b, b2) {
			t.Fatal("round trip differs")
		}
		if _, err := ParseHeader(b, 1-c); err == nil || !strings.Contains(err.Error(), "copy") {
			t.Fatalf("slot mismatch not refused: %v", err)
		}
	}
}

// corrupt rewrites field bytes of a marshalled header and fixes the checksum, so the
// field rule itself (not the checksum) must refuse it.
func corrupt(t *testing.T, off int, val []byte) error {
	b, err := testHeader(t).Marshal(0)
	if err != nil {
		t.Fatal(err)
	}
	copy(b[off:], val)
	hl := len(b) - ChecksumSize
	sum := sha256.Sum256(b[:hl])
	copy(b[hl:], sum[:])
	_, err = ParseHeader(b, 0)
	return err
}

func TestHeaderRefusals(t *testing.T) {
	be := func(n int, v uint64) []byte {
		b := make([]byte, n)
		for i := n - 1; i >= 0; i-- {
			b[i] = byte(v)
			v >>= 8
		}
		return b
	}
	for _, tc := range []struct {
		field string
		off   int
		val   []byte
	}{
		{"magic", 0, []byte("SEALDISX")},
		{"version", 8, be(2, 2)},
		{"copy", 10, be(2, 1)},
		{"generation", 16, be(8, 0)},
		{"image_uuid", 24, make([]byte, 16)},
		{"virtual_size", 40, be(8, 1<<30+1)},
		{"sector_size", 48, be(4, 1024)},
		{"data_suite", 52, be(2, 9)},
		{"flags", 54, be(2, 4)},
		{"journal_offset", 56, be(8, 0)},
		{"journal_size", 64, be(8, 3)},
		{"meta_offset", 72, be(8, 7)},
		{"meta_size", 80, be(8, 7)},
		{"data_offset", 88, be(8, 7)},
		{"meta_entry_size", 96, be(4, 32)},
		{"cert_len", 100, be(4, 5)},
		{"reserved", 110, []byte{1}},
	} {
		err := corrupt(t, tc.off, tc.val)
		var fe *FieldError
		if !errors.As(err, &fe) || fe.Field != tc.field {
			t.Errorf("%s: got %v", tc.field, err)
		}
	}
	if err := corrupt(t, 8, be(2, 2)); !strings.Contains(err.Error(), "unsupported header version 2") {
		t.Errorf("version message: %v", err)
	}
	b, _ := testHeader(t).Marshal(0)
	b[200] ^= 1
	if _, err := ParseHeader(b, 0); err == nil || !strings.Contains(err.Error(), "checksum") {
		t.Errorf("checksum: %v", err)
	}
	if _, err := ParseHeader(b[:50], 0); err == nil {
		t.Error("truncated header accepted")
	}
}

func TestReadHeaderFallsBackOnEveryByte(t *testing.T) {
	h := testHeader(t)
	var f memFile
	if err := WriteHeaders(&f, h); err != nil {
		t.Fatal(err)
	}
	want, _ := h.Marshal(0)
	for i := 0; i < len(want); i++ {
		g := memFile{b: bytes.Clone(f.b)}
		g.b[i] ^= 0x40
		got, st, err := ReadHeader(&g)
		if err != nil {
			t.Fatalf("byte %d: %v", i, err)
		}
		gb, _ := got.Marshal(0)
		if !bytes.Equal(gb, want) {
			t.Fatalf("byte %d: wrong header returned", i)
		}
		if st.Copy != 1 || st.PrimaryErr == nil {
			t.Fatalf("byte %d: did not fall back: %+v", i, st)
		}
	}
}

func TestReadHeaderBothBadNamesField(t *testing.T) {
	var f memFile
	if err := WriteHeaders(&f, testHeader(t)); err != nil {
		t.Fatal(err)
	}
	f.b[0] = 'X'
	f.b[HeaderSlotSize] = 'X'
	_, _, err := ReadHeader(&f)
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Field != "magic" || !strings.Contains(err.Error(), "backup") {
		t.Fatalf("got %v", err)
	}
}

func TestReadHeaderGenerationAndTornRewrite(t *testing.T) {
	h := testHeader(t)
	var f memFile
	if err := WriteHeaders(&f, h); err != nil {
		t.Fatal(err)
	}
	h2 := *h
	h2.Generation = 2
	// A rewrite torn after the backup: the backup (gen 2) wins over the old primary.
	b, _ := h2.Marshal(1)
	f.WriteAt(b, HeaderSlotSize)
	got, st, err := ReadHeader(&f)
	if err != nil || got.Generation != 2 || st.Copy != 1 {
		t.Fatalf("gen %v copy %v err %v", got, st, err)
	}
	// Torn in the middle of the primary write: primary invalid, backup gen 2 wins.
	p, _ := h2.Marshal(0)
	f.WriteAt(p[:100], 0)
	if got, _, err = ReadHeader(&f); err != nil || got.Generation != 2 {
		t.Fatalf("torn primary: %v", err)
	}
	// Same generation but different contents: refused.
	h3 := h2
	h3.ReadOnly = true
	p, _ = h3.Marshal(0)
	f.WriteAt(p, 0)
	if _, _, err = ReadHeader(&f); !errors.Is(err, ErrHeadersDisagree) {
		t.Fatalf("disagree: %v", err)
	}
}

func TestCertificateRoundTrip(t *testing.T) {
	b := testCertBytes(t)
	c, err := ParseCertificate(b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(c.Bytes(), b) {
		t.Fatal("round trip differs")
	}
	if err := c.CheckHeader(testHeader(t)); err != nil {
		t.Fatal(err)
	}
	if _, err := ParseCertificate(append(b, 0)); err == nil || !strings.Contains(err.Error(), "trailing") {
		t.Fatalf("trailing bytes: %v", err)
	}
	for n := 0; n < len(b); n += 7 {
		if _, err := ParseCertificate(b[:n]); err == nil {
			t.Fatalf("truncated at %d accepted", n)
		}
	}
}

func TestCertificateRefusals(t *testing.T) {
	for _, tc := range []struct {
		field string
		mod   func(c *Certificate)
	}{
		{"image_uuid", func(c *Certificate) { c.UUID = [16]byte{} }},
		{"sector_size", func(c *Certificate) { c.SectorSize = 1000 }},
		{"virtual_size", func(c *Certificate) { c.VirtualSize = 4097 }},
		{"data_suite", func(c *Certificate) { c.Suite = 7 }},
		{"measure_alg", func(c *Certificate) { c.MeasureAlg = 9 }},
		{"not_after", func(c *Certificate) { c.NotAfter = c.NotBefore }},
		{"hpke_kem", func(c *Certificate) { c.KEM = 0x20 }},
		{"hpke_kdf", func(c *Certificate) { c.KDF = 1 }},
		{"hpke_aead", func(c *Certificate) { c.AEAD = 1 }},
		{"provider_alg", func(c *Certificate) { c.ProviderAlg = 5 }},
		{"provider_key", func(c *Certificate) { c.ProviderKey = nil }},
		{"measurements", func(c *Certificate) { c.Measurements = nil }},
		{"measurements", func(c *Certificate) { c.Measurements = [][]byte{make([]byte, 32)} }},
		{"sealed_key", func(c *Certificate) { c.SealedKey = nil }},
		{"broker_url", func(c *Certificate) { c.BrokerURL = "https://x" }},
		{"sealed_key", func(c *Certificate) { c.Remote = true }},
		{"broker_url", func(c *Certificate) { c.Remote, c.SealedKey, c.BrokerURL, c.KeyID = true, nil, "http://x", "k" }},
		{"key_id", func(c *Certificate) { c.Remote, c.SealedKey, c.BrokerURL, c.KeyID = true, nil, "https://x", "a b" }},
	} {
		c := testCert()
		tc.mod(c)
		_, err := c.MarshalBody()
		var fe *FieldError
		if !errors.As(err, &fe) || fe.Field != tc.field {
			t.Errorf("%s: got %v", tc.field, err)
		}
	}
	// Parse-side refusals of bytes no marshaller would write.
	b := testCertBytes(t)
	for _, tc := range []struct {
		field string
		off   int
		val   byte
	}{{"magic", 0, 'X'}, {"version", 9, 2}, {"flags", 11, 0x80}} {
		bb := bytes.Clone(b)
		bb[tc.off] = tc.val
		_, err := ParseCertificate(bb)
		var fe *FieldError
		if !errors.As(err, &fe) || fe.Field != tc.field {
			t.Errorf("%s: got %v", tc.field, err)
		}
	}
}

func TestCheckHeaderNamesField(t *testing.T) {
	c := testCert()
	for field, mod := range map[string]func(h *Header){
		"image_uuid":     func(h *Header) { h.UUID[15]++ },
		"virtual_size":   func(h *Header) { h.VirtualSize *= 2 },
		"sector_size":    func(h *Header) { h.SectorSize = 512 },
		"data_suite":     func(h *Header) { h.Suite = SuiteSM4GCM },
		"read-only flag": func(h *Header) { h.ReadOnly = true },
	} {
		h := testHeader(t)
		mod(h)
		err := c.CheckHeader(h)
		if !errors.Is(err, ErrImageMismatch) || !strings.Contains(err.Error(), field) {
			t.Errorf("%s: %v", field, err)
		}
	}
}

// TestHeaderVector pins FORMAT.md §8.1: the SHA-256 of the primary header copy built from
// fixed inputs. A change here is a format change.
func TestHeaderVector(t *testing.T) {
	b, err := testHeader(t).Marshal(0)
	if err != nil {
		t.Fatal(err)
	}
	cb := testCertBytes(t)
	gotCert := sha256.Sum256(cb)
	gotHdr := sha256.Sum256(b)
	const wantCert = "16b4e61ae6f226e1d57e76d1c7525a75a895995631cf67177fbc23470310596c"
	const wantHdr = "de0246676f3f5745d04bd40709cc6d19807028c9cf1273f777ab22674a089c41"
	if hex.EncodeToString(gotCert[:]) != wantCert || hex.EncodeToString(gotHdr[:]) != wantHdr {
		t.Fatalf("vectors changed:\ncert %x (len %d)\nheader %x (len %d)", gotCert, len(cb), gotHdr, len(b))
	}
}

func TestNames(t *testing.T) {
	for s := SuiteAES256GCM; s <= SuiteSM4GCM; s++ {
		if got, err := ParseSuite(s.String()); err != nil || got != s {
			t.Fatal(s)
		}
	}
	if _, err := ParseSuite("rot13"); err == nil {
		t.Fatal("unknown suite accepted")
	}
	if a, err := ParseMeasureAlg("sm3"); err != nil || a.DigestSize() != 32 {
		t.Fatal("sm3")
	}
}
