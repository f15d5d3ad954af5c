package psp_test

import (
	"bytes"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/provider"
	"github.com/sealdisk/sealdisk/psp"
)

// world is a vendor, one or two chips, a trusted provider and a firmware file.
type world struct {
	dir, vendor, chip, chip2, fw string
	prov                         string // provider key path
	now                          time.Time
}

func newWorld(t *testing.T, kem uint16, alg format.SigAlg) *world {
	t.Helper()
	d := t.TempDir()
	w := &world{dir: d, vendor: filepath.Join(d, "vendor"), chip: filepath.Join(d, "psp"), chip2: filepath.Join(d, "psp2"), fw: filepath.Join(d, "OVMF.fd"), now: time.Now()}
	must(t, psp.InitVendor(w.vendor, ""))
	must(t, psp.InitChip(w.chip, w.vendor, kem))
	must(t, psp.InitChip(w.chip2, w.vendor, kem))
	k, err := provider.GenerateKey(alg)
	must(t, err)
	must(t, provider.SaveKeyPair(filepath.Join(d, "prov"), "provider", k))
	w.prov = filepath.Join(d, "prov", "provider.key")
	must(t, psp.AddTrustedProvider(w.chip, filepath.Join(d, "prov", "provider.pub")))
	must(t, psp.AddTrustedProvider(w.chip2, filepath.Join(d, "prov", "provider.pub")))
	must(t, os.WriteFile(w.fw, []byte("firmware image bytes"), 0o644))
	return w
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func chipCert(t *testing.T, dir string) *psp.ChipCert {
	b, err := os.ReadFile(filepath.Join(dir, psp.ChipCrtFile))
	must(t, err)
	c, err := psp.ParseChipCert(b)
	must(t, err)
	return c
}

type req = provider.IssueRequest

// issue makes a certificate and a matching header; mod edits the request first.
func (w *world) issue(t *testing.T, mod func(r *req)) (*format.Certificate, *format.Header, []byte) {
	t.Helper()
	m, err := psp.Measure(w.fw, format.MeasureSHA384)
	must(t, err)
	key := make([]byte, 32)
	rand.Read(key)
	r := req{
		Chip: chipCert(t, w.chip), UUID: uuid.New(), VirtualSize: 1 << 20, SectorSize: 4096,
		Suite: format.SuiteAES256GCM, MeasureAlg: format.MeasureSHA384, Measurements: [][]byte{m},
		NotBefore: w.now.Add(-time.Hour), NotAfter: w.now.Add(time.Hour), ImageKey: key,
	}
	if mod != nil {
		mod(&r)
	}
	s, err := provider.LoadSigner(w.prov)
	must(t, err)
	c, err := provider.Issue(s, r)
	must(t, err)
	parsed, err := format.ParseCertificate(c.Bytes())
	must(t, err)
	h, err := format.NewHeader(r.UUID, r.VirtualSize, r.SectorSize, r.Suite, r.ReadOnly, 0, c.Bytes())
	must(t, err)
	return parsed, h, key
}

type binder struct {
	loaded  map[psp.ASID][]byte
	cleared []psp.ASID
}

func (b *binder) LoadKey(a psp.ASID, bd psp.Binding) error {
	if b.loaded == nil {
		b.loaded = map[psp.ASID][]byte{}
	}
	b.loaded[a] = bytes.Clone(bd.Key)
	return nil
}

func (b *binder) ClearKey(a psp.ASID) error {
	delete(b.loaded, a)
	b.cleared = append(b.cleared, a)
	return nil
}

func open(t *testing.T, dir string, b psp.KeyBinder, asids int) *psp.PSP {
	p, err := psp.Open(dir, psp.Options{Binder: b, ASIDs: asids})
	must(t, err)
	return p
}

func TestUnsealBothKEMsAndSigAlgs(t *testing.T) {
	for _, kem := range []uint16{format.KEMMLKEM768X25519, format.KEMDHKEMP384} {
		for _, alg := range []format.SigAlg{format.SigECDSAP384, format.SigEd25519} {
			w := newWorld(t, kem, alg)
			c, h, key := w.issue(t, nil)
			got, err := open(t, w.chip, nil, 0).UnsealImageKey(c, h)
			if err != nil || !bytes.Equal(got, key) {
				t.Fatalf("kem %x alg %s: %v", kem, alg, err)
			}
		}
	}
}

func TestRefusals(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	p := open(t, w.chip, nil, 0)
	// unknown provider: a fresh PSP dir with an empty trust store
	t.Run("unknown provider", func(t *testing.T) {
		c, h, _ := w.issue(t, nil)
		os.RemoveAll(filepath.Join(w.chip, psp.TrustDir))
		defer func() {
			must(t, psp.AddTrustedProvider(w.chip, filepath.Join(w.dir, "prov", "provider.pub")))
		}()
		q := open(t, w.chip, nil, 0)
		if _, err := q.UnsealImageKey(c, h); !errors.Is(err, psp.ErrUnknownProvider) {
			t.Fatal(err)
		}
	})
	t.Run("bad signature", func(t *testing.T) {
		c, h, _ := w.issue(t, nil)
		c.Signature[len(c.Signature)/2] ^= 1
		if _, err := p.UnsealImageKey(c, h); !errors.Is(err, psp.ErrBadSignature) {
			t.Fatal(err)
		}
		c2, h2, _ := w.issue(t, nil)
		c2.Body[20] ^= 1 // a body byte (the UUID) changed after signing
		if _, err := p.UnsealImageKey(c2, h2); !errors.Is(err, psp.ErrBadSignature) {
			t.Fatal(err)
		}
	})
	t.Run("wrong chip", func(t *testing.T) {
		c, h, _ := w.issue(t, func(r *req) { r.Chip = chipCert(t, w.chip2) })
		_, err := p.UnsealImageKey(c, h)
		if !errors.Is(err, psp.ErrWrongChip) || !strings.Contains(err.Error(), "this chip is") {
			t.Fatal(err)
		}
	})
	t.Run("expired", func(t *testing.T) {
		c, h, _ := w.issue(t, func(r *req) { r.NotBefore, r.NotAfter = w.now.Add(-2*time.Hour), w.now.Add(-time.Hour) })
		if _, err := p.UnsealImageKey(c, h); !errors.Is(err, psp.ErrExpired) {
			t.Fatal(err)
		}
	})
	t.Run("not yet valid", func(t *testing.T) {
		c, h, _ := w.issue(t, func(r *req) { r.NotBefore, r.NotAfter = w.now.Add(time.Hour), w.now.Add(2*time.Hour) })
		if _, err := p.UnsealImageKey(c, h); !errors.Is(err, psp.ErrNotYetValid) {
			t.Fatal(err)
		}
	})
	t.Run("image mismatch", func(t *testing.T) {
		c, h, _ := w.issue(t, nil)
		h.VirtualSize *= 2
		h.MetaSize, h.DataOffset = 1<<20, h.MetaOffset+1<<20
		_, err := p.UnsealImageKey(c, h)
		if !errors.Is(err, psp.ErrImageMismatch) || !strings.Contains(err.Error(), "virtual_size") {
			t.Fatal(err)
		}
	})
	t.Run("key unseal", func(t *testing.T) {
		// A sealed key lifted from another image's certificate: the signature is the
		// provider's own, but the HPKE info binds the other UUID.
		a, _, _ := w.issue(t, nil)
		s, _ := provider.LoadSigner(w.prov)
		b, h, _ := w.issue(t, nil)
		b.SealedKey = a.SealedKey
		body, err := b.MarshalBody()
		must(t, err)
		_ = body
		nb, err := provider.Resign(s, b)
		must(t, err)
		if _, err := p.UnsealImageKey(nb, h); !errors.Is(err, psp.ErrKeyUnseal) {
			t.Fatal(err)
		}
	})
	t.Run("remote key", func(t *testing.T) {
		c, h, _ := w.issue(t, func(r *req) { r.BrokerURL, r.KeyID = "https://broker.example/v1", "k1" })
		if _, err := p.UnsealImageKey(c, h); !errors.Is(err, psp.ErrRemoteKey) {
			t.Fatal(err)
		}
	})
	t.Run("loose key file mode", func(t *testing.T) {
		must(t, os.Chmod(filepath.Join(w.chip2, psp.KEMKeyFile), 0o644))
		defer os.Chmod(filepath.Join(w.chip2, psp.KEMKeyFile), 0o600)
		if _, err := psp.Open(w.chip2, psp.Options{}); !errors.Is(err, psp.ErrKeyFileMode) || !strings.Contains(err.Error(), psp.KEMKeyFile) {
			t.Fatal(err)
		}
	})
}

func TestLaunchFirmwareAndASIDs(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	b := &binder{}
	p := open(t, w.chip, b, 2)
	c, h, key := w.issue(t, nil)
	other := filepath.Join(w.dir, "other.fd")
	must(t, os.WriteFile(other, []byte("tampered firmware"), 0o644))
	_, err := p.Launch(psp.LaunchRequest{VM: "vm0", Cert: c, Header: h, FirmwarePath: other})
	if !errors.Is(err, psp.ErrFirmwareMismatch) || len(b.loaded) != 0 {
		t.Fatalf("firmware mismatch: %v, loaded %d", err, len(b.loaded))
	}
	l1, err := p.Launch(psp.LaunchRequest{VM: "vm1", Cert: c, Header: h, FirmwarePath: w.fw})
	must(t, err)
	if !bytes.Equal(b.loaded[l1.ASID], key) || l1.ASID != 1 {
		t.Fatal("key not bound to ASID 1")
	}
	if _, err := p.Launch(psp.LaunchRequest{VM: "dup", Cert: c, Header: h, FirmwarePath: w.fw, ASID: 1}); !errors.Is(err, psp.ErrASIDInUse) {
		t.Fatal(err)
	}
	l2, err := p.Launch(psp.LaunchRequest{VM: "vm2", Cert: c, Header: h, FirmwarePath: w.fw})
	must(t, err)
	if _, err := p.Launch(psp.LaunchRequest{VM: "vm3", Cert: c, Header: h, FirmwarePath: w.fw}); !errors.Is(err, psp.ErrASIDExhausted) {
		t.Fatal(err)
	}
	must(t, p.Detach(l2.ASID))
	if _, ok := b.loaded[l2.ASID]; ok || len(b.cleared) != 1 {
		t.Fatal("detach did not clear the slot")
	}
	if err := p.Detach(l2.ASID); !errors.Is(err, psp.ErrNoKeyBound) {
		t.Fatal(err)
	}
	if _, err := p.Launch(psp.LaunchRequest{VM: "vm3", Cert: c, Header: h, FirmwarePath: w.fw}); err != nil {
		t.Fatal("freed ASID not reusable:", err)
	}
}

func TestMeasureSM3(t *testing.T) {
	f := filepath.Join(t.TempDir(), "abc")
	must(t, os.WriteFile(f, []byte("abc"), 0o644))
	m, err := psp.Measure(f, format.MeasureSM3)
	must(t, err)
	// GB/T 32905-2016 example 1
	if want := "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"; bytesHex(m) != want {
		t.Fatalf("sm3(abc) = %x", m)
	}
}

func bytesHex(b []byte) string {
	const hx = "0123456789abcdef"
	out := make([]byte, 0, 2*len(b))
	for _, c := range b {
		out = append(out, hx[c>>4], hx[c&15])
	}
	return string(out)
}

func TestAttestation(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	p := open(t, w.chip, &binder{}, 0)
	c, h, _ := w.issue(t, nil)
	l, err := p.Launch(psp.LaunchRequest{VM: "vm1", Cert: c, Header: h, FirmwarePath: w.fw})
	must(t, err)
	nonce := make([]byte, 32)
	rand.Read(nonce)
	env, err := p.Attest(l.ASID, nonce)
	must(t, err)
	root, err := psp.ReadCertificate(filepath.Join(w.vendor, psp.VendorCrtFile))
	must(t, err)
	body, err := psp.VerifyReport(env, psp.RootPool(root), nonce)
	must(t, err)
	if body.VM != "vm1" || body.FirmwareVerdict != "match" || body.SignatureVerdict != "valid" || body.ASID != l.ASID {
		t.Fatalf("%+v", body)
	}
	wrong := bytes.Clone(nonce)
	wrong[0] ^= 1
	if _, err := psp.VerifyReport(env, psp.RootPool(root), wrong); !errors.Is(err, psp.ErrReportNonce) {
		t.Fatal(err)
	}
	tampered := bytes.Replace(env, []byte(`"body": "`), []byte(`"body": "A`), 1)
	if _, err := psp.VerifyReport(tampered, psp.RootPool(root), nonce); err == nil {
		t.Fatal("tampered report accepted")
	}
	v2 := filepath.Join(w.dir, "vendor2")
	must(t, psp.InitVendor(v2, ""))
	root2, _ := psp.ReadCertificate(filepath.Join(v2, psp.VendorCrtFile))
	if _, err := psp.VerifyReport(env, psp.RootPool(root2), nonce); !errors.Is(err, psp.ErrReportChain) {
		t.Fatal(err)
	}
	if _, err := p.Attest(l.ASID, []byte("short")); err == nil {
		t.Fatal("short nonce accepted")
	}
}
