package image

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/internal/zeros"
	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/sector"
	"github.com/sealdisk/sealdisk/store"
)

func TestSealUnsealRoundTrip(t *testing.T) {
	w := newWorld(t)
	cases := []struct {
		n     int
		ss    uint32
		suite format.Suite
	}{
		{1, 4096, format.SuiteAES256GCM},
		{4095, 4096, format.SuiteAES256GCM},
		{4096, 4096, format.SuiteAES256GCM},
		{4097, 4096, format.SuiteAES256GCM},
		{chunkBytes, 4096, format.SuiteAES256GCM},
		{chunkBytes + 3*4096 + 17, 4096, format.SuiteAES256GCM}, // crosses a chunk boundary
		{5*chunkBytes/2 + 1, 4096, format.SuiteChaCha20Poly1305},
		{1, 512, format.SuiteAES256GCM},
		{511, 512, format.SuiteAES256GCM},
		{513, 512, format.SuiteAES256GCM},
		{1000, 512, format.SuiteChaCha20Poly1305},
		{chunkBytes + 7, 512, format.SuiteAES256GCM},
		{70001, 512, format.SuiteSM4GCM},
		{70001, 4096, format.SuiteSM4GCM},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("%d-%d-%s", tc.n, tc.ss, tc.suite), func(t *testing.T) {
			data := randomSectors(tc.n, int(tc.ss))
			img, c, _ := w.sealBytes(t, data, tc.ss, tc.suite)
			if want := format.RoundUpVirtualSize(uint64(tc.n), tc.ss); img.Header.VirtualSize != want {
				t.Fatalf("virtual size %d, want %d", img.Header.VirtualSize, want)
			}
			out, err := unsealBytes(t, img, c)
			must(t, err)
			if !bytes.Equal(out, padded(data, int(tc.ss))) {
				t.Fatal("unsealed bytes differ from the input padded to the sector size")
			}
		})
	}
}

func TestSealRefusesLargerInputAndStopsOnCancel(t *testing.T) {
	w := newWorld(t)
	img, c, _ := w.create(t, 8192, 4096, format.SuiteAES256GCM)
	sess, err := c.NewSession()
	must(t, err)
	if err := Seal(context.Background(), writeFile(t, w.Dir, make([]byte, 8193)), img, sess, nil); err == nil {
		t.Fatal("an input larger than the image was accepted")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := Seal(ctx, writeFile(t, w.Dir, bytes.Repeat([]byte{1}, 8192)), img, sess, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled seal: %v", err)
	}
}

// allocated returns the bytes allocated in [from, to) of path.
func allocated(t *testing.T, path string, from, to int64) int64 {
	t.Helper()
	f, err := os.Open(path)
	must(t, err)
	defer f.Close()
	ext, err := store.Extents(int(f.Fd()), from, to)
	must(t, err)
	var n int64
	for _, e := range ext {
		n += e[1] - e[0]
	}
	return n
}

func TestSparseStaysSparse(t *testing.T) {
	w := newWorld(t)
	const size = 1 << 30
	src, err := os.Create(filepath.Join(w.Dir, "sparse.raw"))
	must(t, err)
	defer src.Close()
	must(t, src.Truncate(size))
	pieces := map[int64][]byte{
		0:                   randomSectors(chunkBytes, 4096),
		300<<20 + 5*4096:    randomSectors(3*4096, 1<<20), // 3 sectors, all data
		size - 1:            {0x42},                       // the last byte
		700<<20 + 4096*1000: make([]byte, 8<<20),          // zeros written as data: must become holes
	}
	written := 0
	for off, b := range pieces {
		_, err := src.WriteAt(b, off)
		must(t, err)
		if !zeros.All(b) {
			written += len(b)
		}
	}
	img, c, path := w.create(t, size, 4096, format.SuiteAES256GCM)
	sess, err := c.NewSession()
	must(t, err)
	var mu sync.Mutex // progress is called from the workers
	var last, total int64
	must(t, Seal(context.Background(), src, img, sess, func(d, tot int64) {
		mu.Lock()
		last, total = max(last, d), tot
		mu.Unlock()
	}))
	if last != total || total == 0 || total > 16<<20 {
		t.Fatalf("progress ended at %d of %d: only the input's data extents should be walked", last, total)
	}
	h := img.Header
	// Data: the written sectors only (2/3 of the first chunk, 3 sectors, 1 sector), plus
	// filesystem slack.
	wantData := int64(chunkBytes/3*2 + 4*4096)
	if got := allocated(t, path, int64(h.DataOffset), int64(h.FileSize())); got > wantData+(64<<10) {
		t.Fatalf("data region allocates %d bytes, want about %d", got, wantData)
	}
	if got, _ := img.AllocatedData(); got > wantData+(64<<10) {
		t.Fatalf("AllocatedData %d, want about %d", got, wantData)
	}
	// Metadata: one page per 64 written sectors, nothing for untouched ranges.
	if got := allocated(t, path, int64(h.MetaOffset), int64(h.DataOffset)); got > 8*4096 {
		t.Fatalf("metadata region allocates %d bytes", got)
	}
	must(t, img.Close())
	ro, err := Open(path, true)
	must(t, err)
	defer ro.Close()
	dst, err := os.Create(filepath.Join(w.Dir, "sparse.out"))
	must(t, err)
	defer dst.Close()
	must(t, Unseal(context.Background(), ro, c, nil, dst, nil))
	fi, err := dst.Stat()
	must(t, err)
	if fi.Size() != size {
		t.Fatalf("unsealed size %d", fi.Size())
	}
	if got := allocated(t, dst.Name(), 0, size); got > int64(written)+(64<<10) {
		t.Fatalf("unsealed output allocates %d bytes; %d were written", got, written)
	}
	for off, b := range pieces {
		got := make([]byte, len(b))
		_, err := dst.ReadAt(got, off)
		must(t, err)
		if !bytes.Equal(got, b) {
			t.Fatalf("unsealed bytes at %d differ", off)
		}
	}
}

func TestTamperNamesTheSector(t *testing.T) {
	w := newWorld(t)
	data := randomSectors(64<<10, 4096)
	clear(data[8*4096 : 9*4096]) // sector 8: never written
	_, _, path := w.sealBytes(t, data, 4096, format.SuiteAES256GCM)
	h := func() *format.Header {
		img, err := Open(path, true)
		must(t, err)
		defer img.Close()
		return img.Header
	}()
	cases := map[string]func(cp string){
		"data byte":     func(cp string) { flipByte(t, cp, h.DataPos(5)+100) },
		"salt":          func(cp string) { flipByte(t, cp, h.EntryPos(5)+1) },
		"counter":       func(cp string) { flipByte(t, cp, h.EntryPos(5)+20) },
		"tag":           func(cp string) { flipByte(t, cp, h.EntryPos(5)+30) },
		"reserved byte": func(cp string) { flipByte(t, cp, h.EntryPos(5)+50) },
		"moved sector": func(cp string) { // sector 4's data and entry copied onto sector 5
			f, err := os.OpenFile(cp, os.O_RDWR, 0)
			must(t, err)
			defer f.Close()
			d, e := make([]byte, 4096), make([]byte, sector.EntrySize)
			f.ReadAt(d, h.DataPos(4))
			f.ReadAt(e, h.EntryPos(4))
			f.WriteAt(d, h.DataPos(5))
			f.WriteAt(e, h.EntryPos(5))
		},
		"data in a never-written sector": func(cp string) { // unreferenced: must stay zero, not fail
			flipByte(t, cp, h.DataPos(8))
		},
	}
	for name, tamper := range cases {
		t.Run(name, func(t *testing.T) {
			cp := filepath.Join(t.TempDir(), "cp.img")
			b, err := os.ReadFile(path)
			must(t, err)
			must(t, os.WriteFile(cp, b, 0o600))
			tamper(cp)
			img, err := Open(cp, true)
			must(t, err)
			defer img.Close()
			out, err := unsealBytes(t, img, w.cipher(t, img, w.ChipDir))
			if name == "data in a never-written sector" {
				must(t, err)
				if !bytes.Equal(out, data) {
					t.Fatal("a never-written sector did not read as zeros")
				}
				return
			}
			var ae *sector.AuthError
			if !errors.As(err, &ae) || ae.LBA != 5 || !errors.Is(err, sector.ErrAuth) {
				t.Fatalf("want an authentication error naming sector 5, got %v", err)
			}
		})
	}
}

func TestPrimaryHeaderDamageFallsBackToBackup(t *testing.T) {
	w := newWorld(t)
	data := randomSectors(40000, 4096)
	_, _, path := w.sealBytes(t, data, 4096, format.SuiteAES256GCM)
	flipByte(t, path, 20) // generation field of the primary copy
	img, err := Open(path, true)
	must(t, err)
	defer img.Close()
	if !img.FellBack() || img.Status.Copy != 1 || img.Status.PrimaryErr == nil || img.Status.BackupErr != nil {
		t.Fatalf("status %+v: want the backup used and the primary's error reported", img.Status)
	}
	out, err := unsealBytes(t, img, w.cipher(t, img, w.ChipDir))
	must(t, err)
	if !bytes.Equal(out, padded(data, 4096)) {
		t.Fatal("unseal through the backup header differs")
	}
	flipByte(t, path, format.HeaderSlotSize+9) // and now the backup too
	if _, err := Open(path, true); err == nil {
		t.Fatal("an image with both header copies damaged opened")
	}
}

func TestOpenRefusesTruncatedImage(t *testing.T) {
	w := newWorld(t)
	_, _, path := w.sealBytes(t, randomSectors(3*4096, 4096), 4096, format.SuiteAES256GCM)
	fi, err := os.Stat(path)
	must(t, err)
	must(t, os.Truncate(path, fi.Size()-1))
	if _, err := Open(path, true); err == nil {
		t.Fatal("a truncated image opened")
	}
}

func TestResealRewritesOnlyHeaders(t *testing.T) {
	w := newWorld(t)
	data := randomSectors(300<<10, 4096)
	img, c, path := w.sealBytes(t, data, 4096, format.SuiteAES256GCM)
	// A journal with a record must survive the reseal too.
	writeJournal(t, img, c, path, 1, []sector.JournalRecord{{Kind: sector.RecordZero, Epoch: 1, Seq: 0, LBA: 1}})
	end := int64(img.Header.FileSize())
	before := fileHash(t, path, format.JournalOffset, end)

	// The new certificate seals the same key to the second chip.
	p, err := psp.Open(w.ChipDir, psp.Options{})
	must(t, err)
	key, err := p.UnsealImageKey(img.Cert, img.Header)
	must(t, err)
	nc := w.issue(t, w.Chip2Dir, img.Cert.UUID, img.Cert.VirtualSize, img.Cert.SectorSize, img.Cert.Suite, key)
	must(t, Reseal(path, nc.Bytes()))
	if after := fileHash(t, path, format.JournalOffset, end); after != before {
		t.Fatal("reseal changed bytes outside the two header slots")
	}
	re, err := Open(path, true)
	must(t, err)
	defer re.Close()
	if re.Header.Generation != 2 || re.Cert.ChipID != w.Chip2.ID || re.FellBack() {
		t.Fatalf("after reseal: generation %d, chip %x, status %+v", re.Header.Generation, re.Cert.ChipID, re.Status)
	}
	for copy := range 2 {
		slot := make([]byte, format.HeaderSlotSize)
		_, err := re.Store.ReadAt(slot, int64(copy)*format.HeaderSlotSize)
		must(t, err)
		if h, err := format.ParseHeader(slot, copy); err != nil || h.Generation != 2 {
			t.Fatalf("header copy %d after reseal: %v", copy, err)
		}
	}
	c2 := w.cipher(t, re, w.Chip2Dir)
	out, err := unsealBytes(t, re, c2)
	must(t, err)
	want := padded(data, 4096)
	clear(want[4096:8192]) // the journaled trim
	if !bytes.Equal(out, want) {
		t.Fatal("unseal with the new chip differs")
	}
	if _, err := p.UnsealImageKey(re.Cert, re.Header); err == nil {
		t.Fatal("the old chip still unseals the resealed image")
	}

	// A certificate for another image is refused and nothing changes.
	whole := fileHash(t, path, 0, end)
	other := w.issue(t, w.Chip2Dir, [16]byte{1, 2, 3, 4, 5, 6, 0x40, 8, 0x80}, img.Cert.VirtualSize, 4096, img.Cert.Suite, key)
	if err := Reseal(path, other.Bytes()); err == nil {
		t.Fatal("a certificate for another image was accepted")
	}
	if fileHash(t, path, 0, end) != whole {
		t.Fatal("a refused reseal changed the file")
	}
}

func TestResealRepairsDamagedPrimary(t *testing.T) {
	w := newWorld(t)
	img, _, path := w.sealBytes(t, randomSectors(8192, 4096), 4096, format.SuiteAES256GCM)
	cert := img.Cert.Bytes()
	flipByte(t, path, 0)
	must(t, Reseal(path, cert))
	re, err := Open(path, true)
	must(t, err)
	defer re.Close()
	if re.FellBack() || re.Header.Generation != 2 {
		t.Fatalf("status %+v generation %d", re.Status, re.Header.Generation)
	}
}
