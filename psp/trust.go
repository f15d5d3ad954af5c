package psp

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
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
