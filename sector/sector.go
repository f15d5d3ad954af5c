// Package sector is the crypto coprocessor's core: per-sector authenticated encryption,
// metadata entries and journal records of docs/FORMAT.md §4–§6. The engine and the offline
// tools drive it; it imports no frontend and does no I/O.
//
// Key schedule (FORMAT.md §4.2): every writing session draws a random 16-byte salt S and
// derives Ks = HKDF-SHA256(K, S, "sealdisk v1 sector key" || suite || uuid); nonces are a
// 64-bit per-session counter. A nonce repeats under a key only if two sessions draw one salt.
// Readers derive Ks from each entry's salt; derived keys are cached (keys.go) so reading
// sectors written by many past sessions does not re-run HKDF and key expansion per sector.
//
// Destroy zeroises every key the Cipher holds, including the expanded key schedules inside
// the AEADs. Afterwards the calls that return an error (Open, NewSession, Parse*) return
// ErrDestroyed — a request racing shutdown fails alone — and the calls that cannot (Seal,
// Marshal*) panic with "BUG: sector: use after Destroy", because silently not sealing would
// lose data.
package sector

import (
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/klauspost/cpuid/v2"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/internal/zeros"
)

const (
	TagSize   = 16
	SaltSize  = 16
	EntrySize = format.MetaEntrySize
	KeySize   = 32 // the image key K
	nonceSize = 12
	aadSize   = 24

	sectorLabel  = "sealdisk v1 sector key"
	journalLabel = "sealdisk v1 journal mac"
)

// Entry is one sector's metadata entry (FORMAT.md §5):
// salt(16) || counter(8) || tag(16) || reserved(24). All zero means never written.
type Entry [EntrySize]byte

// IsZero reports a never-written (or trimmed) sector.
func (e *Entry) IsZero() bool { return *e == Entry{} }

// Salt is the session salt that encrypted the sector.
func (e *Entry) Salt() (s [SaltSize]byte) { copy(s[:], e[:16]); return s }

// Counter is the nonce counter of the sector's last write.
func (e *Entry) Counter() uint64 { return binary.BigEndian.Uint64(e[16:24]) }

// ErrAuth is wrapped by every sector authentication failure.
var ErrAuth = errors.New("sector authentication failed")

// ErrDestroyed is returned by calls on a Cipher after Destroy.
var ErrDestroyed = errors.New("sector cipher used after Destroy")

// AuthError names the sector that failed authentication.
type AuthError struct {
	LBA    uint64
	Reason string
}

func (e *AuthError) Error() string {
	return fmt.Sprintf("sector %d failed authentication: %s", e.LBA, e.Reason)
}

func (e *AuthError) Unwrap() error { return ErrAuth }

// DefaultSuite is AES-256-GCM where the CPU has AES and carry-less multiply instructions
// (FORMAT.md §4.1), else ChaCha20-Poly1305.
func DefaultSuite() format.Suite {
	if cpuid.CPU.Supports(cpuid.AESNI, cpuid.CLMUL) {
		return format.SuiteAES256GCM
	}
	return format.SuiteChaCha20Poly1305
}

// Cipher holds one image's keys. It is safe for concurrent use.
type Cipher struct {
	suite      format.Suite
	uuid       [16]byte
	sectorSize int
	info       string // HKDF info for session keys (not secret)

	// mu guards key, jinner, jouter, keys and destroyed, and the keys' pins. Every use of a
	// derived key (Seal, Open, journal MACs) holds it for reading for the whole operation,
	// so eviction and Destroy, which hold it for writing, only ever wipe keys nobody is using.
	mu        sync.RWMutex
	key       []byte // K
	jinner    []byte // SHA-256 state after Kj⊕ipad (journal.go)
	jouter    []byte // SHA-256 state after Kj⊕opad
	keys      keyCache
	destroyed bool

	derivations atomic.Uint64 // session keys derived so far; tests check the cache with it
}

// NewCipher makes the coprocessor state for an image from its 32-byte key K. The key is
// copied; Destroy zeroises the copy (the caller clears its own).
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
	jkey, err := hkdf.Key(sha256.New, imageKey, nil, journalLabel+string(uuid[:]), 32)
	if err != nil {
		return nil, fmt.Errorf("failed to derive journal key: %w", err)
	}
	inner, outer := hmacStates(jkey)
	clear(jkey)
	return &Cipher{
		suite: suite, uuid: uuid, sectorSize: sectorSize,
		info: sectorLabel + string([]byte{byte(suite >> 8), byte(suite)}) + string(uuid[:]),
		key:  append([]byte(nil), imageKey...), jinner: inner, jouter: outer,
		keys: keyCache{bySalt: make(map[[SaltSize]byte]*sessionKey)},
	}, nil
}

// SectorSize is the sector size the cipher was made for.
func (c *Cipher) SectorSize() int { return c.sectorSize }

// Suite is the data suite.
func (c *Cipher) Suite() format.Suite { return c.suite }

// scratch holds a nonce and an AAD. Pooled because slices passed to an AEAD interface
// method escape, and the data path must not allocate per sector.
type scratch struct {
	nonce [nonceSize]byte
	aad   [aadSize]byte
}

var scratchPool = sync.Pool{New: func() any { return new(scratch) }}

func getScratch(uuid [16]byte, lba, ctr uint64) *scratch {
	sc := scratchPool.Get().(*scratch)
	sc.set(uuid, lba, ctr)
	return sc
}

// set fills in sector lba's nonce (counter ctr) and AAD.
func (sc *scratch) set(uuid [16]byte, lba, ctr uint64) {
	binary.BigEndian.PutUint64(sc.nonce[4:], ctr) // nonce[:4] stays zero
	copy(sc.aad[:16], uuid[:])
	binary.BigEndian.PutUint64(sc.aad[16:], lba)
}

// Open verifies and decrypts one sector into dst. len(ct) == SectorSize; dst has len
// SectorSize and cap ≥ SectorSize+TagSize (the slack holds ct's tag transiently); dst may be
// ct itself. A zero entry yields zeros. Any failure of the sector's bytes is an *AuthError
// naming lba, and dst then holds zeros, never unauthenticated plaintext. On a cached salt it
// does not allocate.
func (c *Cipher) Open(lba uint64, dst, ct []byte, e *Entry) error {
	n := c.sectorSize
	if len(ct) != n || len(dst) != n || cap(dst) < n+TagSize {
		panic("BUG: sector: Open buffer sizes")
	}
	if done, err := checkEntry(lba, dst, e); done {
		return err
	}
	salt := e.Salt()
	c.mu.RLock()
	if c.destroyed {
		c.mu.RUnlock()
		clear(dst)
		return ErrDestroyed
	}
	if k := c.keys.bySalt[salt]; k != nil {
		k.touch()
		sc := scratchPool.Get().(*scratch)
		err := c.open(k, lba, dst, ct, e, sc)
		scratchPool.Put(sc)
		c.mu.RUnlock()
		return err
	}
	c.mu.RUnlock()

	// Miss: derive under the write lock and open before releasing it, so the new key cannot
	// be evicted by other misses in between (progress even when the cache thrashes).
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.destroyed {
		clear(dst)
		return ErrDestroyed
	}
	k := c.keys.bySalt[salt]
	if k == nil {
		k = c.derive(salt)
		c.keys.bySalt[salt] = k
		c.keys.addUnpinned(k)
	}
	sc := scratchPool.Get().(*scratch)
	defer scratchPool.Put(sc)
	return c.open(k, lba, dst, ct, e, sc)
}

// checkEntry handles the entries that need no AEAD: a zero entry yields zeros, a malformed
// one fails. done reports that dst is final (zeros) and err the verdict.
func checkEntry(lba uint64, dst []byte, e *Entry) (done bool, err error) {
	switch {
	case e.IsZero():
		clear(dst)
		return true, nil
	case !zeros.All(e[40:]):
		clear(dst)
		return true, &AuthError{LBA: lba, Reason: "reserved entry bytes are not zero"}
	case e.Counter() == 0:
		clear(dst)
		return true, &AuthError{LBA: lba, Reason: "nonce counter is zero"}
	}
	return false, nil
}

// OpenSectors verifies and decrypts len(ents) consecutive sectors starting at lba in place:
// buf (exactly len(ents) sectors, no slack needed) holds their ciphertexts and, on success,
// their plaintexts; ents[i] is sector lba+i's entry. Each sector's transient tag borrows the
// next sector's first TagSize bytes, which are put back after. The last sector borrows the
// TagSize bytes after buf when buf's capacity has them (so nothing else may use them
// meanwhile), else it goes through a pooled scratch. One run takes the key lock once and looks a salt up once while it
// repeats, which is what a run written by one session does. On failure it returns the
// first failing sector's error; buf then holds zeros for that sector and must be discarded
// whole (later sectors are still ciphertext).
func (c *Cipher) OpenSectors(lba uint64, buf []byte, ents []Entry) error {
	n := c.sectorSize
	if len(buf) != len(ents)*n {
		panic("BUG: sector: OpenSectors buffer size")
	}
	c.mu.RLock()
	locked := true
	defer func() {
		if locked {
			c.mu.RUnlock()
		}
	}()
	if c.destroyed {
		clear(buf)
		return ErrDestroyed
	}
	sc := scratchPool.Get().(*scratch)
	defer scratchPool.Put(sc)
	var k *sessionKey // the key of the previous sector
	for i := range ents {
		e := &ents[i]
		s := buf[i*n : (i+1)*n]
		if done, err := checkEntry(lba+uint64(i), s, e); done {
			if err != nil {
				return err
			}
			continue
		}
		var save [TagSize]byte
		var tail *tailBuf
		var dst, next []byte
		if (i+1)*n+TagSize > cap(buf) {
			tail = tailPool.Get().(*tailBuf)
			dst = tail[: n : n+TagSize]
			copy(dst, s)
		} else {
			dst = buf[i*n : (i+1)*n : (i+1)*n+TagSize]
			next = buf[(i+1)*n : (i+1)*n+TagSize]
			copy(save[:], next)
		}
		var err error
		if k == nil || k.salt != [SaltSize]byte(e[:SaltSize]) {
			k = c.keys.bySalt[[SaltSize]byte(e[:SaltSize])]
			if k != nil {
				k.touch()
			}
		}
		if k != nil {
			err = c.open(k, lba+uint64(i), dst, dst, e, sc)
		} else {
			// a salt not cached: Open derives the key under the write lock
			c.mu.RUnlock()
			locked = false
			err = c.Open(lba+uint64(i), dst, dst, e)
			c.mu.RLock()
			locked = true
			if c.destroyed && err == nil {
				err = ErrDestroyed
			}
		}
		if tail != nil {
			copy(s, dst)
			clear(tail[:])
			tailPool.Put(tail)
		} else {
			copy(next, save[:])
		}
		if err != nil {
			clear(s)
			return err
		}
	}
	return nil
}

// tailBuf is a sector with room for its tag, for OpenSectors' last sector (the largest
// sector size: a 512-byte cipher uses its head).
type tailBuf [4096 + TagSize]byte

var tailPool = sync.Pool{New: func() any { return new(tailBuf) }}

// open runs the AEAD with sc for its nonce and AAD; the caller holds c.mu.
func (c *Cipher) open(k *sessionKey, lba uint64, dst, ct []byte, e *Entry, sc *scratch) error {
	n := c.sectorSize
	// The AEAD wants ct||tag contiguous: put them in dst's slack (no copy in place).
	buf := dst[:n+TagSize]
	if &buf[0] != &ct[0] {
		copy(buf, ct)
	}
	copy(buf[n:], e[24:40])
	sc.set(c.uuid, lba, e.Counter())
	_, err := k.aead.Open(buf[:0], sc.nonce[:], buf, sc.aad[:])
	if err != nil {
		clear(buf)
		return &AuthError{LBA: lba, Reason: "tag mismatch (data, salt, counter, tag or position was modified)"}
	}
	clear(buf[n:])
	return nil
}

// Destroy zeroises the image key, the journal MAC key and every derived session key,
// including the AEADs' expanded key schedules. It waits for Seal/Open calls in flight;
// later calls fail as the package doc says. Destroy is idempotent.
func (c *Cipher) Destroy() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.destroyed {
		return
	}
	for _, k := range c.keys.bySalt {
		k.wipe()
	}
	c.keys = keyCache{}
	clear(c.key)
	clear(c.jinner)
	clear(c.jouter)
	c.destroyed = true
}
