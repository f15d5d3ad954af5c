package provider_test

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hpke"
	"crypto/rand"
	"crypto/sha512"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/provider"
	"github.com/sealdisk/sealdisk/psp"
)

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestKeyPairFiles(t *testing.T) {
	for _, alg := range []format.SigAlg{format.SigECDSAP384, format.SigEd25519} {
		t.Run(alg.String(), func(t *testing.T) {
			d := t.TempDir()
			k, err := provider.GenerateKey(alg)
			must(t, err)
			if got, err := provider.SigAlgOf(k); err != nil || got != alg {
				t.Fatalf("SigAlgOf = %v, %v", got, err)
			}
			must(t, provider.SaveKeyPair(d, "acme", k))
			fi, err := os.Stat(filepath.Join(d, "acme.key"))
			must(t, err)
			if fi.Mode().Perm() != 0o600 {
				t.Fatalf("acme.key mode %04o", fi.Mode().Perm())
			}
			s, err := provider.LoadSigner(filepath.Join(d, "acme.key"))
			must(t, err)
			pub, err := provider.LoadPublicKey(filepath.Join(d, "acme.pub"))
			must(t, err)
			eq := k.Public().(interface{ Equal(crypto.PublicKey) bool })
			if !eq.Equal(s.Public()) || !eq.Equal(pub) {
				t.Fatal("loaded keys differ from the saved pair")
			}
			if err := provider.SaveKeyPair(d, "acme", k); err == nil {
				t.Fatal("SaveKeyPair overwrote a private key")
			}
			must(t, os.Chmod(filepath.Join(d, "acme.key"), 0o644))
			if _, err := provider.LoadSigner(filepath.Join(d, "acme.key")); !errors.Is(err, psp.ErrKeyFileMode) {
				t.Fatal(err)
			}
		})
	}
	if _, err := provider.GenerateKey(format.SigAlg(7)); err == nil {
		t.Fatal("unknown algorithm generated")
	}
}

func TestLoadSignerRefusesOtherCurves(t *testing.T) {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	f := filepath.Join(t.TempDir(), "p256.key")
	must(t, psp.WritePrivatePEM(f, k))
	if _, err := provider.LoadSigner(f); err == nil || !strings.Contains(err.Error(), "P-384") {
		t.Fatal(err)
	}
	if _, err := provider.Issue(k, provider.IssueRequest{}); err == nil {
		t.Fatal("issued with a P-256 key")
	}
}

// chip is an InitChip'd chip: its certificate and its HPKE private key (read from kem.key the
// way the PSP does, to open sealed keys independently of package psp).
type chip struct {
	cert *psp.ChipCert
	priv hpke.PrivateKey
}

func newChip(t *testing.T, kem uint16) *chip {
	t.Helper()
	d := t.TempDir()
	must(t, psp.InitVendor(filepath.Join(d, "vendor"), ""))
	must(t, psp.InitChip(filepath.Join(d, "psp"), filepath.Join(d, "vendor"), kem))
	b, err := os.ReadFile(filepath.Join(d, "psp", psp.ChipCrtFile))
	must(t, err)
	cc, err := psp.ParseChipCert(b)
	must(t, err)
	kb, err := os.ReadFile(filepath.Join(d, "psp", psp.KEMKeyFile))
	must(t, err)
	blk, _ := pem.Decode(kb)
	if id, _ := strconv.Atoi(blk.Headers["KEM"]); uint16(id) != kem {
		t.Fatalf("kem.key header KEM %q", blk.Headers["KEM"])
	}
	priv, err := cc.KEM.NewPrivateKey(blk.Bytes)
	must(t, err)
	return &chip{cert: cc, priv: priv}
}

func request(ch *chip, key []byte) provider.IssueRequest {
	now := time.Now()
	return provider.IssueRequest{
		Chip: ch.cert, UUID: uuid.New(), VirtualSize: 8 << 20, SectorSize: 4096,
		Suite: format.SuiteSM4GCM, MeasureAlg: format.MeasureSM3, Measurements: [][]byte{bytes.Repeat([]byte{3}, 32)},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(24 * time.Hour), ReadOnly: true, ImageKey: key,
	}
}

func TestIssue(t *testing.T) {
	for _, kem := range []uint16{format.KEMMLKEM768X25519, format.KEMDHKEMP384} {
		ch := newChip(t, kem)
		for _, alg := range []format.SigAlg{format.SigECDSAP384, format.SigEd25519} {
			t.Run(format.KEMName(kem)+"/"+alg.String(), func(t *testing.T) {
				s, err := provider.GenerateKey(alg)
				must(t, err)
				key := make([]byte, 32)
				rand.Read(key)
				r := request(ch, key)
				issued, err := provider.Issue(s, r)
				must(t, err)
				c, err := format.ParseCertificate(issued.Bytes())
				must(t, err)
				pkix, _ := x509.MarshalPKIXPublicKey(s.Public())
				if c.ChipID != ch.cert.ID || c.KEM != kem || c.KDF != format.KDFHKDFSHA384 || c.AEAD != format.AEADAES256GCM ||
					c.ProviderAlg != alg || !bytes.Equal(c.ProviderKey, pkix) || c.UUID != r.UUID || !c.ReadOnly || c.Remote ||
					c.Suite != format.SuiteSM4GCM || c.MeasureAlg != format.MeasureSM3 || !c.NotBefore.Equal(r.NotBefore.Truncate(time.Second)) {
					t.Fatalf("certificate fields %+v", c)
				}

				// The signature is over the body bytes, in the algorithm's own form.
				switch pub := s.Public().(type) {
				case *ecdsa.PublicKey:
					h := sha512.Sum384(c.Body)
					if !ecdsa.VerifyASN1(pub, h[:], c.Signature) {
						t.Fatal("ECDSA signature does not verify over SHA-384(body)")
					}
				case ed25519.PublicKey:
					if !ed25519.Verify(pub, c.Body, c.Signature) {
						t.Fatal("Ed25519 signature does not verify over body")
					}
				}
				must(t, psp.TrustStore{string(pkix): s.Public()}.VerifySignature(c))

				// The sealed key opens with the chip's key only under FORMAT.md §3.3's info.
				got, err := hpke.Open(ch.priv, hpke.HKDFSHA384(), hpke.AES256GCM(), psp.KeyInfo(r.UUID, ch.cert.ID), c.SealedKey)
				must(t, err)
				if !bytes.Equal(got, key) {
					t.Fatal("sealed key opens to another key")
				}
				if string(psp.KeyInfo(r.UUID, ch.cert.ID)) != "sealdisk v1 image key"+string(r.UUID[:])+string(ch.cert.ID[:]) {
					t.Fatal("KeyInfo is not label || uuid || chip_id")
				}
				otherUUID := uuid.New()
				if _, err := hpke.Open(ch.priv, hpke.HKDFSHA384(), hpke.AES256GCM(), psp.KeyInfo(otherUUID, ch.cert.ID), c.SealedKey); err == nil {
					t.Fatal("sealed key opens under another image's info")
				}
			})
		}
	}
}

func TestIssueRemote(t *testing.T) {
	ch := newChip(t, format.KEMMLKEM768X25519)
	s, _ := provider.GenerateKey(format.SigEd25519)
	r := request(ch, nil)
	r.BrokerURL, r.KeyID = "https://broker.example/keys", "disk-7"
	c, err := provider.Issue(s, r)
	must(t, err)
	c, err = format.ParseCertificate(c.Bytes())
	must(t, err)
	if !c.Remote || len(c.SealedKey) != 0 || c.BrokerURL != r.BrokerURL || c.KeyID != "disk-7" {
		t.Fatalf("%+v", c)
	}
	r.ImageKey = make([]byte, 32)
	if _, err := provider.Issue(s, r); err == nil {
		t.Fatal("issued a remote certificate while given an image key")
	}
}

func TestIssueRefusals(t *testing.T) {
	ch := newChip(t, format.KEMMLKEM768X25519)
	other := newChip(t, format.KEMDHKEMP384)
	s, _ := provider.GenerateKey(format.SigECDSAP384)
	for _, tc := range []struct {
		name string
		edit func(r *provider.IssueRequest)
	}{
		{"short key", func(r *provider.IssueRequest) { r.ImageKey = r.ImageKey[:31] }},
		{"no key", func(r *provider.IssueRequest) { r.ImageKey = nil }},
		{"no chip", func(r *provider.IssueRequest) { r.Chip = nil }},
		{"chip id of another key", func(r *provider.IssueRequest) {
			c := *ch.cert
			c.ID = other.cert.ID
			r.Chip = &c
		}},
		{"KEM id of another KEM", func(r *provider.IssueRequest) {
			c := *ch.cert
			c.KEMID = format.KEMDHKEMP384
			r.Chip = &c
		}},
		{"invalid field", func(r *provider.IssueRequest) { r.SectorSize = 1000 }},
		{"window", func(r *provider.IssueRequest) { r.NotAfter = r.NotBefore }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := request(ch, make([]byte, 32))
			tc.edit(&r)
			if _, err := provider.Issue(s, r); err == nil {
				t.Fatal("issued")
			}
		})
	}
}

func TestIssueCopiesMeasurements(t *testing.T) {
	ch := newChip(t, format.KEMMLKEM768X25519)
	s, _ := provider.GenerateKey(format.SigEd25519)
	r := request(ch, make([]byte, 32))
	c, err := provider.Issue(s, r)
	must(t, err)
	r.Measurements[0][0] ^= 1
	if c.Measurements[0][0] == r.Measurements[0][0] {
		t.Fatal("certificate shares the caller's measurement buffer")
	}
}

func TestResignWithAnotherProvider(t *testing.T) {
	ch := newChip(t, format.KEMMLKEM768X25519)
	a, _ := provider.GenerateKey(format.SigECDSAP384)
	b, _ := provider.GenerateKey(format.SigEd25519)
	c, err := provider.Issue(a, request(ch, make([]byte, 32)))
	must(t, err)
	c.NotAfter = c.NotAfter.Add(time.Hour)
	re, err := provider.Resign(b, c)
	must(t, err)
	pkixB, _ := x509.MarshalPKIXPublicKey(b.Public())
	pkixA, _ := x509.MarshalPKIXPublicKey(a.Public())
	if re.ProviderAlg != format.SigEd25519 || !bytes.Equal(re.ProviderKey, pkixB) || !re.NotAfter.Equal(c.NotAfter) {
		t.Fatalf("%+v", re)
	}
	must(t, psp.TrustStore{string(pkixB): b.Public()}.VerifySignature(re))
	if err := (psp.TrustStore{string(pkixA): a.Public()}).VerifySignature(re); !errors.Is(err, psp.ErrUnknownProvider) {
		t.Fatal(err)
	}
}
