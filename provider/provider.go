// Package provider is the image owner's side: provider signing keys and issuing image
// certificates that seal an image key to one vendor-endorsed chip (FORMAT.md §3).
package provider

import (
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
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/psp"
)

// GenerateKey makes a provider signing key.
func GenerateKey(alg format.SigAlg) (crypto.Signer, error) {
	switch alg {
	case format.SigECDSAP384:
		return ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case format.SigEd25519:
		_, k, err := ed25519.GenerateKey(rand.Reader)
		return k, err
	}
	return nil, fmt.Errorf("failed to generate provider key: unknown algorithm %d", uint16(alg))
}

// SaveKeyPair writes DIR/NAME.key (PKCS#8, 0600) and DIR/NAME.pub (PKIX PEM).
func SaveKeyPair(dir, name string, s crypto.Signer) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("failed to create provider directory: %w", err)
	}
	der, err := x509.MarshalPKIXPublicKey(s.Public())
	if err != nil {
		return fmt.Errorf("failed to encode provider public key: %w", err)
	}
	if err := psp.WritePrivatePEM(filepath.Join(dir, name+".key"), s); err != nil {
		return err
	}
	pub := filepath.Join(dir, name+".pub")
	if err := os.WriteFile(pub, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o644); err != nil {
		return fmt.Errorf("failed to write %s: %w", pub, err)
	}
	return nil
}

// LoadSigner reads a provider private key (mode 0600).
func LoadSigner(path string) (crypto.Signer, error) { return psp.LoadSigner(path) }

// SigAlgOf says which certificate signature algorithm a key uses.
func SigAlgOf(s crypto.Signer) (format.SigAlg, error) {
	switch k := s.Public().(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P384() {
			return 0, errors.New("provider ECDSA key must be on P-384")
		}
		return format.SigECDSAP384, nil
	case ed25519.PublicKey:
		return format.SigEd25519, nil
	}
	return 0, fmt.Errorf("unsupported provider key type %T", s.Public())
}

// IssueRequest describes a certificate to issue.
type IssueRequest struct {
	Chip         *psp.ChipCert
	UUID         [16]byte
	VirtualSize  uint64
	SectorSize   uint32
	Suite        format.Suite
	MeasureAlg   format.MeasureAlg
	Measurements [][]byte
	NotBefore    time.Time
	NotAfter     time.Time
	ReadOnly     bool
	ImageKey     []byte // sealed to the chip unless BrokerURL is set
	BrokerURL    string // remote key reference: the broker releases the key to the chip
	KeyID        string
}

// Issue seals the image key to the chip (FORMAT.md §3.3) and signs the certificate.
func Issue(signer crypto.Signer, req IssueRequest) (*format.Certificate, error) {
	alg, err := SigAlgOf(signer)
	if err != nil {
		return nil, err
	}
	pkix, err := x509.MarshalPKIXPublicKey(signer.Public())
	if err != nil {
		return nil, fmt.Errorf("failed to encode provider key: %w", err)
	}
	c := &format.Certificate{
		ReadOnly: req.ReadOnly, UUID: req.UUID, VirtualSize: req.VirtualSize,
		SectorSize: req.SectorSize, Suite: req.Suite, MeasureAlg: req.MeasureAlg,
		NotBefore: req.NotBefore.UTC().Truncate(time.Second), NotAfter: req.NotAfter.UTC().Truncate(time.Second),
		ChipID: req.Chip.ID, KEM: req.Chip.KEMID, KDF: format.KDFHKDFSHA384, AEAD: format.AEADAES256GCM,
		ProviderAlg: alg, ProviderKey: pkix, Measurements: req.Measurements,
	}
	if req.BrokerURL != "" {
		c.Remote, c.BrokerURL, c.KeyID = true, req.BrokerURL, req.KeyID
	} else {
		if len(req.ImageKey) != 32 {
			return nil, fmt.Errorf("failed to issue certificate: image key is %d bytes, want 32", len(req.ImageKey))
		}
		sealed, err := hpke.Seal(req.Chip.PublicKey, hpke.HKDFSHA384(), hpke.AES256GCM(), psp.KeyInfo(req.UUID, req.Chip.ID), req.ImageKey)
		if err != nil {
			return nil, fmt.Errorf("failed to seal image key to chip: %w", err)
		}
		c.SealedKey = sealed
	}
	body, err := c.MarshalBody()
	if err != nil {
		return nil, fmt.Errorf("failed to issue certificate: %w", err)
	}
	if err := sign(signer, c, body); err != nil {
		return nil, err
	}
	return c, nil
}

// Resign signs c's current fields again (after MarshalBody), e.g. after editing a field.
func Resign(signer crypto.Signer, c *format.Certificate) (*format.Certificate, error) {
	body, err := c.MarshalBody()
	if err != nil {
		return nil, err
	}
	if err := sign(signer, c, body); err != nil {
		return nil, err
	}
	return format.ParseCertificate(c.Bytes())
}

func sign(signer crypto.Signer, c *format.Certificate, body []byte) error {
	var err error
	switch c.ProviderAlg {
	case format.SigECDSAP384:
		h := sha512.Sum384(body)
		c.Signature, err = signer.Sign(rand.Reader, h[:], crypto.SHA384)
	case format.SigEd25519:
		c.Signature, err = signer.Sign(rand.Reader, body, crypto.Hash(0))
	default:
		err = fmt.Errorf("unknown provider algorithm %d", uint16(c.ProviderAlg))
	}
	if err != nil {
		return fmt.Errorf("failed to sign certificate: %w", err)
	}
	return nil
}
