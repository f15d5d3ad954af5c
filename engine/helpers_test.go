package engine

import (
	"crypto/rand"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/provider"
	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/store"
)

var (
	chipOnce sync.Once
	chip     *psp.ChipCert
	keysDir  string // this test process's vendor/chip/provider keys, removed by TestMain
)

func TestMain(m *testing.M) {
	code := m.Run()
	if keysDir != "" {
		os.RemoveAll(keysDir)
	}
	os.Exit(code)
}

// testChip makes one vendor/chip/provider for the package's tests, in a directory of this
// process's own: a fixed path was removed and rewritten by every test process, so two at once
// (a race run beside a plain one) failed each other's tests.
func testChip(t testing.TB) (*psp.ChipCert, string) {
	chipOnce.Do(func() {
		dir, err := os.MkdirTemp("", "sealdisk-engine-test-keys-")
		if err != nil {
			panic(err)
		}
		keysDir = dir
		if err := psp.InitVendor(filepath.Join(dir, "v"), ""); err != nil {
			panic(err)
		}
		if err := psp.InitChip(filepath.Join(dir, "p"), filepath.Join(dir, "v"), format.KEMDHKEMP384); err != nil {
			panic(err)
		}
		k, _ := provider.GenerateKey(format.SigECDSAP384)
		if err := provider.SaveKeyPair(filepath.Join(dir, "k"), "provider", k); err != nil {
			panic(err)
		}
		b, _ := os.ReadFile(filepath.Join(dir, "p", psp.ChipCrtFile))
		chip, _ = psp.ParseChipCert(b)
	})
	return chip, filepath.Join(keysDir, "k", "provider.key")
}

// image is a fresh sealed image: its header, key and binding.
type testImage struct {
	h   *format.Header
	key []byte
	b   psp.Binding
}

func newTestImage(t testing.TB, size uint64, ss uint32, journal uint64) *testImage {
	c, keyPath := testChip(t)
	s, err := provider.LoadSigner(keyPath)
	if err != nil {
		t.Fatal(err)
	}
	key := make([]byte, 32)
	rand.Read(key)
	id := uuid.New()
	cert, err := provider.Issue(s, provider.IssueRequest{
		Chip: c, UUID: id, VirtualSize: size, SectorSize: ss, Suite: format.SuiteAES256GCM,
		MeasureAlg: format.MeasureSHA384, Measurements: [][]byte{make([]byte, 48)},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), ImageKey: key,
	})
	if err != nil {
		t.Fatal(err)
	}
	h, err := format.NewHeader(id, size, ss, format.SuiteAES256GCM, false, format.Layout{JournalSize: journal}, cert.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	return &testImage{h: h, key: key, b: psp.Binding{Suite: format.SuiteAES256GCM, Key: key, UUID: id, SectorSize: int(ss)}}
}

// create writes the image's headers into st and sizes it.
func (im *testImage) create(t testing.TB, st store.Store) {
	if err := st.Truncate(int64(im.h.FileSize())); err != nil {
		t.Fatal(err)
	}
	if err := format.WriteHeaders(st, im.h); err != nil {
		t.Fatal(err)
	}
}

// attach loads the key into e at asid and attaches st.
func (im *testImage) attach(t testing.TB, e *Engine, asid psp.ASID, st store.Store) *Disk {
	b := im.b
	b.Key = append([]byte(nil), im.key...)
	if err := e.LoadKey(asid, b); err != nil {
		t.Fatal(err)
	}
	d, err := e.Attach(asid, st, false)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func fileStore(t testing.TB, im *testImage) (*store.File, string) {
	p := filepath.Join(t.TempDir(), "vm.img")
	f, err := store.CreateFile(p)
	if err != nil {
		t.Fatal(err)
	}
	im.create(t, f)
	return f, p
}

func reopen(t testing.TB, p string) *store.File {
	f, err := store.OpenFile(p, false)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// abandon stops e's shard workers without writing anything back, as a crash would: the
// engine is marked closed (Close becomes a no-op) and its submission rings are closed, so
// the workers, their idle timers and the disks and caches they reference go away instead
// of piling up across a test's iterations.
func abandon(e *Engine) {
	e.closed.Store(true)
	for _, s := range e.shards {
		s.sq.Close()
	}
}
