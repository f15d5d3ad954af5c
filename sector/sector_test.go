package sector

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/sealdisk/sealdisk/format"
)

var (
	vecKey  = seq(0, 32)
	vecUUID = [16]byte{0x5e, 0xa1, 0xd1, 0x5c, 0, 0, 0x40, 0, 0x80, 0, 0, 0, 0, 0, 0, 1}
	vecSalt = [SaltSize]byte(seq(0xa0, 16))
)

func seq(start byte, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = start + byte(i)
	}
	return b
}

func vecPlain(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i % 251)
	}
	return b
}

func buf(n int) []byte { return make([]byte, n, n+TagSize) }

func newCipher(t testing.TB, s format.Suite, ss int) *Cipher {
	c, err := NewCipher(s, vecKey, vecUUID, ss)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// fixedSession is a session with a chosen salt, for test vectors.
func fixedSession(t testing.TB, c *Cipher, salt [SaltSize]byte) *Session {
	s := &Session{c: c, max: ^uint64(0)}
	if err := s.rotate(&salt); err != nil {
		t.Fatal(err)
	}
	return s
}

var suites = []format.Suite{format.SuiteAES256GCM, format.SuiteChaCha20Poly1305, format.SuiteSM4GCM}

func TestRoundTripAllSuites(t *testing.T) {
	for _, s := range suites {
		for _, ss := range []int{512, 4096} {
			c := newCipher(t, s, ss)
			sess, err := c.NewSession()
			if err != nil {
				t.Fatal(err)
			}
			pt := vecPlain(ss)
			ct := buf(ss)
			var e Entry
			sess.Seal(9, ct, pt, &e)
			if bytes.Equal(ct, pt) || e.IsZero() || e.Counter() != 1 {
				t.Fatalf("%s/%d: not encrypted", s, ss)
			}
			out := buf(ss)
			if err := c.Open(9, out, ct, &e); err != nil || !bytes.Equal(out, pt) {
				t.Fatalf("%s/%d: %v", s, ss, err)
			}
			// in place
			in := append(buf(0), pt...)
			in = in[:ss:cap(in)]
			if cap(in) < ss+TagSize {
				in = append(make([]byte, 0, ss+TagSize), pt...)
			}
			sess.Seal(9, in, in, &e)
			if err := c.Open(9, in, in, &e); err != nil || !bytes.Equal(in, pt) {
				t.Fatalf("%s/%d in place: %v", s, ss, err)
			}
		}
	}
}

func TestTamperEveryField(t *testing.T) {
	c := newCipher(t, format.SuiteAES256GCM, 4096)
	sess, _ := c.NewSession()
	ct := buf(4096)
	var e Entry
	sess.Seal(7, ct, vecPlain(4096), &e)
	check := func(name string, lba uint64, ct []byte, e Entry) {
		out := buf(4096)
		err := c.Open(lba, out, ct, &e)
		var ae *AuthError
		if !errors.As(err, &ae) || !errors.Is(err, ErrAuth) || ae.LBA != lba {
			t.Fatalf("%s: got %v", name, err)
		}
		if !bytes.Equal(out, make([]byte, 4096)) {
			t.Fatalf("%s: plaintext released on failure", name)
		}
	}
	for _, i := range []int{0, 1, 2047, 4095} {
		bad := bytes.Clone(ct)
		bad[i] ^= 1
		check(fmt.Sprintf("data byte %d", i), 7, bad, e)
	}
	for i := 0; i < EntrySize; i++ {
		bad := e
		bad[i] ^= 0x10
		check(fmt.Sprintf("entry byte %d", i), 7, ct, bad)
	}
	check("moved sector", 8, ct, e)
	other, _ := NewCipher(format.SuiteAES256GCM, vecKey, [16]byte{1}, 4096)
	if err := other.Open(7, buf(4096), ct, &e); !errors.Is(err, ErrAuth) {
		t.Fatal("other image accepted the sector")
	}
}

func TestZeroEntryReadsZeros(t *testing.T) {
	c := newCipher(t, format.SuiteAES256GCM, 4096)
	out := buf(4096)
	copy(out, vecPlain(4096))
	if err := c.Open(1, out, vecPlain(4096), &Entry{}); err != nil || !bytes.Equal(out, make([]byte, 4096)) {
		t.Fatal("zero entry")
	}
}

func TestNoncesNeverRepeat(t *testing.T) {
	c := newCipher(t, format.SuiteAES256GCM, 512)
	s1, _ := c.NewSession()
	s2, _ := c.NewSession()
	if s1.cur.Load().salt == s2.cur.Load().salt {
		t.Fatal("two sessions drew one salt")
	}
	seen := sync.Map{}
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ct := buf(512)
			pt := vecPlain(512)
			for i := 0; i < 500; i++ {
				var e Entry
				s1.Seal(uint64(i), ct, pt, &e)
				if _, dup := seen.LoadOrStore(string(e[:24]), true); dup {
					t.Error("nonce repeated")
					return
				}
			}
		}()
	}
	wg.Wait()
}

func TestSaltRolloverAtCounterLimit(t *testing.T) {
	c := newCipher(t, format.SuiteAES256GCM, 512)
	s, _ := c.NewSession()
	s.max = 3
	first := s.cur.Load().salt
	ct := buf(512)
	var e Entry
	for i := 0; i < 3; i++ {
		s.Seal(1, ct, vecPlain(512), &e)
	}
	s.Seal(1, ct, vecPlain(512), &e)
	if e.Salt() == first || e.Counter() != 1 {
		t.Fatalf("no rollover: counter %d", e.Counter())
	}
	if err := c.Open(1, buf(512), ct, &e); err != nil {
		t.Fatal(err)
	}
}

func TestSessionCacheBounded(t *testing.T) {
	c := newCipher(t, format.SuiteAES256GCM, 512)
	ct := buf(512)
	var e Entry
	for i := 0; i < 3*sessionCacheSize; i++ {
		s, _ := c.NewSession()
		s.Seal(1, ct, vecPlain(512), &e)
		c.mu.Lock()
		delete(c.sessions, e.Salt()) // drop the pinned writer key, as a finished session would
		c.mu.Unlock()
		if err := c.Open(1, buf(512), ct, &e); err != nil {
			t.Fatal(err)
		}
	}
	if len(c.sessions) > sessionCacheSize {
		t.Fatalf("cache grew to %d", len(c.sessions))
	}
}

func TestNoAllocations(t *testing.T) {
	c := newCipher(t, format.SuiteAES256GCM, 4096)
	s, _ := c.NewSession()
	ct, out, pt := buf(4096), buf(4096), vecPlain(4096)
	var e Entry
	if n := testing.AllocsPerRun(100, func() { s.Seal(3, ct, pt, &e) }); n != 0 {
		t.Fatalf("Seal allocates %v", n)
	}
	if n := testing.AllocsPerRun(100, func() { _ = c.Open(3, out, ct, &e) }); n != 0 {
		t.Fatalf("Open allocates %v", n)
	}
}

func TestDestroy(t *testing.T) {
	c := newCipher(t, format.SuiteAES256GCM, 4096)
	s, _ := c.NewSession()
	ct := buf(4096)
	var e Entry
	s.Seal(1, ct, vecPlain(4096), &e)
	c.Destroy()
	if !bytes.Equal(c.key, make([]byte, 32)) || !bytes.Equal(c.jkey, make([]byte, 32)) || len(c.sessions) != 0 {
		t.Fatal("keys not zeroised")
	}
	if err := c.Open(1, buf(4096), ct, &e); !errors.Is(err, ErrAuth) {
		t.Fatal("open after destroy")
	}
}

func TestJournalCodec(t *testing.T) {
	c := newCipher(t, format.SuiteAES256GCM, 4096)
	h := make([]byte, JournalHeaderSize)
	if ep, err := c.ParseJournalHeader(h); err != nil || ep != 0 {
		t.Fatal("empty journal")
	}
	c.MarshalJournalHeader(5, h)
	if ep, err := c.ParseJournalHeader(h); err != nil || ep != 5 {
		t.Fatal(err)
	}
	h[9] ^= 1
	if _, err := c.ParseJournalHeader(h); !errors.Is(err, ErrJournal) {
		t.Fatal("tampered journal header accepted")
	}
	r := JournalRecord{Kind: RecordWrite, Epoch: 5, Seq: 3, LBA: 77, New: Entry{1, 2}, Old: Entry{3}}
	b := make([]byte, JournalRecordSize)
	c.MarshalJournalRecord(&r, b)
	got, err := c.ParseJournalRecord(b)
	if err != nil || got != r {
		t.Fatal(err)
	}
	for _, i := range []int{0, 4, 8, 24, 40, 100, 200, 250} {
		bad := bytes.Clone(b)
		bad[i] ^= 1
		if _, err := c.ParseJournalRecord(bad); !errors.Is(err, ErrJournal) {
			t.Fatalf("tampered record byte %d accepted", i)
		}
	}
	other, _ := NewCipher(format.SuiteAES256GCM, seq(1, 32), vecUUID, 4096)
	if _, err := other.ParseJournalRecord(b); !errors.Is(err, ErrJournal) {
		t.Fatal("record accepted under another key")
	}
}

// TestFormatVectors checks FORMAT.md §8.2.
func TestFormatVectors(t *testing.T) {
	want := map[format.Suite][4]string{}
	for s, v := range vectors {
		want[s] = v
	}
	got := ""
	for _, s := range suites {
		c := newCipher(t, s, 4096)
		ks, err := hkdf.Key(sha256.New, vecKey, vecSalt[:], string(c.info), keySize(s))
		if err != nil {
			t.Fatal(err)
		}
		sess := fixedSession(t, c, vecSalt)
		ct := buf(4096)
		var e Entry
		sess.Seal(7, ct, vecPlain(4096), &e)
		sum := sha256.Sum256(ct)
		v := [4]string{hex.EncodeToString(ks), hex.EncodeToString(sum[:]), hex.EncodeToString(e[24:40]), hex.EncodeToString(e[:])}
		got += fmt.Sprintf("%s: %q\n", s, v)
		if v != want[s] {
			t.Errorf("%s vector changed", s)
		}
	}
	c := newCipher(t, format.SuiteAES256GCM, 4096)
	sess := fixedSession(t, c, vecSalt)
	var e Entry
	sess.Seal(7, buf(4096), vecPlain(4096), &e)
	rec := make([]byte, JournalRecordSize)
	c.MarshalJournalRecord(&JournalRecord{Kind: RecordWrite, Epoch: 1, Seq: 0, LBA: 7, New: e}, rec)
	jr := hex.EncodeToString(rec)
	jk := hex.EncodeToString(c.jkey)
	got += fmt.Sprintf("Kj: %s\nrecord: %s\n", jk, jr)
	if jk != vectorKj || jr != vectorRecord {
		t.Error("journal vector changed")
	}
	if t.Failed() {
		t.Log("\n" + got)
	}
}

func BenchmarkSeal4096(b *testing.B) {
	for _, s := range suites {
		b.Run(s.String(), func(b *testing.B) {
			c := newCipher(b, s, 4096)
			sess, _ := c.NewSession()
			ct, pt := buf(4096), vecPlain(4096)
			var e Entry
			b.SetBytes(4096)
			for b.Loop() {
				sess.Seal(1, ct, pt, &e)
			}
		})
	}
}

func BenchmarkOpen4096(b *testing.B) {
	for _, s := range suites {
		b.Run(s.String(), func(b *testing.B) {
			c := newCipher(b, s, 4096)
			sess, _ := c.NewSession()
			ct, out := buf(4096), buf(4096)
			var e Entry
			sess.Seal(1, ct, vecPlain(4096), &e)
			b.SetBytes(4096)
			for b.Loop() {
				if err := c.Open(1, out, ct, &e); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkRawAESGCM4096 is the ceiling: the standard library's AES-256-GCM alone.
func BenchmarkRawAESGCM4096(b *testing.B) {
	blk, _ := aes.NewCipher(vecKey)
	g, _ := cipher.NewGCM(blk)
	pt, dst, nonce := vecPlain(4096), make([]byte, 0, 4096+16), make([]byte, 12)
	b.SetBytes(4096)
	for b.Loop() {
		g.Seal(dst[:0], nonce, pt, nil)
	}
}
