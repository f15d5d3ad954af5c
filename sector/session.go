package sector

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sync/atomic"
)

// Session is one writing session (FORMAT.md §4.2): a session key from a fresh salt and a
// nonce counter starting at 1. It is safe for concurrent use. When the counter has used
// 2^64−1 the session draws a new salt and starts again at 1.
type Session struct {
	c   *Cipher
	max uint64        // last counter used under one salt; lowered by tests to force rollover
	st  *sessionState // nil once closed; guarded by c.mu (read under RLock, swapped under Lock)
}

// sessionState is a session key and the last counter used under it.
type sessionState struct {
	key *sessionKey   // pinned while it is a session's current key
	ctr atomic.Uint64 // last counter handed out
}

// take reserves the next counter (each of 1..max exactly once, however many goroutines
// ask), or reports that the salt is used up. A CAS loop rather than an add: an add past max
// could wrap to 0 and hand out 1 again under the same key.
func (st *sessionState) take(max uint64) (uint64, bool) {
	for {
		c := st.ctr.Load()
		if c >= max {
			return 0, false
		}
		if st.ctr.CompareAndSwap(c, c+1) {
			return c + 1, true
		}
	}
}

// NewSession starts a writing session with a new random salt. Close it when the writer is
// done so its key joins the bounded read cache.
func (c *Cipher) NewSession() (*Session, error) {
	return c.newSession(nil)
}

// newSession takes a fixed salt for test vectors; nil draws one.
func (c *Cipher) newSession(salt *[SaltSize]byte) (*Session, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.destroyed {
		return nil, fmt.Errorf("failed to start a sector session: %w", ErrDestroyed)
	}
	k, err := c.writerKey(salt)
	if err != nil {
		return nil, fmt.Errorf("failed to start a sector session: %w", err)
	}
	return &Session{c: c, max: math.MaxUint64, st: &sessionState{key: k}}, nil
}

// writerKey derives and pins a key for a writing session. A salt already known to this
// cipher is never reused for writing: its counters may have been used (a random draw
// collides with probability 2^-128; a fixed salt is refused). The caller holds c.mu.
func (c *Cipher) writerKey(fixed *[SaltSize]byte) (*sessionKey, error) {
	for {
		var salt [SaltSize]byte
		if fixed != nil {
			salt = *fixed
		} else {
			rand.Read(salt[:]) // never fails (crypto/rand since Go 1.24)
		}
		if c.keys.bySalt[salt] != nil {
			if fixed != nil {
				return nil, errors.New("session salt already in use")
			}
			continue
		}
		k := c.derive(salt)
		k.pins = 1
		c.keys.bySalt[salt] = k
		return k, nil
	}
}

// unpin releases a writing session's hold on k; it stays cached for reads. Caller holds c.mu.
func (c *Cipher) unpin(k *sessionKey) {
	k.pins--
	if k.pins == 0 {
		c.keys.addUnpinned(k)
	}
}

// Seal encrypts one sector into dst and fills e. len(pt) == SectorSize; dst has len
// SectorSize and cap ≥ SectorSize+TagSize (the slack receives the tag transiently); dst may
// be pt itself. It never allocates (except on the once-per-2^64 salt rollover).
func (s *Session) Seal(lba uint64, dst, pt []byte, e *Entry) {
	c := s.c
	n := c.sectorSize
	if len(pt) != n || len(dst) != n || cap(dst) < n+TagSize {
		panic("BUG: sector: Seal buffer sizes")
	}
	for {
		c.mu.RLock()
		if c.destroyed {
			c.mu.RUnlock()
			panic("BUG: sector: use after Destroy (Seal)")
		}
		st := s.st
		if st == nil {
			c.mu.RUnlock()
			panic("BUG: sector: Seal on a closed session")
		}
		if ctr, ok := st.take(s.max); ok {
			sc := getScratch(c.uuid, lba, ctr)
			out := st.key.aead.Seal(dst[:0], sc.nonce[:], pt, sc.aad[:])
			scratchPool.Put(sc)
			c.mu.RUnlock()
			*e = Entry{}
			copy(e[:16], st.key.salt[:])
			binary.BigEndian.PutUint64(e[16:24], ctr)
			copy(e[24:40], out[n:n+TagSize])
			return
		}
		c.mu.RUnlock()
		s.rotate(st)
	}
}

// rotate replaces a used-up session key with one from a new salt, unless another goroutine
// already has.
func (s *Session) rotate(old *sessionState) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.destroyed || s.st != old {
		return // Seal's loop reports destroyed/closed, or uses the new key
	}
	k, err := c.writerKey(nil)
	if err != nil {
		panic("BUG: sector: " + err.Error()) // only fixed salts can fail
	}
	s.st = &sessionState{key: k}
	c.unpin(old.key)
}

// Close ends the session: later Seals panic, and its key joins the bounded read cache.
// Close is idempotent.
func (s *Session) Close() {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.st == nil || c.destroyed {
		s.st = nil
		return
	}
	c.unpin(s.st.key)
	s.st = nil
}

// Salt is the session's current salt (it changes only on rollover); zero once closed.
func (s *Session) Salt() (salt [SaltSize]byte) {
	s.c.mu.RLock()
	defer s.c.mu.RUnlock()
	if s.st != nil && !s.c.destroyed {
		salt = s.st.key.salt
	}
	return salt
}
