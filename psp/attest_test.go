package psp_test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha512"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/psp"
)

type attestFixture struct {
	w     *world
	p     *psp.PSP
	l     *psp.Launch
	c     *format.Certificate
	nonce []byte
	env   []byte
}

func attested(t *testing.T) *attestFixture {
	t.Helper()
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	p := open(t, w.ChipDir, &binder{}, 0)
	c, h, _ := w.issue(t, nil)
	l, err := p.Launch(psp.LaunchRequest{VM: "vm1", Cert: c, Header: h, FirmwarePath: w.Firmware})
	must(t, err)
	nonce := make([]byte, 32)
	rand.Read(nonce)
	env, err := p.Attest(l.ASID, nonce)
	must(t, err)
	return &attestFixture{w: w, p: p, l: l, c: c, nonce: nonce, env: env}
}

func vendorPool(t *testing.T, vendorDir string) *x509.CertPool {
	t.Helper()
	root, err := psp.ReadCertificate(filepath.Join(vendorDir, psp.VendorCrtFile))
	must(t, err)
	return psp.RootPool(root)
}

func TestAttestVerify(t *testing.T) {
	f := attested(t)
	body, err := psp.VerifyReport(f.env, vendorPool(t, f.w.VendorDir), f.nonce)
	must(t, err)
	id := f.p.ID()
	digest := sha512.Sum384(f.c.Bytes())
	tm, err := time.Parse(time.RFC3339, body.Time)
	must(t, err)
	if body.Version != 1 || body.ChipID != hex.EncodeToString(id[:]) || body.VM != "vm1" || body.ASID != f.l.ASID ||
		body.FirmwareMeasurement != hex.EncodeToString(f.l.Measurement) || body.MeasureAlg != "sha384" ||
		body.FirmwareVerdict != "match" || body.CertDigest != hex.EncodeToString(digest[:]) ||
		body.SignatureVerdict != "valid" || body.Suite != "aes-256-gcm" ||
		body.ImageUUID != uuid.UUID(f.c.UUID).String() || body.Nonce != hex.EncodeToString(f.nonce) ||
		time.Since(tm) > time.Hour {
		t.Fatalf("%+v", body)
	}
	// The envelope carries the PSP's own chip certificate.
	var env psp.Envelope
	must(t, json.Unmarshal(f.env, &env))
	if len(env.Chain) != 1 || env.Chain[0] != string(f.p.ChipPEM()) {
		t.Fatal("chain is not the chip certificate")
	}
}

func TestAttestWrongNonce(t *testing.T) {
	f := attested(t)
	wrong := bytes.Clone(f.nonce)
	wrong[len(wrong)-1] ^= 1
	if _, err := psp.VerifyReport(f.env, vendorPool(t, f.w.VendorDir), wrong); !errors.Is(err, psp.ErrReportNonce) {
		t.Fatal(err)
	}
	if _, err := psp.VerifyReport(f.env, vendorPool(t, f.w.VendorDir), append(bytes.Clone(f.nonce), 0)); !errors.Is(err, psp.ErrReportNonce) {
		t.Fatal("longer nonce:", err)
	}
}

// editEnvelope decodes the envelope, lets edit change it, and encodes it again.
func editEnvelope(t *testing.T, b []byte, edit func(e *psp.Envelope)) []byte {
	t.Helper()
	var env psp.Envelope
	must(t, json.Unmarshal(b, &env))
	edit(&env)
	out, err := json.Marshal(env)
	must(t, err)
	return out
}

func TestAttestTampered(t *testing.T) {
	f := attested(t)
	pool := vendorPool(t, f.w.VendorDir)
	for _, tc := range []struct {
		name string
		edit func(e *psp.Envelope)
		want error
	}{
		{"body vm", func(e *psp.Envelope) { e.Body = bytes.Replace(e.Body, []byte(`"vm1"`), []byte(`"vm2"`), 1) }, psp.ErrReportSignature},
		{"body verdict", func(e *psp.Envelope) { e.Body = bytes.Replace(e.Body, []byte(`"asid":1`), []byte(`"asid":2`), 1) }, psp.ErrReportSignature},
		{"signature", func(e *psp.Envelope) { e.Signature[len(e.Signature)-1] ^= 1 }, psp.ErrReportSignature},
		{"other chip's certificate", func(e *psp.Envelope) {
			o := open(t, f.w.Chip2Dir, nil, 0)
			e.Chain = []string{string(o.ChipPEM())}
		}, psp.ErrReportSignature},
		{"no chain", func(e *psp.Envelope) { e.Chain = nil }, psp.ErrReportFormat},
		{"chain not pem", func(e *psp.Envelope) { e.Chain = []string{"x"} }, psp.ErrReportFormat},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := editEnvelope(t, f.env, tc.edit)
			if bytes.Equal(env, f.env) {
				t.Fatal("edit changed nothing")
			}
			if _, err := psp.VerifyReport(env, pool, f.nonce); !errors.Is(err, tc.want) {
				t.Fatalf("%v, want %v", err, tc.want)
			}
		})
	}
	if _, err := psp.VerifyReport([]byte("{"), pool, f.nonce); !errors.Is(err, psp.ErrReportFormat) {
		t.Fatal(err)
	}
}

func TestAttestOtherVendor(t *testing.T) {
	f := attested(t)
	v2 := filepath.Join(f.w.Dir, "vendor2")
	must(t, psp.InitVendor(v2, ""))
	_, err := psp.VerifyReport(f.env, vendorPool(t, v2), f.nonce)
	if !errors.Is(err, psp.ErrReportChain) || !errors.Is(err, psp.ErrChipChain) {
		t.Fatal(err)
	}
	// A chip of the other vendor, launched and attested, verifies only against its own root.
	chip3 := filepath.Join(f.w.Dir, "psp3")
	must(t, psp.InitChip(chip3, v2, format.KEMDHKEMP384))
	must(t, psp.AddTrustedProvider(chip3, f.w.ProviderPubPath))
	p3 := open(t, chip3, &binder{}, 0)
	c, h, _ := f.w.issue(t, func(r *req) { r.Chip = chipCert(t, chip3) })
	l, err := p3.Launch(psp.LaunchRequest{VM: "vm3", Cert: c, Header: h, FirmwarePath: f.w.Firmware})
	must(t, err)
	env, err := p3.Attest(l.ASID, f.nonce)
	must(t, err)
	if _, err := psp.VerifyReport(env, vendorPool(t, v2), f.nonce); err != nil {
		t.Fatal(err)
	}
	if _, err := psp.VerifyReport(env, vendorPool(t, f.w.VendorDir), f.nonce); !errors.Is(err, psp.ErrReportChain) {
		t.Fatal(err)
	}
}

func TestAttestNonceLength(t *testing.T) {
	f := attested(t)
	for _, n := range []int{0, psp.MinNonce - 1, psp.MaxNonce + 1} {
		if _, err := f.p.Attest(f.l.ASID, make([]byte, n)); !errors.Is(err, psp.ErrNonceLength) {
			t.Fatalf("%d-byte nonce: %v", n, err)
		}
		if _, err := psp.VerifyReport(f.env, vendorPool(t, f.w.VendorDir), make([]byte, n)); !errors.Is(err, psp.ErrNonceLength) {
			t.Fatalf("verify with %d-byte nonce: %v", n, err)
		}
	}
	for _, n := range []int{psp.MinNonce, psp.MaxNonce} {
		nonce := bytes.Repeat([]byte{byte(n)}, n)
		env, err := f.p.Attest(f.l.ASID, nonce)
		must(t, err)
		if _, err := psp.VerifyReport(env, vendorPool(t, f.w.VendorDir), nonce); err != nil {
			t.Fatal(err)
		}
	}
}

func TestAttestLaunch(t *testing.T) {
	f := attested(t)
	pool := vendorPool(t, f.w.VendorDir)
	// The report is built from the PSP's record, not from the caller's copy.
	forged := *f.l
	forged.Measurement = bytes.Repeat([]byte{0xee}, 48)
	forged.Suite = format.SuiteSM4GCM
	env, err := f.p.AttestLaunch(&forged, f.nonce)
	must(t, err)
	body, err := psp.VerifyReport(env, pool, f.nonce)
	must(t, err)
	if body.FirmwareMeasurement != hex.EncodeToString(f.l.Measurement) || body.Suite != "aes-256-gcm" {
		t.Fatalf("report repeats the caller's fields: %+v", body)
	}
	// A launch that is not (or no longer) bound gets no report.
	other := *f.l
	other.VM = "someone else"
	if _, err := f.p.AttestLaunch(&other, f.nonce); !errors.Is(err, psp.ErrNoKeyBound) {
		t.Fatal(err)
	}
	must(t, f.p.Detach(f.l.ASID))
	if _, err := f.p.AttestLaunch(f.l, f.nonce); !errors.Is(err, psp.ErrNoKeyBound) {
		t.Fatal(err)
	}
	if _, err := f.p.Attest(f.l.ASID, f.nonce); !errors.Is(err, psp.ErrNoKeyBound) {
		t.Fatal(err)
	}
}

// A report carries the image's counter and root as the PSP last recorded them (a commit's
// Advance), so a verifier can pin them; before the PSP knows the image, neither is there.
func TestAttestCarriesCounterAndRoot(t *testing.T) {
	f := attested(t)
	body, err := psp.VerifyReport(f.env, vendorPool(t, f.w.VendorDir), f.nonce)
	must(t, err)
	if body.ImageCounter != nil || body.ImageRoot != "" {
		t.Fatalf("counter %v root %q before the image was attached", body.ImageCounter, body.ImageRoot)
	}
	roots, err := f.p.RootsFor(f.c)
	must(t, err)
	root := [32]byte{1, 2, 3}
	must(t, roots.Advance(42, root))
	env, err := f.p.Attest(f.l.ASID, f.nonce)
	must(t, err)
	body, err = psp.VerifyReport(env, vendorPool(t, f.w.VendorDir), f.nonce)
	must(t, err)
	if body.ImageCounter == nil || *body.ImageCounter != 42 || body.ImageRoot != hex.EncodeToString(root[:]) {
		t.Fatalf("counter %v root %q, want 42 and %x", body.ImageCounter, body.ImageRoot, root)
	}
}
