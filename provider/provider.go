// Package provider is the image owner's side: provider signing keys and issuing image
// certificates that seal an image key to one vendor-endorsed chip (FORMAT.md §3).
package provider

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
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/sector"
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

// LoadSigner reads a provider private key (PKCS#8 PEM, mode 0600) that can sign
// certificates (ECDSA P-384 or Ed25519).
func LoadSigner(path string) (crypto.Signer, error) {
	s, err := psp.LoadSigner(path)
	if err != nil {
		return nil, err
	}
	if _, err := SigAlgOf(s); err != nil {
		return nil, fmt.Errorf("failed to load %s: %w", path, err)
	}
	return s, nil
}

// LoadPublicKey reads a provider public key (PKIX PEM), as a PSP's trust store does.
func LoadPublicKey(path string) (crypto.PublicKey, error) { return psp.ReadProviderKey(path) }

// SigAlgOf says which certificate signature algorithm a key uses.
func SigAlgOf(s crypto.Signer) (format.SigAlg, error) { return psp.ProviderAlgOf(s.Public()) }

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
	ImageKey     []byte // 32 bytes, sealed to the chip; must be empty when BrokerURL is set
	BrokerURL    string // remote key reference: the broker releases the key to the chip
	KeyID        string
}

// Issue seals the image key to the chip (FORMAT.md §3.3) and signs the certificate's body
// (§3.2). The caller has checked req.Chip's chain to its vendor root (ChipCert.VerifyChain);
// Issue checks that the chip certificate's parts agree, so a key is never sealed to a public
// key other than the one the chip id names.
func Issue(signer crypto.Signer, req IssueRequest) (*format.Certificate, error) {
	alg, err := SigAlgOf(signer)
	if err != nil {
		return nil, fmt.Errorf("failed to issue certificate: %w", err)
	}
	if err := checkChip(req.Chip); err != nil {
		return nil, fmt.Errorf("failed to issue certificate: %w", err)
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
		ProviderAlg: alg, ProviderKey: pkix, Measurements: cloneAll(req.Measurements),
	}
	if req.BrokerURL != "" {
		// A caller passing both might believe the key travels in the certificate.
		if len(req.ImageKey) != 0 {
			return nil, errors.New("failed to issue certificate: an image key and a broker URL are exclusive (the broker holds a remote key)")
		}
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

func checkChip(c *psp.ChipCert) error {
	if c == nil || c.PublicKey == nil {
		return errors.New("no chip certificate")
	}
	if c.PublicKey.KEM().ID() != c.KEMID {
		return fmt.Errorf("chip KEM id 0x%04x does not match its public key's 0x%04x", c.KEMID, c.PublicKey.KEM().ID())
	}
	if psp.ChipIDOf(c.PublicKey) != c.ID {
		return fmt.Errorf("chip id %x… is not the SHA-256 of the chip's HPKE public key", c.ID[:8])
	}
	return nil
}

func cloneAll(bs [][]byte) [][]byte {
	out := make([][]byte, len(bs))
	for i, b := range bs {
		out[i] = bytes.Clone(b)
	}
	return out
}

// Resign re-encodes c's current fields, names signer's key in provider_alg/provider_key and
// signs again, e.g. after editing a field or to move a certificate to another provider key.
// c is updated in place; the result is c's bytes parsed back.
func Resign(signer crypto.Signer, c *format.Certificate) (*format.Certificate, error) {
	alg, err := SigAlgOf(signer)
	if err != nil {
		return nil, fmt.Errorf("failed to re-sign certificate: %w", err)
	}
	pkix, err := x509.MarshalPKIXPublicKey(signer.Public())
	if err != nil {
		return nil, fmt.Errorf("failed to encode provider key: %w", err)
	}
	c.ProviderAlg, c.ProviderKey = alg, pkix
	body, err := c.MarshalBody()
	if err != nil {
		return nil, fmt.Errorf("failed to re-sign certificate: %w", err)
	}
	if err := sign(signer, c, body); err != nil {
		return nil, err
	}
	// Re-parse so the caller holds exactly what a reader of the stored bytes will see.
	return format.ParseCertificate(c.Bytes())
}

func sign(signer crypto.Signer, c *format.Certificate, body []byte) error {
	sig, err := signBytes(signer, c.ProviderAlg, body)
	if err != nil {
		return fmt.Errorf("failed to sign certificate: %w", err)
	}
	c.Signature = sig
	return nil
}

// SignRoot signs a root record's body (format.RootRecord.MarshalBody, Auth RootByProvider) the
// way certificates are signed: the record a new or resealed image starts from, which the PSP
// checks against the provider key of the image's certificate.
func SignRoot(signer crypto.Signer, body []byte) ([]byte, error) {
	alg, err := SigAlgOf(signer)
	if err != nil {
		return nil, fmt.Errorf("failed to sign root record: %w", err)
	}
	sig, err := signBytes(signer, alg, body)
	if err != nil {
		return nil, fmt.Errorf("failed to sign root record: %w", err)
	}
	return sig, nil
}

func signBytes(signer crypto.Signer, alg format.SigAlg, body []byte) ([]byte, error) {
	switch alg {
	case format.SigECDSAP384:
		h := sha512.Sum384(body)
		return signer.Sign(rand.Reader, h[:], crypto.SHA384)
	case format.SigEd25519:
		return signer.Sign(rand.Reader, body, crypto.Hash(0))
	}
	return nil, fmt.Errorf("unknown provider algorithm %d", uint16(alg))
}

// FirstRoot is the root record slot a provider writes into a new version-2 image (FORMAT.md
// §8): seq 1, counter 0, the empty epoch 0, and root, the integrity tree's root over what it
// wrote (zero for a blank image), signed like its certificate.
func FirstRoot(signer crypto.Signer, h *format.Header, root [32]byte) ([]byte, error) {
	rec := sector.FirstRoot(h, root)
	rec.Auth = format.RootByProvider
	body := rec.MarshalBody()
	sig, err := SignRoot(signer, body)
	if err != nil {
		return nil, err
	}
	return format.MarshalRootSlot(body, sig), nil
}
