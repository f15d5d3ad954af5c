package psp

import (
	"crypto/hpke"
	"crypto/sha512"
	"errors"
	"fmt"
	"time"

	"github.com/sealdisk/sealdisk/format"
)

// Certificate checks (FORMAT.md §3.4 steps 2–6) and unwrapping the image key (step 8).

// Verdict is the outcome of certificate verification, for attestation.
type Verdict struct {
	Signature  string // "valid"
	CertDigest [48]byte
}

// VerifyCertificate runs FORMAT.md §3.4 steps 2–6 against this chip, in that order, and
// returns the first refusal. A nil h skips step 6 (inspecting a certificate without its
// image); UnsealImageKey and Launch always pass the image's header.
func (p *PSP) VerifyCertificate(c *format.Certificate, h *format.Header) (*Verdict, error) {
	if c == nil {
		return nil, errors.New("failed to verify certificate: no certificate")
	}
	p.mu.Lock()
	ts := TrustStore(p.trust)
	p.mu.Unlock()
	if err := ts.VerifySignature(c); err != nil {
		return nil, err
	}
	if c.ChipID != p.id {
		return nil, fmt.Errorf("%w: certificate is for chip %x…, this chip is %x…", ErrWrongChip, c.ChipID[:8], p.id[:8])
	}
	now := p.now()
	if now.Before(c.NotBefore) {
		return nil, fmt.Errorf("%w: valid from %s, now %s", ErrNotYetValid, c.NotBefore.Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	if !now.Before(c.NotAfter) {
		return nil, fmt.Errorf("%w: valid until %s, now %s", ErrExpired, c.NotAfter.Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	if h != nil {
		if err := c.CheckHeader(h); err != nil {
			return nil, err
		}
	}
	return &Verdict{Signature: "valid", CertDigest: sha512.Sum384(c.Bytes())}, nil
}

// KeyInfo is the HPKE info binding a sealed image key to an image and a chip (FORMAT §3.3).
func KeyInfo(uuid [16]byte, chipID [32]byte) []byte {
	info := []byte("sealdisk v1 image key")
	info = append(info, uuid[:]...)
	return append(info, chipID[:]...)
}

func (p *PSP) unseal(c *format.Certificate) ([]byte, error) {
	if c.Remote {
		return nil, fmt.Errorf("%w (broker %s, key %s): only a running PSP with a broker client fetches it (sealdisk serve)", ErrRemoteKey, c.BrokerURL, c.KeyID)
	}
	if c.KEM != p.kemID {
		return nil, fmt.Errorf("%w: sealed with KEM %s, chip has %s", ErrKeyUnseal, format.KEMName(c.KEM), format.KEMName(p.kemID))
	}
	kdf, err := hpke.NewKDF(c.KDF)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKeyUnseal, err)
	}
	aead, err := hpke.NewAEAD(c.AEAD)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKeyUnseal, err)
	}
	key, err := hpke.Open(p.kem, kdf, aead, KeyInfo(c.UUID, c.ChipID), c.SealedKey)
	if err != nil {
		return nil, fmt.Errorf("%w: HPKE open with this chip's key and image %s: %v", ErrKeyUnseal, formatUUID(c.UUID), err)
	}
	if len(key) != 32 {
		zero(key)
		return nil, fmt.Errorf("%w: unsealed key is %d bytes, want 32", ErrKeyUnseal, len(key))
	}
	return key, nil
}

// UnsealImageKey verifies the certificate (steps 2–6) and unwraps the image key (step 8), for
// offline tools. The caller zeroises the key.
func (p *PSP) UnsealImageKey(c *format.Certificate, h *format.Header) ([]byte, error) {
	if h == nil {
		return nil, errors.New("failed to unseal image key: no image header to bind the certificate to")
	}
	if _, err := p.VerifyCertificate(c, h); err != nil {
		return nil, err
	}
	return p.unseal(c)
}
