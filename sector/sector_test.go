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
	"math"
	"strings"
	"sync"
	"testing"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/internal/zeros"
)

var (
	vecKey  = seq(0, 32)
	vecUUID = [16]byte{0x5e, 0xa1, 0xd1, 0x5c, 0, 0, 0x40, 0, 0x80, 0, 0, 0, 0, 0, 0, 1}
	vecSalt = [SaltSize]byte(seq(0xa0, 16))
)

var suites = []format.Suite{format.SuiteAES256GCM, format.SuiteChaCha20Poly1305, format.SuiteSM4GCM}

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

// buf is a sector buffer with the tag slack Seal and Open need.
func buf(n int) []byte { return make([]byte, n, n+TagSize) }

func newCipher(t testing.TB, s format.Suite, ss int) *Cipher {
	t.Helper()
	c, err := NewCipher(s, vecKey, vecUUID, ss)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func newSession(t testing.TB, c *Cipher) *Session {
	t.Helper()
	s, err := c.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func sealed(t testing.TB, s *Session, lba uint64) ([]byte, Entry) {
	t.Helper()
	ct := buf(s.c.sectorSize)
	var e Entry
	s.Seal(lba, ct, vecPlain(s.c.sectorSize), &e)
	return ct, e
}

func mustPanic(t *testing.T, want string, f func()) {
	t.Helper()
	defer func() {
		t.Helper()
		r := recover()
		if s, _ := r.(string); !strings.Contains(s, want) {
			t.Fatalf("panic %v, want one containing %q", r, want)
		}
	}()
	f()
}

func TestNewCipherRefuses(t *testing.T) {
	for _, tc := range []struct {
		suite format.Suite
		key   []byte
		ss    int
		want  string
	}{
		{0, vecKey, 4096, "suite"},
		{4, vecKey, 4096, "suite"},
		{format.SuiteAES256GCM, vecKey[:31], 4096, "image key"},
		{format.SuiteAES256GCM, vecKey, 1024, "sector size"},
		{format.SuiteAES256GCM, vecKey, 0, "sector size"},
	} {
		if _, err := NewCipher(tc.suite, tc.key, vecUUID, tc.ss); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v/%d/%d: got %v", tc.suite, len(tc.key), tc.ss, err)
		}
	}
}

func TestEntryAccessors(t *testing.T) {
	var e Entry
	if !e.IsZero() {
		t.Fatal("zero entry not zero")
	}
	copy(e[:], vecSalt[:])
	e[23] = 5
	if e.IsZero() || e.Salt() != vecSalt || e.Counter() != 5 {
		t.Fatalf("accessors: %x %d", e.Salt(), e.Counter())
	}
	e = Entry{}
	e[63] = 1
	if e.IsZero() {
		t.Fatal("reserved byte ignored by IsZero")
	}
}

func TestRoundTrip(t *testing.T) {
	for _, s := range suites {
		for _, ss := range []int{512, 4096} {
			t.Run(fmt.Sprintf("%s/%d", s, ss), func(t *testing.T) {
				c := newCipher(t, s, ss)
				sess := newSession(t, c)
				pt := vecPlain(ss)
				for i, lba := range []uint64{0, 1, 9, math.MaxUint64} {
					ct, e := sealed(t, sess, lba)
					if bytes.Equal(ct, pt) || e.Counter() != uint64(i+1) || e.Salt() != sess.Salt() || !zeros.All(e[40:]) {
						t.Fatalf("lba %d: entry %x", lba, e)
					}
					out := buf(ss)
					if err := c.Open(lba, out, ct, &e); err != nil || !bytes.Equal(out, pt) {
						t.Fatalf("lba %d: %v", lba, err)
					}
				}
				// In place: dst is pt for Seal and ct for Open.
				b := append(make([]byte, 0, ss+TagSize), pt...)
				var e Entry
				sess.Seal(3, b, b, &e)
				if bytes.Equal(b, pt) {
					t.Fatal("in-place seal left plaintext")
				}
				if err := c.Open(3, b, b, &e); err != nil || !bytes.Equal(b, pt) {
					t.Fatalf("in place: %v", err)
				}
				// Another Cipher from the same key reads it (a reopened image).
				c2 := newCipher(t, s, ss)
				ct, e := sealed(t, sess, 4)
				if err := c2.Open(4, buf(ss), ct, &e); err != nil {
					t.Fatalf("reopened image: %v", err)
				}
			})
		}
	}
}

func TestSealOpenRefuseBadBuffers(t *testing.T) {
	c := newCipher(t, format.SuiteAES256GCM, 512)
	s := newSession(t, c)
	var e Entry
	mustPanic(t, "BUG: sector: Seal buffer", func() { s.Seal(0, make([]byte, 512), vecPlain(512), &e) })
	mustPanic(t, "BUG: sector: Seal buffer", func() { s.Seal(0, buf(512), vecPlain(511), &e) })
	mustPanic(t, "BUG: sector: Open buffer", func() { _ = c.Open(0, buf(4096), buf(4096), &e) })
}

func TestTamperFailsNamingLBA(t *testing.T) {
	for _, s := range suites {
		t.Run(s.String(), func(t *testing.T) {
			c := newCipher(t, s, 4096)
			ct, e := sealed(t, newSession(t, c), 7)
			check := func(name string, c *Cipher, lba uint64, ct []byte, e Entry) {
				t.Helper()
				out := buf(4096)
				copy(out, vecPlain(4096))
				err := c.Open(lba, out, ct, &e)
				var ae *AuthError
				if !errors.As(err, &ae) || !errors.Is(err, ErrAuth) || ae.LBA != lba ||
					!strings.Contains(err.Error(), fmt.Sprintf("sector %d ", lba)) {
					t.Fatalf("%s: got %v", name, err)
				}
				if !zeros.All(out[:cap(out)]) {
					t.Fatalf("%s: plaintext released on failure", name)
				}
			}
			for _, i := range []int{0, 1, 2047, 4095} {
				bad := bytes.Clone(ct)
				bad[i] ^= 1
				check(fmt.Sprintf("data byte %d", i), c, 7, bad, e)
			}
			for i := range EntrySize { // salt, counter, tag and reserved bytes
				bad := e
				bad[i] ^= 0x10
				check(fmt.Sprintf("entry byte %d", i), c, 7, ct, bad)
			}
			zeroCtr := e
			clear(zeroCtr[16:24])
			check("counter zero", c, 7, ct, zeroCtr)
			check("moved sector", c, 8, ct, e)
			check("moved sector", c, 6, ct, e)
			other, _ := NewCipher(s, vecKey, [16]byte{1}, 4096)
			check("other image, same key", other, 7, ct, e)
			otherKey, _ := NewCipher(s, seq(1, 32), vecUUID, 4096)
			check("other key", otherKey, 7, ct, e)
			otherSuite := format.SuiteAES256GCM
			if s == otherSuite {
				otherSuite = format.SuiteChaCha20Poly1305
			}
			otherS, _ := NewCipher(otherSuite, vecKey, vecUUID, 4096)
			check("other suite", otherS, 7, ct, e)
		})
	}
}

// TestZeroEntryOpensAsZeros: to the cipher a zero entry is a never-written sector. Whether a
// zero entry may be believed is the integrity tree's to say (its page's digest): the engine's
// and the binary's freshness tests show a zeroed entry refused (TestFreshnessThroughBinary).
func TestZeroEntryOpensAsZeros(t *testing.T) {
	c := newCipher(t, format.SuiteAES256GCM, 4096)
	out := buf(4096)
	copy(out, vecPlain(4096))
	if err := c.Open(1, out, vecPlain(4096), &Entry{}); err != nil || !zeros.All(out) {
		t.Fatalf("zero entry: %v", err)
	}
}

// TestNoncesNeverRepeat seals concurrently with a small counter limit, so salts roll over
// while other goroutines seal, and checks that no (salt, counter) pair is handed out twice
// and every sector still opens.
func TestNoncesNeverRepeat(t *testing.T) {
	c := newCipher(t, format.SuiteAES256GCM, 512)
	s := newSession(t, c)
	s.max = 97
	const goroutines, each = 8, 400
	var mu sync.Mutex
	seen := map[[24]byte]bool{}
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			ct, pt := buf(512), vecPlain(512)
			for i := range each {
				lba := uint64(g*each + i)
				var e Entry
				s.Seal(lba, ct, pt, &e)
				if ctr := e.Counter(); ctr < 1 || ctr > s.max {
					t.Errorf("counter %d outside 1..%d", ctr, s.max)
				}
				if err := c.Open(lba, buf(512), ct, &e); err != nil {
					t.Error(err)
				}
				mu.Lock()
				if seen[[24]byte(e[:24])] {
					t.Errorf("nonce (salt %x, counter %d) repeated", e.Salt(), e.Counter())
				}
				seen[[24]byte(e[:24])] = true
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if len(seen) != goroutines*each {
		t.Fatalf("%d nonces for %d seals", len(seen), goroutines*each)
	}
}

func TestSessionsDrawDistinctSalts(t *testing.T) {
	c := newCipher(t, format.SuiteAES256GCM, 512)
	salts := map[[SaltSize]byte]bool{}
	for range 100 {
		s := newSession(t, c)
		if salts[s.Salt()] || s.Salt() == ([SaltSize]byte{}) {
			t.Fatalf("salt %x drawn twice", s.Salt())
		}
		salts[s.Salt()] = true
		s.Close()
	}
	if _, err := c.newSession(&vecSalt); err != nil {
		t.Fatal(err)
	}
	if _, err := c.newSession(&vecSalt); err == nil {
		t.Fatal("a known salt was reused for writing")
	}
}

func TestSaltRollover(t *testing.T) {
	c := newCipher(t, format.SuiteAES256GCM, 512)
	s := newSession(t, c)
	s.max = 3
	first := s.Salt()
	var cts [][]byte
	var es []Entry
	for i := range 5 {
		ct, e := sealed(t, s, uint64(i))
		cts, es = append(cts, ct), append(es, e)
	}
	for i, e := range es {
		wantSalt, wantCtr := first, uint64(i+1)
		if i >= 3 {
			wantSalt, wantCtr = s.Salt(), uint64(i-2)
		}
		if e.Salt() != wantSalt || e.Counter() != wantCtr {
			t.Fatalf("seal %d: salt %x counter %d", i, e.Salt(), e.Counter())
		}
		if err := c.Open(uint64(i), buf(512), cts[i], &e); err != nil {
			t.Fatal(err)
		}
	}
	if s.Salt() == first {
		t.Fatal("no new salt after the counter limit")
	}
	if n := c.derivations.Load(); n != 2 {
		t.Fatalf("%d derivations, want 2 (the old key stays cached for reads)", n)
	}
}

// TestCounterLimitIsTheLastUint64 uses the real limit: the counter reaches 2^64−1 under one
// salt and never wraps to a used value.
func TestCounterLimitIsTheLastUint64(t *testing.T) {
	c := newCipher(t, format.SuiteAES256GCM, 512)
	s := newSession(t, c)
	first := s.Salt()
	s.st.ctr.Store(math.MaxUint64 - 1)
	_, e := sealed(t, s, 1)
	if e.Salt() != first || e.Counter() != math.MaxUint64 {
		t.Fatalf("salt %x counter %d", e.Salt(), e.Counter())
	}
	_, e = sealed(t, s, 1)
	if e.Salt() == first || e.Counter() != 1 {
		t.Fatalf("after 2^64-1: salt %x counter %d", e.Salt(), e.Counter())
	}
}

func TestSessionClose(t *testing.T) {
	c := newCipher(t, format.SuiteAES256GCM, 512)
	s := newSession(t, c)
	ct, e := sealed(t, s, 1)
	s.Close()
	s.Close()
	mustPanic(t, "BUG: sector: Seal on a closed session", func() { sealed(t, s, 2) })
	if err := c.Open(1, buf(512), ct, &e); err != nil {
		t.Fatal(err)
	}
	if n := c.derivations.Load(); n != 1 {
		t.Fatalf("%d derivations: a closed session's key must stay cached", n)
	}
}

// TestKeyCache: reads of sectors from many past sessions derive each key once while it
// fits, memory stays bounded past that, open sessions' keys are never evicted, and a hot
// key survives a scan through many others.
func TestKeyCache(t *testing.T) {
	c := newCipher(t, format.SuiteAES256GCM, 512)
	writer := newSession(t, c)
	wct, we := sealed(t, writer, 0)
	type sector struct {
		ct []byte
		e  Entry
	}
	var old []sector
	for i := range 3 * sessionCacheSize {
		s := newSession(t, c)
		ct, e := sealed(t, s, uint64(i+1))
		old = append(old, sector{ct, e})
		s.Close()
	}
	open := func(lba uint64, s sector) {
		t.Helper()
		if err := c.Open(lba, buf(512), s.ct, &s.e); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(c.keys.bySalt); n != sessionCacheSize+1 {
		t.Fatalf("cache holds %d keys, want %d unpinned + 1 pinned", n, sessionCacheSize)
	}

	// The most recent sessions are cached: rereading them derives nothing.
	before := c.derivations.Load()
	recent := old[len(old)-sessionCacheSize:]
	for range 3 {
		for i, s := range recent {
			open(uint64(len(old)-sessionCacheSize+i+1), s)
		}
	}
	if d := c.derivations.Load() - before; d != 0 {
		t.Fatalf("rereading cached sessions derived %d keys", d)
	}

	// A hot key read between misses survives a scan through all older sessions. (Not the
	// key under the hand: with every bit set, CLOCK's first sweep evicts that one.)
	hot, hotLBA := old[len(old)-1], uint64(len(old))
	before = c.derivations.Load()
	for i, s := range old[:2*sessionCacheSize] {
		open(hotLBA, hot)
		open(uint64(i+1), s)
	}
	if d := c.derivations.Load() - before; d != 2*sessionCacheSize {
		t.Fatalf("scan of %d evicted sessions derived %d keys (the hot key was evicted?)", 2*sessionCacheSize, d)
	}
	if len(c.keys.bySalt) != sessionCacheSize+1 || len(c.keys.ring) != sessionCacheSize {
		t.Fatalf("cache grew to %d keys", len(c.keys.bySalt))
	}
	// The open writer's key was never evicted.
	before = c.derivations.Load()
	open(0, sector{wct, we})
	sealed(t, writer, 1)
	if c.derivations.Load() != before {
		t.Fatal("the open session's key was evicted")
	}
}

func TestNoAllocations(t *testing.T) {
	for _, s := range suites {
		c := newCipher(t, s, 4096)
		old := newSession(t, c)
		oct, oe := sealed(t, old, 5)
		old.Close()
		sess := newSession(t, c)
		ct, out, pt := buf(4096), buf(4096), vecPlain(4096)
		var e Entry
		if n := testing.AllocsPerRun(100, func() { sess.Seal(3, ct, pt, &e) }); n != 0 {
			t.Errorf("%s: Seal allocates %v", s, n)
		}
		if n := testing.AllocsPerRun(100, func() { _ = c.Open(3, out, ct, &e) }); n != 0 {
			t.Errorf("%s: Open (open session's key) allocates %v", s, n)
		}
		if n := testing.AllocsPerRun(100, func() { _ = c.Open(5, out, oct, &oe) }); n != 0 {
			t.Errorf("%s: Open (cached past session) allocates %v", s, n)
		}
		run, ents := make([]byte, 2*4096), make([]Entry, 2)
		if n := testing.AllocsPerRun(100, func() {
			sess.Seal(3, ct, pt, &ents[0])
			copy(run, ct)
			sess.Seal(4, ct, pt, &ents[1])
			copy(run[4096:], ct)
			_ = c.OpenSectors(3, run, ents)
		}); n != 0 && !raceEnabled {
			t.Errorf("%s: OpenSectors allocates %v", s, n)
		}
		rec, r := make([]byte, JournalRecordSize), JournalRecord{Kind: RecordWrite, Epoch: 1, LBA: 3, New: e}
		if n := testing.AllocsPerRun(100, func() { c.MarshalJournalRecord(&r, rec) }); n != 0 {
			t.Errorf("%s: MarshalJournalRecord allocates %v", s, n)
		}
		if n := testing.AllocsPerRun(100, func() { _, _ = c.ParseJournalRecord(rec) }); n != 0 {
			t.Errorf("%s: ParseJournalRecord allocates %v", s, n)
		}
	}
}

// nonZero counts the non-zero integer bytes reachable from x, as wipeIntegers sees them.
func nonZero(x any) (n int) {
	walkIntegers(x, func(b []byte) {
		for _, v := range b {
			if v != 0 {
				n++
			}
		}
	})
	return n
}

// minKeyBytes is a floor on the non-zero bytes of each suite's key state: AES-256 round
// keys (2 × 240 bytes), SM4 round keys (2 × 128), the ChaCha20 key (32, a few may be zero).
var minKeyBytes = map[format.Suite]int{format.SuiteAES256GCM: 400, format.SuiteChaCha20Poly1305: 24, format.SuiteSM4GCM: 200}

func TestDestroy(t *testing.T) {
	for _, s := range suites {
		t.Run(s.String(), func(t *testing.T) {
			c := newCipher(t, s, 4096)
			past := newSession(t, c)
			ct, e := sealed(t, past, 1)
			past.Close()
			sess := newSession(t, c)
			var keys []*sessionKey
			for _, k := range c.keys.bySalt {
				// The walker must reach the expanded key schedule: far more than a few
				// non-zero bytes (sizes, counters) before the wipe.
				if n := nonZero(k.aead) + nonZero(k.block); n < minKeyBytes[s] {
					t.Fatalf("only %d non-zero key bytes reachable before Destroy", n)
				}
				keys = append(keys, k)
			}
			if len(keys) != 2 {
				t.Fatalf("%d cached keys, want 2", len(keys))
			}
			key, inner, outer := c.key, c.jinner, c.jouter
			c.Destroy()
			c.Destroy()
			for _, k := range keys {
				if n := nonZero(k.aead) + nonZero(k.block); n != 0 {
					t.Fatalf("%d key bytes survive Destroy", n)
				}
			}
			if !zeros.All(key) || !zeros.All(inner) || !zeros.All(outer) || len(c.keys.bySalt) != 0 {
				t.Fatal("image or journal key not zeroised")
			}
			if err := c.Open(1, buf(4096), ct, &e); !errors.Is(err, ErrDestroyed) {
				t.Fatalf("Open after Destroy: %v", err)
			}
			if _, err := c.NewSession(); !errors.Is(err, ErrDestroyed) {
				t.Fatalf("NewSession after Destroy: %v", err)
			}
			mustPanic(t, "BUG: sector: use after Destroy", func() { sealed(t, sess, 2) })
			mustPanic(t, "BUG: sector: use after Destroy", func() { c.MarshalJournalHeader(1, make([]byte, JournalHeaderSize)) })
			mustPanic(t, "BUG: sector: use after Destroy", func() {
				c.MarshalJournalRecord(&JournalRecord{Kind: RecordZero}, make([]byte, JournalRecordSize))
			})
			h := make([]byte, JournalHeaderSize)
			copy(h, journalMagic)
			if _, err := c.ParseJournalHeader(h); !errors.Is(err, ErrDestroyed) {
				t.Fatalf("ParseJournalHeader after Destroy: %v", err)
			}
			r := make([]byte, JournalRecordSize)
			copy(r, recordMagic)
			if _, err := c.ParseJournalRecord(r); !errors.Is(err, ErrDestroyed) {
				t.Fatalf("ParseJournalRecord after Destroy: %v", err)
			}
			sess.Close() // harmless after Destroy
		})
	}
}

// TestDestroyLeavesOtherCiphersIntact guards wipeIntegers: if a dependency ever shared a
// table between keys, wiping one cipher would corrupt every other one, and the vectors
// would change.
func TestDestroyLeavesOtherCiphersIntact(t *testing.T) {
	for _, s := range suites {
		c := newCipher(t, s, 4096)
		sealed(t, newSession(t, c), 1)
		c.Destroy()
	}
	checkVectors(t)
}

func TestConcurrentDestroy(t *testing.T) {
	c := newCipher(t, format.SuiteAES256GCM, 512)
	s := newSession(t, c)
	ct, e := sealed(t, s, 1)
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			out := buf(512)
			for {
				err := c.Open(1, out, ct, &e)
				if errors.Is(err, ErrDestroyed) {
					return
				}
				if err != nil || !bytes.Equal(out, vecPlain(512)) {
					t.Errorf("Open racing Destroy saw a wiped key: %v", err)
					return
				}
			}
		})
	}
	c.Destroy()
	wg.Wait()
}

// TestFormatVectors checks FORMAT.md §10.2 (cross-checked against an independent
// implementation: Python cryptography/OpenSSL).
func TestFormatVectors(t *testing.T) { checkVectors(t) }

func checkVectors(t *testing.T) {
	t.Helper()
	got := ""
	var aesEntry Entry
	for _, s := range suites {
		c := newCipher(t, s, 4096)
		ks, err := hkdf.Key(sha256.New, vecKey, vecSalt[:], c.info, keySize(s))
		if err != nil {
			t.Fatal(err)
		}
		sess, err := c.newSession(&vecSalt)
		if err != nil {
			t.Fatal(err)
		}
		ct, e := sealed(t, sess, 7)
		if s == format.SuiteAES256GCM {
			aesEntry = e
		}
		sum := sha256.Sum256(ct)
		v := [4]string{hex.EncodeToString(ks), hex.EncodeToString(sum[:]), hex.EncodeToString(e[24:40]), hex.EncodeToString(e[:])}
		got += fmt.Sprintf("%s: %q\n", s, v)
		if v != vectors[s] {
			t.Errorf("%s vector changed", s)
		}
		if err := c.Open(7, ct, ct, &e); err != nil || !bytes.Equal(ct, vecPlain(4096)) {
			t.Errorf("%s vector does not open: %v", s, err)
		}
	}
	kj, err := hkdf.Key(sha256.New, vecKey, nil, journalLabel+string(vecUUID[:]), 32)
	if err != nil {
		t.Fatal(err)
	}
	c := newCipher(t, format.SuiteAES256GCM, 4096)
	rec := make([]byte, JournalRecordSize)
	c.MarshalJournalRecord(&JournalRecord{Kind: RecordWrite, Epoch: 1, Seq: 0, LBA: 7, New: aesEntry}, rec)
	jk, jr := hex.EncodeToString(kj), hex.EncodeToString(rec)
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
			sess := newSession(b, newCipher(b, s, 4096))
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
			ct, e := sealed(b, newSession(b, c), 1)
			out := buf(4096)
			b.SetBytes(4096)
			for b.Loop() {
				if err := c.Open(1, out, ct, &e); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkSealParallel4096 shows what the shared lock and counter cost across cores.
func BenchmarkSealParallel4096(b *testing.B) {
	sess := newSession(b, newCipher(b, format.SuiteAES256GCM, 4096))
	b.SetBytes(4096)
	b.RunParallel(func(pb *testing.PB) {
		ct, pt := buf(4096), vecPlain(4096)
		var e Entry
		for pb.Next() {
			sess.Seal(1, ct, pt, &e)
		}
	})
}

// BenchmarkOpenMiss4096 is a read whose session key is not cached: HKDF, key expansion
// and an eviction on every sector — what the cache saves.
func BenchmarkOpenMiss4096(b *testing.B) {
	c := newCipher(b, format.SuiteAES256GCM, 4096)
	var secs [2 * sessionCacheSize]struct {
		ct []byte
		e  Entry
	}
	for i := range secs {
		s := newSession(b, c)
		secs[i].ct, secs[i].e = sealed(b, s, 1)
		s.Close()
	}
	out := buf(4096)
	b.SetBytes(4096)
	i := 0
	for b.Loop() {
		if err := c.Open(1, out, secs[i].ct, &secs[i].e); err != nil {
			b.Fatal(err)
		}
		i = (i + 1) % len(secs)
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

func BenchmarkMarshalJournalRecord(b *testing.B) {
	c := newCipher(b, format.SuiteAES256GCM, 4096)
	r, dst := JournalRecord{Kind: RecordWrite, Epoch: 1, LBA: 7, New: Entry{1}}, make([]byte, JournalRecordSize)
	for b.Loop() {
		c.MarshalJournalRecord(&r, dst)
	}
}

// TestOpenSectors: a run opened in place equals sector-by-sector Open, across zero entries,
// two salts (one not yet cached) and both sector sizes; a tampered sector in the middle fails
// naming its LBA; sizes are checked.
func TestOpenSectors(t *testing.T) {
	for _, s := range suites {
		for _, ss := range []int{512, 4096} {
			t.Run(fmt.Sprintf("%s/%d", s, ss), func(t *testing.T) {
				c := newCipher(t, s, ss)
				s1, s2 := newSession(t, c), newSession(t, c)
				const n, lba = 7, 100
				want := make([]byte, n*ss)
				run := make([]byte, n*ss, n*ss+TagSize)
				ents := make([]Entry, n)
				for i := range n {
					pt := want[i*ss : (i+1)*ss]
					for j := range pt {
						pt[j] = byte(i*31 + j)
					}
					sess := s1
					switch i {
					case 2, 3:
						sess = s2
					case 5:
						clear(pt) // never written
						continue
					}
					ct := buf(ss)
					sess.Seal(lba+uint64(i), ct, pt, &ents[i])
					copy(run[i*ss:], ct)
				}
				for _, reader := range []*Cipher{c, newCipher(t, s, ss)} { // cached salts, then none
					got := bytes.Clone(run)
					if err := reader.OpenSectors(lba, got, ents); err != nil || !bytes.Equal(got, want) {
						t.Fatalf("OpenSectors: %v (equal %v)", err, bytes.Equal(got, want))
					}
				}
				one := bytes.Clone(run[:ss])
				if err := c.OpenSectors(lba, one, ents[:1]); err != nil || !bytes.Equal(one, want[:ss]) {
					t.Fatalf("one sector: %v", err)
				}
				bad := bytes.Clone(run)
				bad[3*ss+9] ^= 1
				var ae *AuthError
				if err := c.OpenSectors(lba, bad, ents); !errors.As(err, &ae) || ae.LBA != lba+3 || !zeros.All(bad[3*ss:4*ss]) {
					t.Fatalf("tampered sector 3: %v", err)
				}
				mustPanic(t, "BUG: sector: OpenSectors buffer", func() { _ = c.OpenSectors(lba, run[:ss], ents) })
				c.Destroy()
				if err := c.OpenSectors(lba, bytes.Clone(run), ents); !errors.Is(err, ErrDestroyed) {
					t.Fatalf("after Destroy: %v", err)
				}
			})
		}
	}
}
