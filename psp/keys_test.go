package psp_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/binary"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/psp"
)

func mode(t *testing.T, path string) os.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	must(t, err)
	return fi.Mode().Perm()
}

func TestVendor(t *testing.T) {
	d := filepath.Join(t.TempDir(), "vendor")
	must(t, psp.InitVendor(d, "Example Silicon"))
	if m := mode(t, filepath.Join(d, psp.VendorKeyFile)); m != 0o600 {
		t.Fatalf("vendor.key mode %04o", m)
	}
	v, err := psp.LoadVendor(d)
	must(t, err)
	if !v.Cert.IsCA || v.Cert.Subject.CommonName != "Example Silicon" || v.Cert.NotAfter.Sub(v.Cert.NotBefore).Hours() < 10*365*24 {
		t.Fatalf("vendor certificate: CA %v, CN %q, %s..%s", v.Cert.IsCA, v.Cert.Subject.CommonName, v.Cert.NotBefore, v.Cert.NotAfter)
	}
	if k, ok := v.Cert.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P384() {
		t.Fatal("vendor key is not P-384")
	}
	if err := v.Cert.CheckSignatureFrom(v.Cert); err != nil {
		t.Fatal("not self-signed:", err)
	}
	if err := psp.InitVendor(d, ""); err == nil || !strings.Contains(err.Error(), "overwrite") {
		t.Fatal("InitVendor overwrote a vendor:", err)
	}

	// A key that is not the certificate's.
	d2 := filepath.Join(t.TempDir(), "vendor2")
	must(t, psp.InitVendor(d2, ""))
	must(t, os.Remove(filepath.Join(d2, psp.VendorKeyFile)))
	k, _ := os.ReadFile(filepath.Join(d, psp.VendorKeyFile))
	must(t, os.WriteFile(filepath.Join(d2, psp.VendorKeyFile), k, 0o600))
	if _, err := psp.LoadVendor(d2); err == nil {
		t.Fatal("mismatched vendor key accepted")
	}

	must(t, os.Chmod(filepath.Join(d, psp.VendorKeyFile), 0o640))
	if _, err := psp.LoadVendor(d); !errors.Is(err, psp.ErrKeyFileMode) || !strings.Contains(err.Error(), psp.VendorKeyFile) {
		t.Fatal(err)
	}
	if err := psp.InitChip(filepath.Join(t.TempDir(), "psp"), d, format.KEMMLKEM768X25519); !errors.Is(err, psp.ErrKeyFileMode) {
		t.Fatal("chip endorsed with a loose vendor key:", err)
	}
}

func TestInitChip(t *testing.T) {
	for _, kem := range []uint16{format.KEMMLKEM768X25519, format.KEMDHKEMP384} {
		t.Run(format.KEMName(kem), func(t *testing.T) {
			w := newWorld(t, kem, format.SigECDSAP384)
			for _, f := range []string{psp.KEMKeyFile, psp.AttestKeyFile} {
				if m := mode(t, filepath.Join(w.ChipDir, f)); m != 0o600 {
					t.Fatalf("%s mode %04o", f, m)
				}
			}
			fresh := filepath.Join(t.TempDir(), "psp")
			must(t, psp.InitChip(fresh, w.VendorDir, kem))
			if ents, err := os.ReadDir(filepath.Join(fresh, psp.TrustDir)); err != nil || len(ents) != 0 {
				t.Fatalf("trust/: %v, %d entries", err, len(ents))
			}
			vb, _ := os.ReadFile(filepath.Join(w.VendorDir, psp.VendorCrtFile))
			cb, _ := os.ReadFile(filepath.Join(w.ChipDir, psp.VendorCrtFile))
			if !bytes.Equal(vb, cb) {
				t.Fatal("vendor.crt is not a copy of the vendor root")
			}

			cc := w.Chip
			p := open(t, w.ChipDir, nil, 0)
			if cc.ID != p.ID() || cc.KEMID != kem || cc.KEM.ID() != kem || p.KEMID() != kem {
				t.Fatal("chip id or KEM disagree")
			}
			if cc.ID != sha256.Sum256(cc.PublicKey.Bytes()) || cc.Cert.Subject.CommonName != hex.EncodeToString(cc.ID[:]) {
				t.Fatal("chip id is not SHA-256 of the HPKE public key, or not the CN")
			}
			// The extension: non-critical, OCTET STRING of u16 KEM id || public key.
			var found bool
			for _, e := range cc.Cert.Extensions {
				if !e.Id.Equal(psp.OIDChipKEM) {
					continue
				}
				found = true
				var raw []byte
				_, err := asn1.Unmarshal(e.Value, &raw)
				must(t, err)
				if e.Critical || binary.BigEndian.Uint16(raw) != kem || !bytes.Equal(raw[2:], cc.PublicKey.Bytes()) {
					t.Fatalf("extension critical=%v value %x…", e.Critical, raw[:4])
				}
			}
			if !found || psp.OIDChipKEM.String() != "1.3.6.1.4.1.59999.1.1" {
				t.Fatal("no KEM extension")
			}
			if err := cc.Cert.CheckSignatureFrom(p.Vendor()); err != nil {
				t.Fatal(err)
			}
			if err := psp.InitChip(w.ChipDir, w.VendorDir, kem); err == nil {
				t.Fatal("InitChip overwrote a chip")
			}
		})
	}
	if err := psp.InitChip(t.TempDir(), t.TempDir(), 0x0020); err == nil {
		t.Fatal("unsupported KEM accepted")
	}
}

func TestChipCertChain(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	cc := w.Chip
	root, err := psp.ReadCertificate(filepath.Join(w.VendorDir, psp.VendorCrtFile))
	must(t, err)
	must(t, cc.VerifyChain(psp.RootPool(root)))

	other := filepath.Join(w.Dir, "vendor2")
	must(t, psp.InitVendor(other, ""))
	root2, err := psp.ReadCertificate(filepath.Join(other, psp.VendorCrtFile))
	must(t, err)
	if err := cc.VerifyChain(psp.RootPool(root2)); !errors.Is(err, psp.ErrChipChain) {
		t.Fatal(err)
	}
	if err := cc.VerifyChain(nil); !errors.Is(err, psp.ErrChipChain) {
		t.Fatal("nil pool:", err)
	}
}

func TestParseChipCertRefusals(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	vb, _ := os.ReadFile(filepath.Join(w.VendorDir, psp.VendorCrtFile))
	if _, err := psp.ParseChipCert(vb); err == nil || !strings.Contains(err.Error(), "KEM extension") {
		t.Fatal("vendor certificate parsed as a chip:", err)
	}
	if _, err := psp.ParseChipCert([]byte("not pem")); err == nil {
		t.Fatal("garbage parsed")
	}
	for _, k := range []string{"mlkem768x25519", "p384", ""} {
		if _, err := psp.ParseKEM(k); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := psp.ParseKEM("x448"); err == nil {
		t.Fatal("unknown KEM name accepted")
	}
}

func TestOpenRefusesLooseKeyFiles(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	for _, f := range []string{psp.KEMKeyFile, psp.AttestKeyFile} {
		for _, m := range []os.FileMode{0o644, 0o640, 0o604, 0o660} {
			path := filepath.Join(w.ChipDir, f)
			must(t, os.Chmod(path, m))
			_, err := psp.Open(w.ChipDir, psp.Options{})
			must(t, os.Chmod(path, 0o600))
			if !errors.Is(err, psp.ErrKeyFileMode) || !strings.Contains(err.Error(), f) {
				t.Fatalf("%s at %04o: %v", f, m, err)
			}
		}
	}
	must(t, os.Chmod(filepath.Join(w.ChipDir, psp.KEMKeyFile), 0o400)) // stricter is fine
	open(t, w.ChipDir, nil, 0)
}

// TestOpenRefusesMismatchedIdentity swaps one file of a PSP directory for another chip's or
// another vendor's.
func TestOpenRefusesMismatchedIdentity(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	other := filepath.Join(w.Dir, "vendor2")
	must(t, psp.InitVendor(other, ""))
	for _, tc := range []struct{ file, from string }{
		{psp.KEMKeyFile, filepath.Join(w.Chip2Dir, psp.KEMKeyFile)},
		{psp.AttestKeyFile, filepath.Join(w.Chip2Dir, psp.AttestKeyFile)},
		{psp.VendorCrtFile, filepath.Join(other, psp.VendorCrtFile)},
	} {
		t.Run(tc.file, func(t *testing.T) {
			dst := filepath.Join(w.ChipDir, tc.file)
			orig, err := os.ReadFile(dst)
			must(t, err)
			repl, err := os.ReadFile(tc.from)
			must(t, err)
			must(t, os.WriteFile(dst, repl, 0o600))
			defer os.WriteFile(dst, orig, 0o600)
			if _, err := psp.Open(w.ChipDir, psp.Options{}); err == nil || !strings.Contains(err.Error(), "failed to open PSP") {
				t.Fatal(err)
			}
		})
	}
	open(t, w.ChipDir, nil, 0)
}

func TestTrustStoreRefusesUnusableKeys(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	d := t.TempDir()
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 1024)
	for name, pub := range map[string]any{"p256": p256.Public(), "rsa": rsaKey.Public()} {
		der, err := x509.MarshalPKIXPublicKey(pub)
		must(t, err)
		f := filepath.Join(d, name+".pub")
		must(t, os.WriteFile(f, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o644))
		if err := psp.AddTrustedProvider(w.ChipDir, f); err == nil {
			t.Fatalf("%s provider key trusted", name)
		}
		if _, err := psp.ReadProviderKey(f); err == nil {
			t.Fatalf("%s provider key read", name)
		}
	}
	// A stray unusable file in trust/ makes Open say which file.
	must(t, os.WriteFile(filepath.Join(w.ChipDir, psp.TrustDir, "junk.pub"), []byte("junk"), 0o644))
	if _, err := psp.Open(w.ChipDir, psp.Options{}); err == nil || !strings.Contains(err.Error(), "junk.pub") {
		t.Fatal(err)
	}
	ts, err := psp.LoadTrustStore(w.ProviderPubPath)
	must(t, err)
	if len(ts) != 1 {
		t.Fatal(len(ts))
	}
}
