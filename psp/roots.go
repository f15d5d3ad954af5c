package psp

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/sealdisk/sealdisk/format"
)

// Freshness (FORMAT.md §8): a version-2 image's committed state is a root record that the PSP
// authenticates with a key that never leaves it, and whose counter it keeps, per image, in its
// directory. A record behind the PSP's counter is an image rolled back to an older copy.

const (
	// RootKeyFile holds the secret the PSP derives each image's root MAC key from (0600).
	RootKeyFile = "root.key"
	// CounterDir holds one counter file per image (by UUID), each 0600.
	CounterDir = "counters"

	rootMACLabel = "sealdisk v2 root mac"
)

var (
	// ErrRolledBack: the image's committed root record is older than the PSP's counter.
	ErrRolledBack = errors.New("image rolled back")
	// ErrRootAuth: a root record's MAC or signature does not verify.
	ErrRootAuth = errors.New("root record does not authenticate")
)

// RootKeeper authenticates one image's root records and keeps its rollback counter. The PSP
// gives one to the engine in the Binding of every launch; the key behind it stays in the PSP.
type RootKeeper interface {
	// SealRoot is the PSP's authenticator for a record body (format.RootByPSP).
	SealRoot(body []byte) []byte
	// CheckRoot verifies a record's authenticator: the PSP's MAC, or the signature of the
	// image's provider (format.RootByProvider, a new or resealed image).
	CheckRoot(rec *format.RootRecord, body, auth []byte) error
	// Admit accepts rec as the image's current state unless its counter is behind the one the
	// PSP keeps (ErrRolledBack, naming both); a counter ahead of it is recorded.
	Admit(rec *format.RootRecord) error
	// Advance makes counter (with the root it commits) the image's counter, durably, before it
	// returns: a flush is acknowledged only after it.
	Advance(counter uint64, root [32]byte) error
}

// loadRootKey reads the root key, creating it (32 random bytes, 0600) in a PSP directory made
// before images had root records.
func loadRootKey(dir string) ([]byte, error) {
	path := filepath.Join(dir, RootKeyFile)
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		k := make([]byte, 32)
		rand.Read(k)
		err := writeFile(path, k, 0o600)
		zero(k)
		if err != nil && !errors.Is(err, os.ErrExist) {
			return nil, err
		}
	}
	k, err := ReadPrivateFile(path)
	if err != nil {
		return nil, err
	}
	if len(k) != 32 {
		zero(k)
		return nil, fmt.Errorf("failed to read %s: %d bytes, want 32", path, len(k))
	}
	return k, nil
}

// imageRoots is the RootKeeper of one launched image.
type imageRoots struct {
	p        *PSP
	uuid     [16]byte
	provider crypto.PublicKey // the trusted key that signed the image's certificate
	mac      []byte           // HKDF(root key, label || uuid)
}

var _ RootKeeper = (*imageRoots)(nil)

func (p *PSP) rootsFor(c *format.Certificate) (*imageRoots, error) {
	p.mu.Lock()
	pub := p.trust[string(c.ProviderKey)]
	p.mu.Unlock()
	if pub == nil {
		return nil, fmt.Errorf("%w: the provider left the trust store", ErrUnknownProvider)
	}
	mac, err := hkdf.Key(sha256.New, p.rootKey, nil, rootMACLabel+string(c.UUID[:]), 32)
	if err != nil {
		return nil, fmt.Errorf("failed to derive the root key: %w", err)
	}
	return &imageRoots{p: p, uuid: c.UUID, provider: pub, mac: mac}, nil
}

func (r *imageRoots) SealRoot(body []byte) []byte {
	m := hmac.New(sha256.New, r.mac)
	m.Write(body)
	return m.Sum(nil)
}

func (r *imageRoots) CheckRoot(rec *format.RootRecord, body, auth []byte) error {
	if rec.UUID != r.uuid {
		return fmt.Errorf("%w: record of image %x, not %x", ErrRootAuth, rec.UUID, r.uuid)
	}
	switch rec.Auth {
	case format.RootByPSP:
		if !hmac.Equal(r.SealRoot(body), auth) {
			return fmt.Errorf("%w: the MAC is not this chip's", ErrRootAuth)
		}
		return nil
	case format.RootByProvider:
		return verifyProviderSig(r.provider, body, auth)
	}
	return fmt.Errorf("%w: unknown kind %d", ErrRootAuth, rec.Auth)
}

func verifyProviderSig(pub crypto.PublicKey, body, sig []byte) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		h := sha512.Sum384(body)
		if ecdsa.VerifyASN1(k, h[:], sig) {
			return nil
		}
	case ed25519.PublicKey:
		if ed25519.Verify(k, body, sig) {
			return nil
		}
	}
	return fmt.Errorf("%w: the provider's signature does not verify", ErrRootAuth)
}

func (r *imageRoots) Admit(rec *format.RootRecord) error {
	have, known, err := r.p.counters.read(r.uuid)
	if err != nil {
		return err
	}
	if known && rec.Counter < have.counter {
		return fmt.Errorf("%w: counter %d, expected %d", ErrRolledBack, rec.Counter, have.counter)
	}
	if !known || rec.Counter > have.counter {
		return r.Advance(rec.Counter, rec.Root)
	}
	r.p.noteRoot(r.uuid, rec.Counter, rec.Root)
	return nil
}

func (r *imageRoots) Advance(counter uint64, root [32]byte) error {
	if err := r.p.counters.write(r.uuid, counter, root); err != nil {
		return err
	}
	r.p.noteRoot(r.uuid, counter, root)
	return nil
}

// imageState is the latest counter and root the PSP holds of an image, for attestation.
type imageState struct {
	counter uint64
	root    [32]byte
}

func (p *PSP) noteRoot(uuid [16]byte, counter uint64, root [32]byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.images == nil {
		p.images = map[[16]byte]imageState{}
	}
	p.images[uuid] = imageState{counter: counter, root: root}
}

// ImageState is the counter and root the PSP last recorded for an image (ok false: none yet).
func (p *PSP) ImageState(uuid [16]byte) (counter uint64, root [32]byte, ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	s, ok := p.images[uuid]
	return s.counter, s.root, ok
}

// ImageCounter is the counter the PSP keeps for an image on disk (ok false: it has none).
func (p *PSP) ImageCounter(uuid [16]byte) (counter uint64, ok bool, err error) {
	s, ok, err := p.counters.read(uuid)
	return s.counter, ok, err
}

// RootsFor is the RootKeeper of the image c certifies, for the offline tools and tests that
// read or write a version-2 image without launching it: the caller has checked the
// certificate (VerifyCertificate); the provider must still be trusted.
func (p *PSP) RootsFor(c *format.Certificate) (RootKeeper, error) { return p.rootsFor(c) }
