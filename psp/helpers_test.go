package psp_test

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/internal/fixture"
	"github.com/sealdisk/sealdisk/provider"
	"github.com/sealdisk/sealdisk/psp"
)

// world is the shared fixture's world with two chips of one vendor, both trusting the
// provider, and the time certificates are issued around.
type world struct {
	*fixture.World
	now time.Time // whole seconds, as certificates store them
}

func newWorld(t *testing.T, kem uint16, alg format.SigAlg) *world {
	t.Helper()
	fw, err := fixture.NewWorld(t.TempDir(), fixture.Options{KEM: kem, SecondChip: true, SigAlg: alg})
	must(t, err)
	return &world{World: fw, now: time.Now().UTC().Truncate(time.Second)}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func chipCert(t *testing.T, dir string) *psp.ChipCert {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, psp.ChipCrtFile))
	must(t, err)
	c, err := psp.ParseChipCert(b)
	must(t, err)
	return c
}

func (w *world) signer(t *testing.T) crypto.Signer {
	t.Helper()
	s, err := provider.LoadSigner(w.ProviderKeyPath)
	must(t, err)
	return s
}

type req = provider.IssueRequest

// request is a valid issue request for w.ChipDir with a fresh image key.
func (w *world) request(t *testing.T) req {
	t.Helper()
	key := make([]byte, 32)
	rand.Read(key)
	return req{
		Chip: w.Chip, UUID: uuid.New(), VirtualSize: 1 << 20, SectorSize: 4096,
		Suite: format.SuiteAES256GCM, MeasureAlg: format.MeasureSHA384, Measurements: [][]byte{w.FirmwareDigest},
		NotBefore: w.now.Add(-time.Hour), NotAfter: w.now.Add(time.Hour), ImageKey: key,
	}
}

// issue makes a certificate (parsed back from its bytes, as a reader sees it) and a matching
// header; mod edits the request first.
func (w *world) issue(t *testing.T, mod func(r *req)) (*format.Certificate, *format.Header, []byte) {
	t.Helper()
	r := w.request(t)
	if mod != nil {
		mod(&r)
	}
	return issueWith(t, w.signer(t), r)
}

func issueWith(t *testing.T, s crypto.Signer, r req) (*format.Certificate, *format.Header, []byte) {
	t.Helper()
	c, err := provider.Issue(s, r)
	must(t, err)
	parsed, err := format.ParseCertificate(c.Bytes())
	must(t, err)
	h, err := format.NewHeader(r.UUID, r.VirtualSize, r.SectorSize, r.Suite, r.ReadOnly, format.Layout{}, c.Bytes())
	must(t, err)
	return parsed, h, r.ImageKey
}

// binder records engine key slots and fails the test's invariants if the PSP ever loads a
// bound slot or clears an empty one.
type binder struct {
	mu         sync.Mutex // guards the fields below
	loaded     map[psp.ASID][]byte
	bindings   map[psp.ASID]psp.Binding
	cleared    []psp.ASID
	loads      int
	violations []string
	loadErr    error          // returned by LoadKey when set
	clearErr   error          // returned by ClearKey when set
	keep       bool           // keep b.Key itself instead of a copy (to see the PSP zeroise it)
	onLoad     func(psp.ASID) // called first in LoadKey, without b.mu
}

func (b *binder) LoadKey(a psp.ASID, bd psp.Binding) error {
	if b.onLoad != nil {
		b.onLoad(a)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.loads++
	if b.loadErr != nil {
		return b.loadErr
	}
	if b.loaded == nil {
		b.loaded, b.bindings = map[psp.ASID][]byte{}, map[psp.ASID]psp.Binding{}
	}
	if _, ok := b.loaded[a]; ok {
		b.violations = append(b.violations, fmt.Sprintf("LoadKey on bound ASID %d", a))
	}
	if b.keep {
		b.loaded[a] = bd.Key
	} else {
		b.loaded[a] = bytes.Clone(bd.Key)
	}
	b.bindings[a] = bd
	return nil
}

func (b *binder) ClearKey(a psp.ASID) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.clearErr != nil {
		return b.clearErr
	}
	if _, ok := b.loaded[a]; !ok {
		b.violations = append(b.violations, fmt.Sprintf("ClearKey on empty ASID %d", a))
	}
	delete(b.loaded, a)
	b.cleared = append(b.cleared, a)
	return nil
}

func (b *binder) key(a psp.ASID) []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.loaded[a]
}

func (b *binder) loadCount() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.loads
}

func open(t *testing.T, dir string, b psp.KeyBinder, asids int) *psp.PSP {
	t.Helper()
	p, err := psp.Open(dir, psp.Options{Binder: b, ASIDs: asids})
	must(t, err)
	return p
}

func openAt(t *testing.T, dir string, now time.Time) *psp.PSP {
	t.Helper()
	p, err := psp.Open(dir, psp.Options{Now: func() time.Time { return now }})
	must(t, err)
	return p
}
