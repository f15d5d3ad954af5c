package statefile

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"testing"
	"testing/iotest"
	"time"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/internal/fixture"
	"github.com/sealdisk/sealdisk/provider"
)

func TestMain(m *testing.M) { fixture.Main(m) }

var testUUID = [16]byte{1, 2, 3, 4, 5, 6, 0x40, 8, 0x80, 10, 11, 12, 13, 14, 15, 16}

func sealed(t *testing.T, suite format.Suite, key, plain []byte) []byte {
	t.Helper()
	var out bytes.Buffer
	n, err := Seal(&out, bytes.NewReader(plain), suite, testUUID, []byte("certificate bytes"), key)
	if err != nil || n != int64(len(plain)) {
		t.Fatalf("Seal: %d bytes, %v", n, err)
	}
	return out.Bytes()
}

func open(file, key []byte) ([]byte, error) {
	r := bytes.NewReader(file)
	h, err := ReadHeader(r)
	if err != nil {
		return nil, err
	}
	var out bytes.Buffer
	n, err := Open(&out, r, h, key)
	if err == nil && n != int64(out.Len()) {
		return nil, errors.New("Open miscounted")
	}
	return out.Bytes(), err
}

func random(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// TestRoundTrip: every length around chunk boundaries, every suite, read in one go or a byte
// at a time, comes back whole.
func TestRoundTrip(t *testing.T) {
	key := random(32)
	for _, suite := range []format.Suite{format.SuiteAES256GCM, format.SuiteChaCha20Poly1305, format.SuiteSM4GCM} {
		for _, n := range []int{0, 1, ChunkSize - 1, ChunkSize, ChunkSize + 1, 3 * ChunkSize, 3*ChunkSize + 17} {
			plain := random(n)
			file := sealed(t, suite, key, plain)
			got, err := open(file, key)
			if err != nil || !bytes.Equal(got, plain) {
				t.Fatalf("%s, %d bytes: %v (got %d bytes)", suite, n, err, len(got))
			}
			if n > 64 && bytes.Contains(file, plain[:64]) {
				t.Fatalf("%s, %d bytes: plaintext in the file", suite, n)
			}
			// Readers that return a byte at a time (pipes do short reads).
			r := iotest.OneByteReader(bytes.NewReader(file))
			h, err := ReadHeader(r)
			if err != nil {
				t.Fatal(err)
			}
			var out bytes.Buffer
			if _, err := Open(&out, r, h, key); err != nil || !bytes.Equal(out.Bytes(), plain) {
				t.Fatalf("%s, %d bytes, one byte per read: %v", suite, n, err)
			}
		}
	}
}

// TestSealFromAReaderThatFails: a source error is Seal's error, and what it wrote has no last
// chunk, so it does not open.
func TestSealFromAReaderThatFails(t *testing.T) {
	key := random(32)
	var out bytes.Buffer
	src := io.MultiReader(bytes.NewReader(random(2*ChunkSize+5)), iotest.ErrReader(errors.New("pipe broke")))
	if _, err := Seal(&out, src, format.SuiteAES256GCM, testUUID, []byte("c"), key); err == nil {
		t.Fatal("Seal succeeded on a failing source")
	}
	if _, err := open(out.Bytes(), key); !errors.Is(err, ErrTruncated) {
		t.Fatalf("the partial file opens: %v", err)
	}
}

// TestRefused: a changed byte anywhere, chunks swapped, a chunk dropped, a file cut at a chunk
// boundary or inside a chunk, data appended, the wrong key: each refused with its own error, and
// no plaintext of a chunk that fails is written.
func TestRefused(t *testing.T) {
	key := random(32)
	plain := random(3*ChunkSize + 100)
	file := sealed(t, format.SuiteAES256GCM, key, plain)
	hl := headerFixed + len("certificate bytes")
	cl := ChunkSize + tagSize
	chunk := func(i int) []byte { return file[hl+i*cl : min(hl+(i+1)*cl, len(file))] }
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	flip := func(off int) []byte {
		b := bytes.Clone(file)
		b[off] ^= 0x20
		return b
	}
	cases := []struct {
		name string
		file []byte
		key  []byte
		want error
		max  int // plaintext bytes that may come out first
	}{
		{"byte in the magic", flip(2), key, ErrHeader, 0},
		{"byte in the suite", flip(11), key, ErrHeader, 0},
		{"byte in the uuid", flip(20), key, ErrAuth, 0},
		{"byte in the certificate", flip(hl - 1), key, ErrAuth, 0},
		{"byte in chunk 1", flip(hl + cl + 5), key, ErrAuth, ChunkSize},
		{"byte in the last tag", flip(len(file) - 1), key, ErrAuth, 3 * ChunkSize},
		{"chunks 1 and 2 swapped", cat(file[:hl], chunk(0), chunk(2), chunk(1), chunk(3)), key, ErrAuth, ChunkSize},
		{"chunk 2 dropped", cat(file[:hl], chunk(0), chunk(1), chunk(3)), key, ErrAuth, 2 * ChunkSize},
		{"cut after chunk 2", file[:hl+3*cl], key, ErrTruncated, 3 * ChunkSize},
		{"cut inside chunk 3", file[:len(file)-7], key, ErrAuth, 3 * ChunkSize},
		{"cut inside a tag's length", file[:hl+3*cl+9], key, ErrTruncated, 3 * ChunkSize},
		{"header only", file[:hl], key, ErrTruncated, 0},
		{"data appended", cat(file, []byte("more")), key, ErrAuth, 3 * ChunkSize},
		{"the wrong key", file, random(32), ErrAuth, 0},
	}
	for _, tc := range cases {
		got, err := open(tc.file, tc.key)
		if !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
		if len(got) > tc.max || !bytes.Equal(got, plain[:len(got)]) {
			t.Errorf("%s: %d bytes came out (at most %d, all authentic)", tc.name, len(got), tc.max)
		}
	}
	// A full last chunk with data after it: the appended bytes are named as such.
	exact := sealed(t, format.SuiteAES256GCM, key, plain[:2*ChunkSize])
	if _, err := open(cat(exact, []byte("x")), key); !errors.Is(err, ErrTrailing) {
		t.Errorf("a byte after a full last chunk: %v, want %v", err, ErrTrailing)
	}
}

// TestCheckCertificate: only the header's own certificate, of its uuid and suite, sized as a
// state key and read-only, is accepted; an image's certificate is not.
func TestCheckCertificate(t *testing.T) {
	w := fixture.Shared(t)
	issue := func(mod func(r *provider.IssueRequest)) *format.Certificate {
		r := provider.IssueRequest{
			Chip: w.Chip, UUID: testUUID, VirtualSize: ChunkSize, SectorSize: SectorSize, Suite: format.SuiteAES256GCM, ReadOnly: true,
			MeasureAlg: format.MeasureSHA384, Measurements: [][]byte{w.FirmwareDigest},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), ImageKey: random(32),
		}
		if mod != nil {
			mod(&r)
		}
		c, err := provider.Issue(w.Provider, r)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	header := func(c *format.Certificate) *Header {
		var out bytes.Buffer
		if _, err := Seal(&out, bytes.NewReader(nil), format.SuiteAES256GCM, testUUID, c.Bytes(), random(32)); err != nil {
			t.Fatal(err)
		}
		h, err := ReadHeader(&out)
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	good := issue(nil)
	if err := header(good).CheckCertificate(good); err != nil {
		t.Fatalf("the state's own certificate: %v", err)
	}
	for name, mod := range map[string]func(r *provider.IssueRequest){
		"an image's certificate": func(r *provider.IssueRequest) { r.VirtualSize, r.ReadOnly = 1<<30, false },
		"not read-only":          func(r *provider.IssueRequest) { r.ReadOnly = false },
		"another uuid":           func(r *provider.IssueRequest) { r.UUID[0] ^= 1 },
		"another suite":          func(r *provider.IssueRequest) { r.Suite = format.SuiteChaCha20Poly1305 },
	} {
		c := issue(mod)
		if err := header(c).CheckCertificate(c); err == nil {
			t.Errorf("%s accepted", name)
		}
	}
	if err := header(good).CheckCertificate(issue(nil)); err == nil {
		t.Error("a certificate other than the header's accepted")
	}
}

func FuzzOpen(f *testing.F) {
	key := bytes.Repeat([]byte{7}, 32)
	var out bytes.Buffer
	Seal(&out, bytes.NewReader(bytes.Repeat([]byte("state"), ChunkSize/5+3)), format.SuiteAES256GCM, testUUID, []byte("c"), key) // deterministic: every fuzz worker seals it again
	f.Add(out.Bytes())
	f.Fuzz(func(t *testing.T, b []byte) {
		got, err := open(b, key)
		if err == nil && !bytes.Equal(b, out.Bytes()) && len(got) > 0 {
			// Only the sealed file itself (or another valid sealing) opens; a fuzzer cannot
			// forge one, so any other input that opens to data is a failure.
			t.Fatalf("a forged state file opened to %d bytes", len(got))
		}
	})
}
