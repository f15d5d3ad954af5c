// Package enginetest makes real sealed images and attached engine disks for tests outside
// package engine (conformance runs, frontends): real keys, a real certificate, a real header.
package enginetest

import (
	"crypto/rand"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/sealdisk/sealdisk/engine"
	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/provider"
	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/store"
	"github.com/sealdisk/sealdisk/store/storetest"
)

var (
	once    sync.Once
	chip    *psp.ChipCert
	keyPath string
	initErr error
)

func keys(t testing.TB) (*psp.ChipCert, string) {
	once.Do(func() {
		dir, err := os.MkdirTemp("", "sealdisk-enginetest-")
		if err != nil {
			initErr = err
			return
		}
		if initErr = psp.InitVendor(filepath.Join(dir, "v"), ""); initErr != nil {
			return
		}
		if initErr = psp.InitChip(filepath.Join(dir, "p"), filepath.Join(dir, "v"), format.KEMDHKEMP384); initErr != nil {
			return
		}
		k, _ := provider.GenerateKey(format.SigECDSAP384)
		if initErr = provider.SaveKeyPair(filepath.Join(dir, "k"), "provider", k); initErr != nil {
			return
		}
		b, _ := os.ReadFile(filepath.Join(dir, "p", psp.ChipCrtFile))
		chip, initErr = psp.ParseChipCert(b)
		keyPath = filepath.Join(dir, "k", "provider.key")
	})
	if initErr != nil {
		t.Fatal(initErr)
	}
	return chip, keyPath
}

// Image is a fresh sealed image's header and key.
type Image struct {
	Header  *format.Header
	Key     []byte
	Binding psp.Binding
}

// NewImage issues a certificate for a new image of size bytes and returns its header.
func NewImage(t testing.TB, size uint64, ss uint32) *Image {
	c, kp := keys(t)
	s, err := provider.LoadSigner(kp)
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
	h, err := format.NewHeader(id, size, ss, format.SuiteAES256GCM, false, format.Layout{}, cert.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	return &Image{Header: h, Key: key, Binding: psp.Binding{Suite: format.SuiteAES256GCM, UUID: id, SectorSize: int(ss)}}
}

// Create writes the image's headers into st and sizes it.
func (im *Image) Create(t testing.TB, st store.Store) {
	if err := st.Truncate(int64(im.Header.FileSize())); err != nil {
		t.Fatal(err)
	}
	if err := format.WriteHeaders(st, im.Header); err != nil {
		t.Fatal(err)
	}
}

// Attach loads the key at asid and attaches st.
func (im *Image) Attach(t testing.TB, e *engine.Engine, asid psp.ASID, st store.Store) *engine.Disk {
	b := im.Binding
	b.Key = append([]byte(nil), im.Key...)
	if err := e.LoadKey(asid, b); err != nil {
		t.Fatal(err)
	}
	d, err := e.Attach(asid, st, false)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// Disk returns a new attached disk of size bytes on a file in t.TempDir (or an in-memory
// store when mem is set), on its own engine closed at cleanup.
func Disk(t testing.TB, size uint64, ss uint32, mem bool, opts engine.Options) *engine.Disk {
	im := NewImage(t, size, ss)
	var st store.Store
	if mem {
		st = storetest.NewCrash()
	} else {
		f, err := store.CreateFile(filepath.Join(t.TempDir(), "vm.img"))
		if err != nil {
			t.Fatal(err)
		}
		st = f
	}
	im.Create(t, st)
	e := engine.New(opts)
	t.Cleanup(func() { e.Close() })
	return im.Attach(t, e, 1, st)
}
