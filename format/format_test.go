package format

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// testUUID is 5ea1d15c-0000-4000-8000-000000000001 (FORMAT.md §10).
var testUUID = [16]byte{0x5e, 0xa1, 0xd1, 0x5c, 0, 0, 0x40, 0, 0x80, 0, 0, 0, 0, 0, 0, 1}

// testCert is the fixed, well-formed but unsigned certificate of FORMAT.md §10.1.
func testCert() *Certificate {
	return &Certificate{
		UUID: testUUID, VirtualSize: 1 << 30, SectorSize: 4096, Suite: SuiteAES256GCM,
		MeasureAlg: MeasureSHA384, NotBefore: time.Unix(1700000000, 0).UTC(), NotAfter: time.Unix(1900000000, 0).UTC(),
		ChipID: [32]byte{1, 2, 3}, KEM: KEMMLKEM768X25519, KDF: KDFHKDFSHA384, AEAD: AEADAES256GCM,
		ProviderAlg: SigECDSAP384, ProviderKey: bytes.Repeat([]byte{0x30}, 120),
		Measurements: [][]byte{bytes.Repeat([]byte{0xab}, 48)},
		SealedKey:    bytes.Repeat([]byte{0x5a}, 1168), Signature: bytes.Repeat([]byte{0x77}, 103),
	}
}

// remoteCert is testCert with a broker-held key.
func remoteCert() *Certificate {
	c := testCert()
	c.Remote, c.SealedKey, c.BrokerURL, c.KeyID = true, nil, "https://broker.example:8443/v1", "tenant-7/disk 1"
	return c
}

// certBytes marshals c (which must be valid) as stored.
func certBytes(t testing.TB, c *Certificate) []byte {
	t.Helper()
	if _, err := c.MarshalBody(); err != nil {
		t.Fatal(err)
	}
	return c.Bytes()
}

// certFor is testCert for another image shape.
func certFor(t testing.TB, uuid [16]byte, virtualSize uint64, sectorSize uint32, suite Suite, readOnly bool) []byte {
	c := testCert()
	c.UUID, c.VirtualSize, c.SectorSize, c.Suite, c.ReadOnly = uuid, virtualSize, sectorSize, suite, readOnly
	return certBytes(t, c)
}

func testHeader(t testing.TB) *Header {
	t.Helper()
	h, err := NewHeader(testUUID, 1<<30, 4096, SuiteAES256GCM, false, Layout{Version: 1}, certBytes(t, testCert()))
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func mustMarshal(t testing.TB, h *Header, copy int) []byte {
	t.Helper()
	b, err := h.Marshal(copy)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// wantField fails unless err is a *FieldError for where/field.
func wantField(t *testing.T, name string, err error, where, field string) {
	t.Helper()
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Where != where || fe.Field != field {
		t.Errorf("%s: want %s field %s, got %v", name, where, field, err)
	}
}

func TestLayoutWorkedExample(t *testing.T) {
	// FORMAT.md §1: 20 GiB, 4096-byte sectors.
	h, err := NewHeader(testUUID, 20<<30, 4096, SuiteAES256GCM, false, Layout{Version: 1}, certFor(t, testUUID, 20<<30, 4096, SuiteAES256GCM, false))
	if err != nil {
		t.Fatal(err)
	}
	if h.Sectors() != 5242880 || h.JournalOffset != 1<<20 || h.JournalSize != 4<<20 || h.MetaSize != 320<<20 ||
		h.MetaOffset != 5<<20 || h.DataOffset != 325<<20 || h.FileSize() != 20805<<20 || h.Generation != 1 {
		t.Fatalf("layout %+v", h)
	}
	if h.DataPos(0) != 325<<20 || h.DataPos(1) != 325<<20+4096 || h.EntryPos(2) != 5<<20+128 {
		t.Fatal("positions")
	}
	last := h.Sectors() - 1
	if uint64(h.DataPos(last))+4096 != h.FileSize() || uint64(h.EntryPos(last))+64 > h.DataOffset {
		t.Fatal("last sector does not end at the file end / inside the metadata region")
	}
}

func TestLayoutSmallAnd512(t *testing.T) {
	for _, tc := range []struct {
		vs                   uint64
		ss                   uint32
		journal              uint64
		metaSize, dataOffset uint64
	}{
		{4096, 4096, 0, 1 << 20, 6 << 20},               // one sector still takes a 1 MiB metadata region
		{512, 512, 1 << 20, 1 << 20, 3 << 20},           // smallest journal
		{1 << 30, 512, 0, 128 << 20, 133 << 20},         // 512-byte sectors: 8× the metadata
		{16384 << 12, 4096, 8 << 20, 1 << 20, 10 << 20}, // exactly 1 MiB of entries
		{16385 << 12, 4096, 8 << 20, 2 << 20, 11 << 20}, // one entry over
	} {
		h, err := NewHeader(testUUID, tc.vs, tc.ss, SuiteSM4GCM, true, Layout{Version: 1, JournalSize: tc.journal}, certFor(t, testUUID, tc.vs, tc.ss, SuiteSM4GCM, true))
		if err != nil {
			t.Fatalf("%+v: %v", tc, err)
		}
		if h.MetaSize != tc.metaSize || h.DataOffset != tc.dataOffset || h.FileSize() != tc.dataOffset+tc.vs {
			t.Errorf("%+v: got meta %d data %d", tc, h.MetaSize, h.DataOffset)
		}
		for _, off := range []uint64{h.JournalOffset, h.MetaOffset, h.DataOffset} {
			if off%RegionAlign != 0 {
				t.Errorf("%+v: region offset %d not 1 MiB aligned", tc, off)
			}
		}
	}
}

func TestRoundUpVirtualSize(t *testing.T) {
	for _, tc := range []struct {
		n    uint64
		ss   uint32
		want uint64
	}{
		{0, 4096, 0}, {1, 4096, 4096}, {4095, 4096, 4096}, {4096, 4096, 4096}, {4097, 4096, 8192},
		{511, 512, 512}, {512, 512, 512}, {513, 512, 1024},
	} {
		if got := RoundUpVirtualSize(tc.n, tc.ss); got != tc.want {
			t.Errorf("RoundUpVirtualSize(%d, %d) = %d, want %d", tc.n, tc.ss, got, tc.want)
		}
	}
}

func TestPositionBeyondDiskPanics(t *testing.T) {
	h := testHeader(t)
	for name, f := range map[string]func(){
		"DataPos":  func() { h.DataPos(h.Sectors()) },
		"EntryPos": func() { h.EntryPos(h.Sectors()) },
	} {
		func() {
			defer func() {
				if r := recover(); r == nil || !strings.HasPrefix(r.(string), "BUG: ") {
					t.Errorf("%s: want a BUG panic, got %v", name, r)
				}
			}()
			f()
		}()
	}
}

func TestNewHeaderRefusals(t *testing.T) {
	v1UUID := testUUID
	v1UUID[6] = 0x10
	good := certBytes(t, testCert())
	for _, tc := range []struct {
		name    string
		uuid    [16]byte
		vs      uint64
		ss      uint32
		suite   Suite
		ro      bool
		journal uint64
		cert    []byte
		field   string
	}{
		{"zero uuid", [16]byte{}, 1 << 30, 4096, 1, false, 0, good, "image_uuid"},
		{"v1 uuid", v1UUID, 1 << 30, 4096, 1, false, 0, good, "image_uuid"},
		{"sector 1024", testUUID, 1 << 30, 1024, 1, false, 0, good, "sector_size"},
		{"sector 0", testUUID, 1 << 30, 0, 1, false, 0, good, "sector_size"},
		{"size 0", testUUID, 0, 4096, 1, false, 0, good, "virtual_size"},
		{"size unaligned", testUUID, 1<<30 + 512, 4096, 1, false, 0, good, "virtual_size"},
		{"size over 1 PiB", testUUID, 1<<50 + 4096, 4096, 1, false, 0, good, "virtual_size"},
		{"suite 0", testUUID, 1 << 30, 4096, 0, false, 0, good, "data_suite"},
		{"suite 4", testUUID, 1 << 30, 4096, 4, false, 0, good, "data_suite"},
		{"journal 512 KiB", testUUID, 1 << 30, 4096, 1, false, 512 << 10, good, "journal_size"},
		{"journal 1.5 MiB", testUUID, 1 << 30, 4096, 1, false, 3 << 19, good, "journal_size"},
		{"journal 2 GiB", testUUID, 1 << 30, 4096, 1, false, 2 << 30, good, "journal_size"},
		{"no cert", testUUID, 1 << 30, 4096, 1, false, 0, nil, "cert_len"},
		{"cert too long", testUUID, 1 << 30, 4096, 1, false, 0, make([]byte, maxCertLen+1), "cert_len"},
		{"garbage cert", testUUID, 1 << 30, 4096, 1, false, 0, []byte("SDCERT01 but not really"), "certificate"},
		{"cert for other suite", testUUID, 1 << 30, 4096, SuiteChaCha20Poly1305, false, 0, good, "data_suite"},
		{"cert for other size", testUUID, 2 << 30, 4096, 1, false, 0, good, "virtual_size"},
		{"cert not read-only", testUUID, 1 << 30, 4096, 1, true, 0, good, "flags"},
	} {
		_, err := NewHeader(tc.uuid, tc.vs, tc.ss, tc.suite, tc.ro, Layout{Version: 1, JournalSize: tc.journal}, tc.cert)
		wantField(t, tc.name, err, "header", tc.field)
	}
	// Maximum size and journal are accepted.
	if _, err := NewHeader(testUUID, 1<<50, 4096, 1, false, Layout{Version: 1, JournalSize: 1 << 30}, certFor(t, testUUID, 1<<50, 4096, 1, false)); err != nil {
		t.Errorf("1 PiB with 1 GiB journal: %v", err)
	}
	_, err := NewHeader(testUUID, 2<<30, 4096, 1, false, Layout{Version: 1}, good)
	if !errors.Is(err, ErrImageMismatch) {
		t.Errorf("mismatch does not wrap ErrImageMismatch: %v", err)
	}
	_, err = NewHeader(testUUID, 1<<30, 4096, 1, false, Layout{Version: 1}, good[:100])
	var inner *FieldError
	if !errors.As(errors.Unwrap(err), &inner) || inner.Where != "certificate" {
		t.Errorf("certificate error does not unwrap to the certificate's field: %v", err)
	}
}

func TestHeaderValidateStruct(t *testing.T) {
	for _, tc := range []struct {
		field string
		mod   func(h *Header)
	}{
		{"generation", func(h *Header) { h.Generation = 0 }},
		{"journal_offset", func(h *Header) { h.JournalOffset = 2 << 20 }},
		{"meta_offset", func(h *Header) { h.MetaOffset += RegionAlign }},
		{"meta_size", func(h *Header) { h.MetaSize += RegionAlign; h.DataOffset += RegionAlign }},
		{"data_offset", func(h *Header) { h.DataOffset += RegionAlign }},
		{"image_uuid", func(h *Header) { h.UUID[15]++ }},
	} {
		h := testHeader(t)
		tc.mod(h)
		wantField(t, tc.field, h.Validate(), "header", tc.field)
		if _, err := h.Marshal(0); err == nil {
			t.Errorf("%s: Marshal accepted an invalid header", tc.field)
		}
	}
}

func TestCheckHeaderNamesField(t *testing.T) {
	c := testCert()
	if err := c.CheckHeader(testHeader(t)); err != nil {
		t.Fatal(err)
	}
	for field, mod := range map[string]func(h *Header){
		"image_uuid":   func(h *Header) { h.UUID[15]++ },
		"virtual_size": func(h *Header) { h.VirtualSize *= 2 },
		"sector_size":  func(h *Header) { h.SectorSize = 512 },
		"data_suite":   func(h *Header) { h.Suite = SuiteSM4GCM },
		"read-only":    func(h *Header) { h.ReadOnly = true },
	} {
		h := testHeader(t)
		mod(h)
		err := c.CheckHeader(h)
		if !errors.Is(err, ErrImageMismatch) || !strings.Contains(err.Error(), field) {
			t.Errorf("%s: %v", field, err)
		}
	}
}

// TestHeaderVector pins FORMAT.md §10.1: the certificate and primary header copy built from
// fixed inputs. A change here is a format change.
func TestHeaderVector(t *testing.T) {
	cb := certBytes(t, testCert())
	b := mustMarshal(t, testHeader(t), 0)
	gotCert, gotHdr := sha256.Sum256(cb), sha256.Sum256(b)
	const (
		wantCertLen = 1555
		wantCert    = "16b4e61ae6f226e1d57e76d1c7525a75a895995631cf67177fbc23470310596c"
		wantHdrLen  = 1715
		wantHdr     = "de0246676f3f5745d04bd40709cc6d19807028c9cf1273f777ab22674a089c41"
	)
	if len(cb) != wantCertLen || hex.EncodeToString(gotCert[:]) != wantCert ||
		len(b) != wantHdrLen || hex.EncodeToString(gotHdr[:]) != wantHdr {
		t.Fatalf("vectors changed:\ncert %x (len %d)\nheader %x (len %d)", gotCert, len(cb), gotHdr, len(b))
	}
	// The parsed vector reads back as the inputs.
	h, err := ParseHeader(b, 0)
	if err != nil {
		t.Fatal(err)
	}
	if h.Generation != 1 || h.UUID != testUUID || h.VirtualSize != 1<<30 || h.SectorSize != 4096 ||
		h.Suite != SuiteAES256GCM || h.ReadOnly || h.JournalSize != 4<<20 || !bytes.Equal(h.Cert, cb) {
		t.Fatalf("parsed vector %+v", h)
	}
}

func TestNames(t *testing.T) {
	for _, tc := range []struct {
		name  string
		alias string
		s     Suite
	}{{"aes-256-gcm", "aes", SuiteAES256GCM}, {"chacha20-poly1305", "chacha20", SuiteChaCha20Poly1305}, {"sm4-gcm", "sm4", SuiteSM4GCM}} {
		if tc.s.String() != tc.name {
			t.Errorf("%d prints as %q", tc.s, tc.s.String())
		}
		for _, n := range []string{tc.name, tc.alias} {
			if got, err := ParseSuite(n); err != nil || got != tc.s {
				t.Errorf("ParseSuite(%q) = %v, %v", n, got, err)
			}
		}
	}
	for _, n := range []string{"", "rot13", "AES-256-GCM", "suite(1)"} {
		if _, err := ParseSuite(n); err == nil {
			t.Errorf("ParseSuite(%q) accepted", n)
		}
	}
	if Suite(9).String() != "suite(9)" || Suite(0).Valid() || Suite(4).Valid() {
		t.Error("unknown suite")
	}
	for _, tc := range []struct {
		name string
		a    MeasureAlg
		size int
	}{{"sha384", MeasureSHA384, 48}, {"sm3", MeasureSM3, 32}} {
		if a, err := ParseMeasureAlg(tc.name); err != nil || a != tc.a || a.String() != tc.name || a.DigestSize() != tc.size || !a.Valid() {
			t.Errorf("%s: %v %v", tc.name, a, err)
		}
	}
	if _, err := ParseMeasureAlg("sha256"); err == nil || MeasureAlg(3).DigestSize() != 0 || MeasureAlg(3).Valid() {
		t.Error("unknown measurement algorithm")
	}
	for _, tc := range []struct {
		name string
		a    SigAlg
	}{{"ecdsa-p384", SigECDSAP384}, {"ed25519", SigEd25519}} {
		if a, err := ParseSigAlg(tc.name); err != nil || a != tc.a || a.String() != tc.name || !a.Valid() {
			t.Errorf("%s: %v %v", tc.name, a, err)
		}
	}
	if _, err := ParseSigAlg("rsa"); err == nil || SigAlg(3).Valid() || SigAlg(3).String() != "sig-alg(3)" {
		t.Error("unknown signature algorithm")
	}
	if KEMName(KEMMLKEM768X25519) != "mlkem768-x25519" || KEMName(KEMDHKEMP384) != "dhkem-p384" || KEMName(0x20) != "kem(0x0020)" {
		t.Error("KEM names")
	}
}

// TestNoFrontendImports enforces house habit 3: format imports no frontend.
func TestNoFrontendImports(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("go tool not found: %v", err)
	}
	out, err := exec.Command(goBin, "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		if strings.Contains(dep, "go-fuse") || strings.Contains(dep, "go-nbd") || strings.HasPrefix(dep, "github.com/sealdisk/sealdisk/") && dep != "github.com/sealdisk/sealdisk/format" && dep != "github.com/sealdisk/sealdisk/internal/zeros" {
			t.Errorf("format depends on %s", dep)
		}
	}
}

func TestMarshalBadCopyPanics(t *testing.T) {
	defer func() {
		if r, _ := recover().(string); !strings.HasPrefix(r, "BUG: ") {
			t.Errorf("want a BUG panic, got %q", r)
		}
	}()
	testHeader(t).Marshal(2)
}
