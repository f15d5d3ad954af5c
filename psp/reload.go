package psp

import (
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
)

// identityFiles are the chip's identity in its directory: read once, by Open. Replacing one
// while a PSP runs is a new chip (or a re-endorsed one), which takes a new Open.
var identityFiles = []string{KEMKeyFile, AttestKeyFile, ChipCrtFile, VendorCrtFile, RootKeyFile}

// identityDigests hashes the identity files as they are now.
func identityDigests(dir string) (map[string][32]byte, error) {
	out := make(map[string][32]byte, len(identityFiles))
	for _, name := range identityFiles {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("failed to read the chip identity: %w", err)
		}
		out[name] = sha256.Sum256(b)
		zero(b)
	}
	return out, nil
}

// Reload re-reads the parts of the PSP directory an operator changes while the PSP runs: the
// trust store (ReloadTrust), so a provider added is accepted and one removed is refused from
// the next launch on. The rest is not read again: the counters are the PSP's own, and the
// chip identity stays as Open loaded it — Reload returns the identity files that differ from
// what is loaded (they take effect at the next Open). A trust store that does not load
// changes nothing.
func (p *PSP) Reload() (changedIdentity []string, err error) {
	if err := p.ReloadTrust(); err != nil {
		return nil, fmt.Errorf("failed to reload the trust store of %s (trust unchanged): %w", p.dir, err)
	}
	now, err := identityDigests(p.dir)
	if err != nil {
		return nil, err
	}
	for _, name := range identityFiles {
		if now[name] != p.identity[name] {
			changedIdentity = append(changedIdentity, name)
		}
	}
	return changedIdentity, nil
}
