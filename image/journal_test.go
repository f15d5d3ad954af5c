package image

import (
	"bytes"
	"crypto/rand"
	"errors"
	"os"
	"slices"
	"testing"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/sector"
)

// writeJournal writes a journal header for epoch and the records at their seq positions,
// by hand, through the file at path.
func writeJournal(t *testing.T, img *Image, c *sector.Cipher, path string, epoch uint64, recs []sector.JournalRecord) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	must(t, err)
	defer f.Close()
	hdr := make([]byte, sector.JournalHeaderSize)
	c.MarshalJournalHeader(epoch, hdr)
	_, err = f.WriteAt(hdr, int64(img.Header.JournalOffset))
	must(t, err)
	buf := make([]byte, sector.JournalRecordSize)
	for _, r := range recs {
		c.MarshalJournalRecord(&r, buf)
		_, err = f.WriteAt(buf, int64(img.Header.JournalOffset)+sector.JournalHeaderSize+int64(r.Seq)*sector.JournalRecordSize)
		must(t, err)
	}
}

// rawSector is one sector as it would be written: plaintext, ciphertext and entry.
type rawSector struct {
	pt, ct []byte
	e      sector.Entry
}

func sealSector(t *testing.T, s *sector.Session, lba uint64) rawSector {
	t.Helper()
	pt := make([]byte, 4096)
	rand.Read(pt)
	ct := make([]byte, 4096, 4096+sector.TagSize)
	var e sector.Entry
	s.Seal(lba, ct, pt, &e)
	return rawSector{pt: pt, ct: ct}.with(e)
}

func (r rawSector) with(e sector.Entry) rawSector { r.e = e; return r }

// put writes the data and/or the entry of a sector in place, as a crash might leave them.
func put(t *testing.T, path string, h *format.Header, lba uint64, ct []byte, e *sector.Entry) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	must(t, err)
	defer f.Close()
	if ct != nil {
		_, err = f.WriteAt(ct, h.DataPos(lba))
		must(t, err)
	}
	if e != nil {
		_, err = f.WriteAt(e[:], h.EntryPos(lba))
		must(t, err)
	}
}

func getEntry(t *testing.T, img *Image, lba uint64) sector.Entry {
	t.Helper()
	var e sector.Entry
	_, err := img.Store.ReadAt(e[:], img.Header.EntryPos(lba))
	must(t, err)
	return e
}

// TestRecover builds the crash states of FORMAT.md §6 by hand and checks that the in-memory
// replay picks, per sector, the entry that authenticates the data on disk.
func TestRecover(t *testing.T) {
	w := newWorld(t)
	const sectors = 200
	orig := make([]byte, sectors*4096)
	rand.Read(orig[:8*4096]) // sectors 0..7 written; the rest never written
	img, c, path := w.sealBytes(t, orig, 4096, format.SuiteAES256GCM)
	h := img.Header
	s, err := c.NewSession()
	must(t, err)
	want := bytes.Clone(orig)
	set := func(lba uint64, pt []byte) {
		if pt == nil {
			pt = make([]byte, 4096)
		}
		copy(want[lba*4096:], pt)
	}
	old := func(lba uint64) sector.Entry { return getEntry(t, img, lba) }
	var recs []sector.JournalRecord
	rec := func(kind uint8, lba uint64, n, o sector.Entry) {
		recs = append(recs, sector.JournalRecord{Kind: kind, Epoch: 3, Seq: uint64(len(recs)), LBA: lba, New: n, Old: o})
	}

	// LBA 1: the data landed, the entry did not → new.
	n1 := sealSector(t, s, 1)
	rec(sector.RecordWrite, 1, n1.e, old(1))
	put(t, path, h, 1, n1.ct, nil)
	set(1, n1.pt)
	// LBA 2: the entry landed, the data did not → old.
	n2, old2 := sealSector(t, s, 2), old(2)
	rec(sector.RecordWrite, 2, n2.e, old2)
	put(t, path, h, 2, nil, &n2.e)
	// LBA 3: a journaled trim → zeros, whatever is on disk.
	rec(sector.RecordZero, 3, sector.Entry{}, old(3))
	set(3, nil)
	// LBA 9, never written: the entry landed, the data did not → the zero old entry matches
	// the zero data.
	n9 := sealSector(t, s, 9)
	rec(sector.RecordWrite, 9, n9.e, sector.Entry{})
	put(t, path, h, 9, nil, &n9.e)
	// LBA 150, never written, its metadata page a hole: the data landed → new.
	n150 := sealSector(t, s, 150)
	rec(sector.RecordWrite, 150, n150.e, sector.Entry{})
	put(t, path, h, 150, n150.ct, nil)
	set(150, n150.pt)
	// LBA 4, two updates A then B: B's data landed, A's entry is on disk. A's record matches
	// nothing (the data is B), B's matches new: the last match wins.
	a4, b4 := sealSector(t, s, 4), sealSector(t, s, 4)
	rec(sector.RecordWrite, 4, a4.e, old(4))
	rec(sector.RecordWrite, 4, b4.e, a4.e)
	put(t, path, h, 4, b4.ct, &a4.e)
	set(4, b4.pt)
	// LBA 5: the data landed but was then damaged: neither entry matches.
	n5 := sealSector(t, s, 5)
	rec(sector.RecordWrite, 5, n5.e, old(5))
	orig5 := make([]byte, 4096)
	_, err = img.Store.ReadAt(orig5, h.DataPos(5))
	must(t, err)
	bad := bytes.Clone(n5.ct)
	bad[7] ^= 1
	put(t, path, h, 5, bad, nil)
	valid := len(recs)
	// A record of an older epoch ends the scan: the valid-looking record after it (a trim of
	// LBA 0) must not be applied.
	recs = append(recs, sector.JournalRecord{Kind: sector.RecordZero, Epoch: 2, Seq: uint64(valid), LBA: 6})
	rec(sector.RecordZero, 0, sector.Entry{}, old(0))
	writeJournal(t, img, c, path, 3, recs)

	peek, err := PeekJournal(img)
	must(t, err)
	if peek.Epoch != 3 || peek.Records != valid {
		t.Fatalf("PeekJournal: %+v, want epoch 3 and %d records", peek, valid)
	}
	ov, st, err := Recover(img, c)
	must(t, err)
	if st.Epoch != 3 || st.Records != valid || st.UsedNew != 3 || st.UsedOld != 2 || st.Trimmed != 1 || !slices.Equal(st.Unresolved, []uint64{5}) {
		t.Fatalf("Recover: %+v", st)
	}
	if ov[2] != old2 || ov[1] != n1.e || ov[9] != (sector.Entry{}) || ov[4] != b4.e {
		t.Fatal("Recover chose the wrong entries")
	}
	// Sector 5 is damaged: unseal names it.
	_, err = unsealBytes(t, img, c)
	var ae *sector.AuthError
	if !errors.As(err, &ae) || ae.LBA != 5 {
		t.Fatalf("unseal with a damaged journaled sector: %v", err)
	}
	// Put the old data back (the new write never landed): the old entry matches again.
	put(t, path, h, 5, orig5, nil)
	_, st, err = Recover(img, c)
	must(t, err)
	if len(st.Unresolved) != 0 || st.UsedOld != 3 {
		t.Fatalf("Recover after repair: %+v", st)
	}
	out, err := unsealBytes(t, img, c)
	must(t, err)
	for lba := 0; lba < sectors; lba++ {
		if !bytes.Equal(out[lba*4096:(lba+1)*4096], want[lba*4096:(lba+1)*4096]) {
			t.Fatalf("sector %d differs after the in-memory replay", lba)
		}
	}
	// Recover wrote nothing: the on-disk entry of LBA 1 is still the old one.
	if getEntry(t, img, 1) == n1.e {
		t.Fatal("Recover wrote to the image")
	}
}

func TestRecoverIgnoresStaleAndForgedJournals(t *testing.T) {
	w := newWorld(t)
	data := make([]byte, 4*4096)
	rand.Read(data)
	img, c, path := w.sealBytes(t, data, 4096, format.SuiteAES256GCM)
	trim := []sector.JournalRecord{{Kind: sector.RecordZero, Epoch: 1, Seq: 0, LBA: 2}}

	// Epoch 0 (the state tools create) with records present: nothing to replay.
	writeJournal(t, img, c, path, 0, trim)
	if ov, st, err := Recover(img, c); err != nil || len(ov) != 0 || st.Records != 0 {
		t.Fatalf("epoch 0: %v %+v %v", ov, st, err)
	}
	// A record whose MAC fails ends the scan at once.
	writeJournal(t, img, c, path, 1, trim)
	flipByte(t, path, int64(img.Header.JournalOffset)+sector.JournalHeaderSize+30)
	if ov, st, err := Recover(img, c); err != nil || len(ov) != 0 || st.Epoch != 1 || st.Records != 0 {
		t.Fatalf("bad record MAC: %v %+v %v", ov, st, err)
	}
	// A header whose MAC fails: the journal is ignored and says why.
	writeJournal(t, img, c, path, 1, trim)
	flipByte(t, path, int64(img.Header.JournalOffset)+9)
	ov, st, err := Recover(img, c)
	if err != nil || len(ov) != 0 || !errors.Is(st.Ignored, sector.ErrJournal) {
		t.Fatalf("bad header MAC: %v %+v %v", ov, st, err)
	}
	if _, err := PeekJournal(img); err != nil { // the magic is intact: peek cannot tell
		t.Fatal(err)
	}
	flipByte(t, path, int64(img.Header.JournalOffset))
	if _, err := PeekJournal(img); !errors.Is(err, sector.ErrJournal) {
		t.Fatalf("PeekJournal with a bad magic: %v", err)
	}
	// A journal from another key (another image) does not verify either.
	_, oc, _ := w.sealBytes(t, data, 4096, format.SuiteAES256GCM)
	writeJournal(t, img, oc, path, 1, trim)
	if ov, st, err := Recover(img, c); err != nil || len(ov) != 0 || st.Ignored == nil {
		t.Fatalf("foreign journal: %v %+v %v", ov, st, err)
	}
	out, err := unsealBytes(t, img, c)
	must(t, err)
	if !bytes.Equal(out, data) {
		t.Fatal("an ignored journal changed the unsealed bytes")
	}
}
