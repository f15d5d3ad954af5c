// Package sector is the crypto coprocessor's core: per-sector authenticated encryption,
// metadata entries and journal records of docs/FORMAT.md §4–§6. The engine and the offline
// tools drive it; it imports no frontend and does no I/O.
//
// Key schedule (FORMAT.md §4.2): every writing session draws a random 16-byte salt S and
// derives Ks = HKDF-SHA256(K, S, "sealdisk v1 sector key" || suite || uuid); nonces are a
// 64-bit per-session counter. A nonce repeats under a key only if two sessions draw one salt.
package sector

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/emmansun/gmsm/sm4"
	"github.com/klauspost/cpuid/v2"
	"golang.org/x/crypto/chacha20poly1305"

	"github.com/sealdisk/sealdisk/format"
)

const (
	TagSize   = 16
	SaltSize  = 16
	EntrySize = format.MetaEntrySize
	KeySize   = 32 // the image key K
	nonceSize = 12
	aadSize   = 24

	// sessionCacheSize bounds the derived session AEADs kept for reading old sectors.
	sessionCacheSize = 64

	sectorLabel  = "sealdisk v1 sector key"
	journalLabel = "sealdisk v1 journal mac"
)

// Entry is one sector's metadata entry: salt(16) || counter(8) || tag(16) || reserved(24).
// All zero means never written.
type Entry [EntrySize]byte

// IsZero reports a never-written (or trimmed) sector.
func (e *Entry) IsZero() bool { return *e == Entry{} }

// Salt is the session salt that encrypted the sector.
func (e *Entry) Salt() (s [SaltSize]byte) { copy(s[:], e[:16]); return s }

// Counter is the nonce counter of the sector's last write.
func (e *Entry) Counter() uint64 { return binary.BigEndian.Uint64(e[16:24]) }

// ErrAuth is wrapped by every sector authentication failure.
var ErrAuth = errors.New("sector authentication failed")

// AuthError names the sector that failed authentication.
type AuthError struct {
	LBA    uint64
	Reason string
}

func (e *AuthError) Error() string {
	return fmt.Sprintf("sector %d failed authentication: %s", e.LBA, e.Reason)
}

func (e *AuthError) Unwrap() error { return ErrAuth }

// DefaultSuite is AES-256-GCM where the CPU accelerates it, else ChaCha20-Poly1305.
func DefaultSuite() format.Suite {
	if cpuid.CPU.Supports(cpuid.AESNI, cpuid.CLMUL) {
		return format.SuiteAES256GCM
	}
	return format.SuiteChaCha20Poly1305
}

func keySize(s format.Suite) int {
	if s == format.SuiteSM4GCM {
		return 16
	}
	return 32
}

func newAEAD(s format.Suite, key []byte) (cipher.AEAD, error) {
	switch s {
	case format.SuiteAES256GCM:
		b, err := aes.NewCipher(key)
		if err != nil {
			return nil, err
		}
		return cipher.NewGCM(b)
	case format.SuiteChaCha20Poly1305:
		return chacha20poly1305.New(key)
	case format.SuiteSM4GCM:
		b, err := sm4.NewCipher(key)
		if err != nil {
			return nil, err
		}
		return cipher.NewGCM(b)
	}
	return nil, fmt.Errorf("unknown data suite %d", uint16(s))
}

// Cipher holds one image's keys. It is safe for concurrent use.
type Cipher struct {
	suite      format.Suite
	uuid       [16]byte
	sectorSize int
	info       []byte // HKDF info for session keys

	mu        sync.Mutex // guards key, jkey, sessions, order, destroyed
	key       []byte
	jkey      []byte
	sessions  map[[SaltSize]byte]cipher.AEAD
	order     [][SaltSize]byte // FIFO of cached salts, for bounded eviction
	destroyed bool
}

// NewCipher makes the coprocessor state for an image from its 32-byte key K. The key is
// copied; Destroy zeroises the copy.
func NewCipher(suite format.Suite, imageKey []byte, uuid [16]byte, sectorSize int) (*Cipher, error) {
	if !suite.Valid() {
		return nil, fmt.Errorf("failed to create sector cipher: unknown data suite %d", uint16(suite))
	}
	if len(imageKey) != KeySize {
		return nil, fmt.Errorf("failed to create sector cipher: image key is %d bytes, want %d", len(imageKey), KeySize)
	}
	if sectorSize != 512 && sectorSize != 4096 {
		return nil, fmt.Errorf("failed to create sector cipher: sector size %d is not 512 or 4096", sectorSize)
	}
	info := append([]byte(sectorLabel), byte(suite>>8), byte(suite))
	info = append(info, uuid[:]...)
	jkey, err := hkdf.Key(sha256.New, imageKey, nil, journalLabel+string(uuid[:]), 32)
	if err != nil {
		return nil, fmt.Errorf("failed to derive journal key: %w", err)
	}
	return &Cipher{
		suite: suite, uuid: uuid, sectorSize: sectorSize, info: info,
		key: append([]byte(nil), imageKey...), jkey: jkey,
		sessions: make(map[[SaltSize]byte]cipher.AEAD),
	}, nil
}

// SectorSize is the sector size the cipher was made for.
func (c *Cipher) SectorSize() int { return c.sectorSize }

// Suite is the data suite.
func (c *Cipher) Suite() format.Suite { return c.suite }

// aead returns the session AEAD for salt, deriving and caching it on a miss.
func (c *Cipher) aead(salt [SaltSize]byte, pin bool) (cipher.AEAD, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.destroyed {
		return nil, errors.New("sector cipher used after Destroy")
	}
	if a := c.sessions[salt]; a != nil {
		return a, nil
	}
	saltCopy := salt // only the miss path pays for the escaping copy
	ks, err := hkdf.Key(sha256.New, c.key, saltCopy[:], string(c.info), keySize(c.suite))
	if err != nil {
		return nil, fmt.Errorf("failed to derive session key: %w", err)
	}
	a, err := newAEAD(c.suite, ks)
	clear(ks)
	if err != nil {
		return nil, fmt.Errorf("failed to create session AEAD: %w", err)
	}
	if !pin {
		// Pinned (writing) sessions are held by their Session and never evicted here.
		for len(c.order) >= sessionCacheSize {
			delete(c.sessions, c.order[0])
			c.order = c.order[1:]
		}
		c.order = append(c.order, salt)
	}
	c.sessions[salt] = a
	return a, nil
}

// Session is one writing session: a fresh salt and a nonce counter. Safe for concurrent use.
type Session struct {
	c   *Cipher
	max uint64 // counter limit; a new salt is drawn past it (injectable in tests)
	mu  sync.Mutex
	cur atomic.Pointer[sessionKey]
}

type sessionKey struct {
	salt [SaltSize]byte
	aead cipher.AEAD
	ctr  atomic.Uint64
}

// NewSession starts a writing session with a new random salt.
func (c *Cipher) NewSession() (*Session, error) {
	s := &Session{c: c, max: ^uint64(0)}
	if err := s.rotate(nil); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *Session) rotate(fixed *[SaltSize]byte) error {
	var salt [SaltSize]byte
	if fixed != nil {
		salt = *fixed
	} else if _, err := rand.Read(salt[:]); err != nil {
		return fmt.Errorf("failed to draw session salt: %w", err)
	}
	a, err := s.c.aead(salt, true)
	if err != nil {
		return err
	}
	s.cur.Store(&sessionKey{salt: salt, aead: a})
	return nil
}

// next reserves a (key, counter) pair that has never been used and never will be again.
func (s *Session) next() (*sessionKey, uint64) {
	for {
		k := s.cur.Load()
		c := k.ctr.Add(1)
		if c != 0 && c <= s.max {
			return k, c
		}
		s.mu.Lock()
		if s.cur.Load() == k {
			if err := s.rotate(nil); err != nil {
				s.mu.Unlock()
				panic("BUG: sector: cannot draw a new session salt: " + err.Error())
			}
		}
		s.mu.Unlock()
	}
}

// scratch holds a nonce and an AAD. Pooled because slices passed to an AEAD interface
// method escape, and the data path must not allocate per sector.
type scratch struct {
	nonce [nonceSize]byte
	aad   [aadSize]byte
}

var scratchPool = sync.Pool{New: func() any { return new(scratch) }}

func getScratch(uuid [16]byte, lba, ctr uint64) *scratch {
	sc := scratchPool.Get().(*scratch)
	binary.BigEndian.PutUint64(sc.nonce[4:], ctr)
	copy(sc.aad[:16], uuid[:])
	binary.BigEndian.PutUint64(sc.aad[16:], lba)
	return sc
}

// Seal encrypts one sector into dst and fills e. len(pt) == SectorSize; dst has len
// SectorSize and cap ≥ SectorSize+TagSize (the slack holds the tag transiently); dst may be
// pt. It never allocates.
func (s *Session) Seal(lba uint64, dst, pt []byte, e *Entry) {
	n := s.c.sectorSize
	if len(pt) != n || len(dst) != n || cap(dst) < n+TagSize {
		panic("BUG: sector: Seal buffer sizes")
	}
	k, ctr := s.next()
	sc := getScratch(s.c.uuid, lba, ctr)
	out := k.aead.Seal(dst[:0], sc.nonce[:], pt, sc.aad[:])
	scratchPool.Put(sc)
	*e = Entry{}
	copy(e[:16], k.salt[:])
	binary.BigEndian.PutUint64(e[16:24], ctr)
	copy(e[24:40], out[n:n+TagSize])
}

// Open verifies and decrypts one sector into dst (same buffer rules as Seal; dst may be
// ct). A zero entry yields zeros. Any failure is an *AuthError; dst then holds zeros, never
// unauthenticated plaintext.
func (c *Cipher) Open(lba uint64, dst, ct []byte, e *Entry) error {
	n := c.sectorSize
	if len(ct) != n || len(dst) != n || cap(dst) < n+TagSize {
		panic("BUG: sector: Open buffer sizes")
	}
	if e.IsZero() {
		clear(dst)
		return nil
	}
	if !allZero(e[40:]) {
		clear(dst)
		return &AuthError{LBA: lba, Reason: "reserved entry bytes are not zero"}
	}
	ctr := e.Counter()
	if ctr == 0 {
		clear(dst)
		return &AuthError{LBA: lba, Reason: "nonce counter is zero"}
	}
	a, err := c.aead(e.Salt(), false)
	if err != nil {
		clear(dst)
		return &AuthError{LBA: lba, Reason: err.Error()}
	}
	// The AEAD wants ct||tag contiguous: put them in dst's slack (copy is a no-op in place).
	buf := dst[:n+TagSize]
	copy(buf, ct)
	copy(buf[n:], e[24:40])
	sc := getScratch(c.uuid, lba, ctr)
	_, err = a.Open(buf[:0], sc.nonce[:], buf, sc.aad[:])
	scratchPool.Put(sc)
	if err != nil {
		clear(buf)
		return &AuthError{LBA: lba, Reason: "tag mismatch (data, nonce, tag or position was modified)"}
	}
	clear(buf[n:])
	return nil
}

// Destroy zeroises the image key, the journal key and the cached session keys (by dropping
// every reference: Go's AEADs keep their expanded keys unexported). Later use returns errors
// from Open and panics in Seal.
func (c *Cipher) Destroy() {
	c.mu.Lock()
	defer c.mu.Unlock()
	clear(c.key)
	clear(c.jkey)
	clear(c.sessions)
	c.order = nil
	c.destroyed = true
}

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}
