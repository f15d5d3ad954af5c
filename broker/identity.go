package broker

import (
	"crypto/hkdf"
	"crypto/hpke"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/sealdisk/sealdisk/psp"
)

// The identity directory (shared, copied, by every replica; mode 0700):
//
//	broker.key      the at-rest sealing key: HPKE ML-KEM-768+X25519 private key, PEM
//	                "SEALDISK BROKER KEY" (0600). Key files in the store are sealed to it.
//	broker.key.old  during and after a `broker rotate`, the previous one (0600)
//	nonce.key       32 random bytes (0600): HKDF derives the nonce MAC key and the audit MAC key.
const (
	brokerKeyFile = "broker.key"
	oldKeyFile    = "broker.key.old"
	newKeyFile    = "broker.key.new"
	secretFile    = "nonce.key"
	pemBrokerKey  = "SEALDISK BROKER KEY"
)

// InitIdentity creates an identity directory; it never overwrites one.
func InitIdentity(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("failed to create broker identity directory: %w", err)
	}
	for _, n := range []string{brokerKeyFile, secretFile} {
		if _, err := os.Lstat(filepath.Join(dir, n)); err == nil {
			return fmt.Errorf("refusing to overwrite %s", filepath.Join(dir, n))
		}
	}
	if err := writeKEMKey(filepath.Join(dir, brokerKeyFile)); err != nil {
		return err
	}
	secret := make([]byte, 32)
	rand.Read(secret)
	defer clear(secret)
	return psp.WritePrivateFile(filepath.Join(dir, secretFile), secret)
}

func writeKEMKey(path string) error {
	k, err := hpke.MLKEM768X25519().GenerateKey()
	if err != nil {
		return fmt.Errorf("failed to generate broker key: %w", err)
	}
	b, err := k.Bytes()
	if err != nil {
		return fmt.Errorf("failed to encode broker key: %w", err)
	}
	p := pem.EncodeToMemory(&pem.Block{Type: pemBrokerKey, Bytes: b})
	clear(b)
	defer clear(p)
	return psp.WritePrivateFile(path, p)
}

// identity is the loaded identity: the at-rest keys by fingerprint and the derived MAC keys.
type identity struct {
	dir      string
	nonceKey []byte
	auditKey []byte

	mu   sync.Mutex // guards keys
	keys map[string]hpke.PrivateKey
	cur  string // fingerprint of broker.key
}

func loadIdentity(dir string) (*identity, error) {
	secret, err := psp.ReadPrivateFile(filepath.Join(dir, secretFile))
	if err != nil {
		return nil, fmt.Errorf("failed to load broker identity %s: %w", dir, err)
	}
	defer clear(secret)
	if len(secret) != 32 {
		return nil, fmt.Errorf("failed to load broker identity: %s is %d bytes, want 32", secretFile, len(secret))
	}
	id := &identity{dir: dir}
	if id.nonceKey, err = hkdf.Key(sha256.New, secret, nil, "sealdisk broker v1 nonce MAC", 32); err != nil {
		return nil, err
	}
	if id.auditKey, err = hkdf.Key(sha256.New, secret, nil, "sealdisk broker v1 audit MAC", 32); err != nil {
		return nil, err
	}
	if err := id.reload(); err != nil {
		return nil, err
	}
	return id, nil
}

// reload re-reads the at-rest keys (a rotation by another process adds one).
func (id *identity) reload() error {
	keys := map[string]hpke.PrivateKey{}
	var cur string
	for _, n := range []string{brokerKeyFile, oldKeyFile, newKeyFile} {
		k, err := readKEMKey(filepath.Join(id.dir, n))
		if errors.Is(err, os.ErrNotExist) && n != brokerKeyFile {
			continue
		}
		if err != nil {
			return fmt.Errorf("failed to load broker identity %s: %w", id.dir, err)
		}
		fp := fingerprint(k.PublicKey())
		keys[fp] = k
		if n == brokerKeyFile {
			cur = fp
		}
	}
	id.mu.Lock()
	id.keys, id.cur = keys, cur
	id.mu.Unlock()
	return nil
}

func readKEMKey(path string) (hpke.PrivateKey, error) {
	b, err := psp.ReadPrivateFile(path)
	if err != nil {
		return nil, err
	}
	defer clear(b)
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != pemBrokerKey {
		return nil, fmt.Errorf("%s is not a %s", path, pemBrokerKey)
	}
	defer clear(blk.Bytes)
	k, err := hpke.MLKEM768X25519().NewPrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("failed to parse %s: %w", path, err)
	}
	return k, nil
}

func fingerprint(pub hpke.PublicKey) string {
	s := sha256.Sum256(pub.Bytes())
	return hex.EncodeToString(s[:16])
}

// key returns the at-rest key with fingerprint fp, re-reading the directory once if unknown.
func (id *identity) key(fp string) (hpke.PrivateKey, error) {
	id.mu.Lock()
	k := id.keys[fp]
	id.mu.Unlock()
	if k != nil {
		return k, nil
	}
	if err := id.reload(); err != nil {
		return nil, err
	}
	id.mu.Lock()
	defer id.mu.Unlock()
	if k = id.keys[fp]; k == nil {
		return nil, fmt.Errorf("no broker key with fingerprint %s in %s", fp, id.dir)
	}
	return k, nil
}

func (id *identity) current() hpke.PrivateKey {
	id.mu.Lock()
	defer id.mu.Unlock()
	return id.keys[id.cur]
}
