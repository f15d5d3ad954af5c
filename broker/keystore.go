package broker

import (
	"crypto/hpke"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/sealdisk/sealdisk/psp"
)

// The key store: STORE/keys/<hex SHA-256(key id)[:16]>.json, mode 0600, one per key id:
//
//	{"key_id": "...", "created": RFC 3339, "revoked": RFC 3339 or absent,
//	 "sealed_to": fingerprint of the broker key, "sealed": base64 HPKE enc||ct}
//
// The 32-byte key is sealed with HPKE (ML-KEM-768+X25519, HKDF-SHA384, AES-256-GCM) to the
// broker's at-rest key with info "sealdisk broker v1 key at rest" || key id, so a key file
// copied to another id does not open. Files are replaced by rename, so every replica reads
// either the old or the new one.

// Key-store refusals.
var (
	ErrUnknownKey = errors.New("unknown key id")
	ErrRevoked    = errors.New("key revoked")
	ErrKeyExists  = errors.New("key id already in the store")
)

type keyFile struct {
	KeyID    string `json:"key_id"`
	Created  string `json:"created"`
	Revoked  string `json:"revoked,omitempty"`
	SealedTo string `json:"sealed_to"`
	Sealed   []byte `json:"sealed"`
}

// KeyInfo is what list shows; never the key.
type KeyInfo struct {
	KeyID, Created, Revoked, SealedTo string
}

// Store is a key store directory with the identity that seals its keys.
type Store struct {
	dir string
	id  *identity
}

// OpenStore opens (creating) a store directory.
func OpenStore(dir, identityDir string) (*Store, error) {
	id, err := loadIdentity(identityDir)
	if err != nil {
		return nil, err
	}
	for _, d := range []string{dir, filepath.Join(dir, "keys"), filepath.Join(dir, "replay")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("failed to create key store: %w", err)
		}
	}
	return &Store{dir: dir, id: id}, nil
}

func atRestInfo(keyID string) []byte {
	return append([]byte("sealdisk broker v1 key at rest"), keyID...)
}

func (s *Store) path(keyID string) string {
	sum := sha256.Sum256([]byte(keyID))
	return filepath.Join(s.dir, "keys", hex.EncodeToString(sum[:16])+".json")
}

// Put stores a new 32-byte key under keyID; an existing id (even revoked) is refused.
func (s *Store) Put(keyID string, key []byte) error {
	if len(key) != 32 {
		return fmt.Errorf("failed to store key %q: it is %d bytes, want 32", keyID, len(key))
	}
	if keyID == "" || len(keyID) > 256 {
		return fmt.Errorf("failed to store key: key id must be 1..256 printable ASCII characters")
	}
	for i := 0; i < len(keyID); i++ {
		if keyID[i] < 0x20 || keyID[i] > 0x7e {
			return fmt.Errorf("failed to store key: key id must be printable ASCII")
		}
	}
	if _, err := os.Lstat(s.path(keyID)); err == nil {
		return fmt.Errorf("failed to store key %q: %w (a revoked id stays revoked; use a new one)", keyID, ErrKeyExists)
	}
	kf := &keyFile{KeyID: keyID, Created: time.Now().UTC().Format(time.RFC3339)}
	if err := s.seal(kf, key); err != nil {
		return err
	}
	return s.write(kf, true)
}

func (s *Store) seal(kf *keyFile, key []byte) error {
	k := s.id.current()
	sealed, err := hpke.Seal(k.PublicKey(), hpke.HKDFSHA384(), hpke.AES256GCM(), atRestInfo(kf.KeyID), key)
	if err != nil {
		return fmt.Errorf("failed to seal key %q at rest: %w", kf.KeyID, err)
	}
	kf.Sealed, kf.SealedTo = sealed, fingerprint(k.PublicKey())
	return nil
}

// write replaces (or, with excl, creates) a key file atomically with mode 0600.
func (s *Store) write(kf *keyFile, excl bool) error {
	b, err := json.MarshalIndent(kf, "", "  ")
	if err != nil {
		return fmt.Errorf("failed to encode key file: %w", err)
	}
	dst := s.path(kf.KeyID)
	tmp := dst + ".tmp"
	os.Remove(tmp)
	if err := psp.WritePrivateFile(tmp, b); err != nil {
		return err
	}
	if excl {
		// link fails if another put won the race; rename would silently replace its key.
		err = os.Link(tmp, dst)
		os.Remove(tmp)
		if err != nil {
			return fmt.Errorf("failed to store key %q: %w", kf.KeyID, ErrKeyExists)
		}
		return nil
	}
	if err := os.Rename(tmp, dst); err != nil {
		return fmt.Errorf("failed to replace %s: %w", dst, err)
	}
	return nil
}

func (s *Store) read(keyID string) (*keyFile, error) {
	b, err := psp.ReadPrivateFile(s.path(keyID))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w %q", ErrUnknownKey, keyID)
	}
	if err != nil {
		return nil, err
	}
	var kf keyFile
	if err := json.Unmarshal(b, &kf); err != nil || kf.KeyID != keyID {
		return nil, fmt.Errorf("key file %s is corrupt or not for %q", s.path(keyID), keyID)
	}
	return &kf, nil
}

// Key returns a copy of keyID's key (the caller zeroises it): ErrUnknownKey, ErrRevoked.
func (s *Store) Key(keyID string) ([]byte, error) {
	kf, err := s.read(keyID)
	if err != nil {
		return nil, err
	}
	if kf.Revoked != "" {
		return nil, fmt.Errorf("%w: %q at %s", ErrRevoked, keyID, kf.Revoked)
	}
	return s.open(kf)
}

func (s *Store) open(kf *keyFile) ([]byte, error) {
	k, err := s.id.key(kf.SealedTo)
	if err != nil {
		return nil, fmt.Errorf("failed to open key %q: %w", kf.KeyID, err)
	}
	key, err := hpke.Open(k, hpke.HKDFSHA384(), hpke.AES256GCM(), atRestInfo(kf.KeyID), kf.Sealed)
	if err != nil {
		return nil, fmt.Errorf("failed to open key %q at rest: %w", kf.KeyID, err)
	}
	return key, nil
}

// Revoke marks keyID revoked; every replica refuses it from its next release on.
func (s *Store) Revoke(keyID string) error {
	kf, err := s.read(keyID)
	if err != nil {
		return err
	}
	if kf.Revoked != "" {
		return nil
	}
	kf.Revoked = time.Now().UTC().Format(time.RFC3339)
	return s.write(kf, false)
}

// List describes every key in the store, sorted by id.
func (s *Store) List() ([]KeyInfo, error) {
	files, err := filepath.Glob(filepath.Join(s.dir, "keys", "*.json"))
	if err != nil {
		return nil, err
	}
	var out []KeyInfo
	for _, f := range files {
		b, err := psp.ReadPrivateFile(f)
		if err != nil {
			return nil, err
		}
		var kf keyFile
		if err := json.Unmarshal(b, &kf); err != nil {
			return nil, fmt.Errorf("key file %s is corrupt: %w", f, err)
		}
		out = append(out, KeyInfo{KeyID: kf.KeyID, Created: kf.Created, Revoked: kf.Revoked, SealedTo: kf.SealedTo})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].KeyID < out[j].KeyID })
	return out, nil
}

// Rotate replaces the broker's at-rest key: a new key is made, every key file is sealed to it
// (each replaced atomically), then it becomes broker.key and the previous one broker.key.old,
// which a later rotate replaces. A rotation interrupted half way leaves files sealed to
// either key, and both are in the identity directory; running it again finishes it. Returns
// how many keys were resealed.
func (s *Store) Rotate() (int, error) {
	dir := s.id.dir
	newPath := filepath.Join(dir, newKeyFile)
	if _, err := os.Stat(newPath); errors.Is(err, os.ErrNotExist) {
		if err := writeKEMKey(newPath); err != nil {
			return 0, err
		}
	}
	nk, err := readKEMKey(newPath)
	if err != nil {
		return 0, err
	}
	if err := s.id.reload(); err != nil {
		return 0, err
	}
	list, err := s.List()
	if err != nil {
		return 0, err
	}
	fp := fingerprint(nk.PublicKey())
	n := 0
	for _, ki := range list {
		kf, err := s.read(ki.KeyID)
		if err != nil {
			return n, err
		}
		if kf.SealedTo == fp {
			continue
		}
		key, err := s.open(kf)
		if err != nil {
			return n, err
		}
		sealed, err := hpke.Seal(nk.PublicKey(), hpke.HKDFSHA384(), hpke.AES256GCM(), atRestInfo(kf.KeyID), key)
		clear(key)
		if err != nil {
			return n, fmt.Errorf("failed to reseal key %q: %w", kf.KeyID, err)
		}
		kf.Sealed, kf.SealedTo = sealed, fp
		if err := s.write(kf, false); err != nil {
			return n, err
		}
		n++
	}
	cur := filepath.Join(dir, brokerKeyFile)
	if err := os.Rename(cur, filepath.Join(dir, oldKeyFile)); err != nil {
		return n, fmt.Errorf("failed to retire the old broker key: %w", err)
	}
	if err := os.Rename(newPath, cur); err != nil {
		return n, fmt.Errorf("failed to install the new broker key: %w", err)
	}
	return n, s.id.reload()
}
