package psp

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/sealdisk/sealdisk/format"
)

// ErrNotTrusted: no trusted provider key of that name (trust remove).
var ErrNotTrusted = errors.New("no such trusted provider key")

// TrustedKey is one provider key in a PSP directory's trust store.
type TrustedKey struct {
	Name   string // file name in DIR/trust, e.g. 1a2b3c4d5e6f7081.pub
	Alg    string // the certificate signature algorithm it verifies (format.SigAlg)
	SHA256 string // hex SHA-256 of the key's PKIX DER, as inspect prints provider_key_sha256
}

// TrustedProviders lists the trust store of the PSP directory dir, by file name. An unusable
// file fails the listing naming it, as it would fail Open and ReloadTrust.
func TrustedProviders(dir string) ([]TrustedKey, error) {
	files, err := filepath.Glob(filepath.Join(dir, TrustDir, "*.pub"))
	if err != nil {
		return nil, fmt.Errorf("failed to list trust store: %w", err)
	}
	if _, err := os.Stat(dir); err != nil {
		return nil, fmt.Errorf("failed to list trust store: %w", err)
	}
	slices.Sort(files)
	out := make([]TrustedKey, 0, len(files))
	for _, f := range files {
		der, pub, err := readPublicKey(f)
		if err != nil {
			return nil, err
		}
		alg, _ := ProviderAlgOf(pub) // readPublicKey refused the others
		sum := sha256.Sum256(der)
		out = append(out, TrustedKey{Name: filepath.Base(f), Alg: alg.String(), SHA256: hex.EncodeToString(sum[:])})
	}
	return out, nil
}

// RemoveTrustedProvider deletes the provider key called name (as TrustedProviders lists it;
// the .pub may be left off) from dir/trust. Certificates that provider signed are refused by
// the next Open or ReloadTrust; VMs attached with them keep running until detached.
func RemoveTrustedProvider(dir, name string) error {
	if name == "" || strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
		return fmt.Errorf("failed to remove trusted provider: %q is not a file name in %s", name, filepath.Join(dir, TrustDir))
	}
	if !strings.HasSuffix(name, ".pub") {
		name += ".pub"
	}
	p := filepath.Join(dir, TrustDir, name)
	if _, err := os.Lstat(p); errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("failed to remove trusted provider %s: %w in %s (sealdisk psp trust list shows the names)", name, ErrNotTrusted, filepath.Join(dir, TrustDir))
	} else if err != nil {
		return fmt.Errorf("failed to remove trusted provider %s: %w", name, err)
	}
	if err := os.Remove(p); err != nil {
		return fmt.Errorf("failed to remove trusted provider %s: %w", name, err)
	}
	return syncDir(filepath.Join(dir, TrustDir))
}

// Trusts reports whether the trust store as last loaded holds the provider key der (PKIX).
func (p *PSP) Trusts(der []byte) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, ok := p.trust[string(der)]
	return ok
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("failed to sync %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("failed to sync %s: %w", dir, err)
	}
	return nil
}

// ReloadTrust re-reads trust/*.pub.
func (p *PSP) ReloadTrust() error {
	files, err := filepath.Glob(filepath.Join(p.dir, TrustDir, "*.pub"))
	if err != nil {
		return fmt.Errorf("failed to list trust store: %w", err)
	}
	trust := make(map[string]crypto.PublicKey)
	for _, f := range files {
		der, pub, err := readPublicKey(f)
		if err != nil {
			return err
		}
		trust[string(der)] = pub
	}
	p.mu.Lock()
	p.trust = trust
	p.mu.Unlock()
	return nil
}

// ProviderAlgOf says which certificate signature algorithm a provider public key signs with
// (FORMAT.md §3.2); other key types and curves cannot sign certificates.
func ProviderAlgOf(pub crypto.PublicKey) (format.SigAlg, error) {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P384() {
			return 0, fmt.Errorf("provider ECDSA key is on %s, want P-384", k.Curve.Params().Name)
		}
		return format.SigECDSAP384, nil
	case ed25519.PublicKey:
		return format.SigEd25519, nil
	}
	return 0, fmt.Errorf("unsupported provider key type %T (want ECDSA P-384 or Ed25519)", pub)
}

// ReadProviderKey reads a provider public key (PKIX PEM, "PUBLIC KEY").
func ReadProviderKey(path string) (crypto.PublicKey, error) {
	_, pub, err := readPublicKey(path)
	return pub, err
}

func readPublicKey(path string) ([]byte, crypto.PublicKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("failed to read public key: %w", err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PUBLIC KEY" {
		return nil, nil, fmt.Errorf("failed to read %s: not a PEM public key", path)
	}
	pub, err := x509.ParsePKIXPublicKey(blk.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("failed to parse %s: %w", path, err)
	}
	if _, err := ProviderAlgOf(pub); err != nil {
		return nil, nil, fmt.Errorf("failed to read %s: %w", path, err)
	}
	return blk.Bytes, pub, nil
}

// AddTrustedProvider copies a provider's PEM public key into dir/trust (for `sealdisk psp
// trust add`). The file is named after the key's digest, so adding a key twice is a no-op.
// A running PSP sees it after ReloadTrust.
func AddTrustedProvider(dir, pubPath string) error {
	der, _, err := readPublicKey(pubPath)
	if err != nil {
		return err
	}
	sum := sha256.Sum256(der)
	dst := filepath.Join(dir, TrustDir, hex.EncodeToString(sum[:8])+".pub")
	if err := os.MkdirAll(filepath.Join(dir, TrustDir), 0o700); err != nil {
		return fmt.Errorf("failed to create trust store: %w", err)
	}
	if _, err := os.Stat(dst); err == nil {
		return nil
	}
	return writeFile(dst, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o644)
}

// TrustStore is a set of provider keys, usable without a chip (inspect).
type TrustStore map[string]crypto.PublicKey

// LoadTrustStore reads *.pub from a directory, or one .pub file.
func LoadTrustStore(path string) (TrustStore, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("failed to open trust store: %w", err)
	}
	files := []string{path}
	if fi.IsDir() {
		if files, err = filepath.Glob(filepath.Join(path, "*.pub")); err != nil {
			return nil, fmt.Errorf("failed to list trust store: %w", err)
		}
	}
	ts := TrustStore{}
	for _, f := range files {
		der, pub, err := readPublicKey(f)
		if err != nil {
			return nil, err
		}
		ts[string(der)] = pub
	}
	return ts, nil
}

// VerifySignature checks a certificate's provider signature against the trust store
// (FORMAT.md §3.4 steps 2–3).
func (ts TrustStore) VerifySignature(c *format.Certificate) error {
	if c.Body == nil {
		panic("BUG: psp: VerifySignature on a certificate without Body (neither parsed nor marshalled)")
	}
	pub, ok := ts[string(c.ProviderKey)]
	if !ok {
		sum := sha256.Sum256(c.ProviderKey)
		return fmt.Errorf("%w: provider key %x… is not in the trust store", ErrUnknownProvider, sum[:8])
	}
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if c.ProviderAlg != format.SigECDSAP384 {
			return fmt.Errorf("%w: certificate says %s but the trusted key is ECDSA", ErrBadSignature, c.ProviderAlg)
		}
		h := sha512.Sum384(c.Body)
		if !ecdsa.VerifyASN1(k, h[:], c.Signature) {
			return fmt.Errorf("%w: ECDSA P-384 signature does not verify over the certificate body", ErrBadSignature)
		}
	case ed25519.PublicKey:
		if c.ProviderAlg != format.SigEd25519 {
			return fmt.Errorf("%w: certificate says %s but the trusted key is Ed25519", ErrBadSignature, c.ProviderAlg)
		}
		if !ed25519.Verify(k, c.Body, c.Signature) {
			return fmt.Errorf("%w: Ed25519 signature does not verify over the certificate body", ErrBadSignature)
		}
	default:
		return fmt.Errorf("%w: unsupported provider key type %T", ErrBadSignature, pub)
	}
	return nil
}
