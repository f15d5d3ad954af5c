package sector

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/internal/zeros"
)

func TestJournalHeader(t *testing.T) {
	c := newCipher(t, format.SuiteAES256GCM, 4096)
	h := make([]byte, JournalHeaderSize)
	if ep, err := c.ParseJournalHeader(h); err != nil || ep != 0 {
		t.Fatalf("empty journal: %d, %v", ep, err)
	}
	for _, epoch := range []uint64{1, 2, 1 << 40, ^uint64(0)} {
		c.MarshalJournalHeader(epoch, h)
		if string(h[:8]) != "SDJOURN1" || !zeros.All(h[32:]) {
			t.Fatalf("epoch %d: layout %x", epoch, h[:40])
		}
		if ep, err := c.ParseJournalHeader(h); err != nil || ep != epoch {
			t.Fatalf("epoch %d: got %d, %v", epoch, ep, err)
		}
	}
	c.MarshalJournalHeader(0, h)
	if !zeros.All(h) {
		t.Fatal("epoch 0 is not the all-zero empty journal")
	}
	c.MarshalJournalHeader(9, h)
	for _, i := range []int{0, 7, 8, 15, 16, 31, 32, 4095} {
		bad := bytes.Clone(h)
		bad[i] ^= 1
		if _, err := c.ParseJournalHeader(bad); !errors.Is(err, ErrJournal) {
			t.Fatalf("header byte %d flipped: %v", i, err)
		}
	}
	for _, other := range []*Cipher{
		newCipherT(t, format.SuiteAES256GCM, seq(1, 32), vecUUID),
		newCipherT(t, format.SuiteAES256GCM, vecKey, [16]byte{2}),
	} {
		if _, err := other.ParseJournalHeader(h); !errors.Is(err, ErrJournal) {
			t.Fatal("journal header accepted under another key or image")
		}
	}
}

func newCipherT(t *testing.T, s format.Suite, key []byte, uuid [16]byte) *Cipher {
	t.Helper()
	c, err := NewCipher(s, key, uuid, 4096)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestJournalRecord(t *testing.T) {
	c := newCipher(t, format.SuiteAES256GCM, 4096)
	_, e := sealed(t, newSession(t, c), 77)
	b := make([]byte, JournalRecordSize)
	for _, r := range []JournalRecord{
		{Kind: RecordWrite, Epoch: 5, Seq: 3, LBA: 77, New: e, Old: Entry{3}},
		{Kind: RecordWrite, Epoch: 1, Seq: 0, LBA: 0, New: e},
		{Kind: RecordZero, Epoch: ^uint64(0), Seq: 16367, LBA: ^uint64(0), Old: e},
	} {
		c.MarshalJournalRecord(&r, b)
		if string(b[:4]) != "SDJR" || b[4] != r.Kind || !zeros.All(b[5:8]) || !zeros.All(b[160:240]) {
			t.Fatalf("layout %x", b)
		}
		got, err := c.ParseJournalRecord(b)
		if err != nil || got != r {
			t.Fatalf("round trip: %+v, %v", got, err)
		}
	}
	c.MarshalJournalRecord(&JournalRecord{Kind: RecordWrite, Epoch: 5, Seq: 3, LBA: 77, New: e, Old: Entry{3}}, b)
	for i := range JournalRecordSize {
		bad := bytes.Clone(b)
		bad[i] ^= 0x04
		if _, err := c.ParseJournalRecord(bad); !errors.Is(err, ErrJournal) {
			t.Fatalf("record byte %d flipped: %v", i, err)
		}
	}
	for _, other := range []*Cipher{
		newCipherT(t, format.SuiteAES256GCM, seq(1, 32), vecUUID),
		newCipherT(t, format.SuiteAES256GCM, vecKey, [16]byte{2}),
	} {
		if _, err := other.ParseJournalRecord(b); !errors.Is(err, ErrJournal) {
			t.Fatal("record accepted under another key or image")
		}
	}

	// Records that carry a valid MAC but break a field rule (only a bug could write them).
	remac := func(f func([]byte)) []byte {
		bad := bytes.Clone(b)
		f(bad)
		c.mu.RLock()
		c.mac(bad[240:], bad[:240])
		c.mu.RUnlock()
		return bad
	}
	for name, bad := range map[string][]byte{
		"kind 0":             remac(func(b []byte) { b[4] = 0 }),
		"kind 3":             remac(func(b []byte) { b[4] = 3 }),
		"byte 5":             remac(func(b []byte) { b[5] = 1 }),
		"padding":            remac(func(b []byte) { b[200] = 1 }),
		"zero with an entry": remac(func(b []byte) { b[4] = RecordZero }),
	} {
		if _, err := c.ParseJournalRecord(bad); !errors.Is(err, ErrJournal) {
			t.Errorf("%s: %v", name, err)
		}
	}
	mustPanic(t, "BUG: sector: journal record of kind 3", func() { c.MarshalJournalRecord(&JournalRecord{Kind: 3}, b) })
	mustPanic(t, "BUG: sector: journal record of kind 2", func() {
		c.MarshalJournalRecord(&JournalRecord{Kind: RecordZero, New: e}, b)
	})
}

// TestJournalMACIsHMAC checks the precomputed-state MAC against crypto/hmac.
func TestJournalMACIsHMAC(t *testing.T) {
	key := seq(0x40, 32)
	inner, outer := hmacStates(key)
	c := &Cipher{jinner: inner, jouter: outer}
	rng := rand.New(rand.NewPCG(1, 2))
	for n := range 300 {
		msg := make([]byte, n)
		for i := range msg {
			msg[i] = byte(rng.Uint32())
		}
		var got [sha256.Size]byte
		c.mac(got[:], msg)
		m := hmac.New(sha256.New, key)
		m.Write(msg)
		if !bytes.Equal(got[:], m.Sum(nil)) {
			t.Fatalf("length %d: MAC differs from HMAC-SHA256", n)
		}
	}
}
