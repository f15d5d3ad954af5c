package sector

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"fmt"
	"reflect"
	"sync/atomic"
	"unsafe"

	"github.com/emmansun/gmsm/sm4"
	"golang.org/x/crypto/chacha20poly1305"

	"github.com/sealdisk/sealdisk/format"
)

// sessionCacheSize bounds the session keys kept for reading sectors of past sessions. Keys
// of open writing sessions are pinned and come on top of it.
const sessionCacheSize = 64

// sessionKey is one derived session key Ks, ready to use.
type sessionKey struct {
	salt  [SaltSize]byte
	aead  cipher.AEAD
	block cipher.Block // the AEAD's block cipher (nil for ChaCha20-Poly1305), kept to wipe it
	pins  int          // open writing sessions using this key; guarded by Cipher.mu
	used  atomic.Bool  // CLOCK reference bit: set by readers holding Cipher.mu for reading
}

// touch marks the key recently used; the load first keeps hits from bouncing the line.
func (k *sessionKey) touch() {
	if !k.used.Load() {
		k.used.Store(true)
	}
}

// wipe zeroises the key's expanded schedules. Only under Cipher.mu held for writing.
func (k *sessionKey) wipe() {
	wipeIntegers(k.aead)
	if k.block != nil {
		wipeIntegers(k.block)
	}
	clear(k.salt[:])
}

// keyCache holds every derived session key of a Cipher, all guarded by Cipher.mu.
// Pinned keys (of open writing sessions) are only in bySalt; unpinned keys are also in the
// CLOCK ring, whose size is bounded: a miss on a full ring evicts (and wipes) the first key
// the hand finds not used since its last pass. CLOCK rather than FIFO keeps a hot old
// session's key resident while a scan streams through many others.
type keyCache struct {
	bySalt map[[SaltSize]byte]*sessionKey
	ring   []*sessionKey // unpinned keys, len ≤ sessionCacheSize
	hand   int
}

func (kc *keyCache) addUnpinned(k *sessionKey) {
	if len(kc.ring) < sessionCacheSize {
		kc.ring = append(kc.ring, k)
		return
	}
	for {
		v := kc.ring[kc.hand]
		if v.used.Load() {
			v.used.Store(false)
			kc.hand = (kc.hand + 1) % len(kc.ring)
			continue
		}
		delete(kc.bySalt, v.salt)
		v.wipe()
		kc.ring[kc.hand] = k
		kc.hand = (kc.hand + 1) % len(kc.ring)
		return
	}
}

// derive computes the session key for salt. The caller holds c.mu and has checked that the
// cipher is not destroyed.
func (c *Cipher) derive(salt [SaltSize]byte) *sessionKey {
	ks, err := hkdf.Key(sha256.New, c.key, salt[:], c.info, keySize(c.suite))
	if err != nil {
		panic("BUG: sector: cannot derive a session key: " + err.Error())
	}
	defer clear(ks)
	k := &sessionKey{salt: salt}
	k.block, k.aead, err = newAEAD(c.suite, ks)
	if err != nil {
		panic("BUG: sector: cannot create a session AEAD: " + err.Error())
	}
	c.derivations.Add(1)
	return k
}

// newAEAD is the suite's AEAD under key (KeySize bytes), and its block cipher where it has one.
func newAEAD(s format.Suite, key []byte) (block cipher.Block, aead cipher.AEAD, err error) {
	switch s {
	case format.SuiteAES256GCM:
		block, err = aes.NewCipher(key)
		if err == nil {
			aead, err = cipher.NewGCM(block)
		}
	case format.SuiteChaCha20Poly1305:
		aead, err = chacha20poly1305.New(key)
	case format.SuiteSM4GCM:
		block, err = sm4.NewCipher(key) // gmsm's block brings its own assembly GCM
		if err == nil {
			aead, err = cipher.NewGCM(block)
		}
	default:
		err = fmt.Errorf("unknown data suite %d", uint16(s))
	}
	return block, aead, err
}

// NewAEAD is the suite's AEAD (a 12-byte nonce, a 16-byte tag) under a key of SuiteKeySize(s)
// bytes: for the other formats sealed with an image-like key (state files). Destroy it with
// WipeAEAD when done.
func NewAEAD(s format.Suite, key []byte) (cipher.AEAD, error) {
	_, a, err := newAEAD(s, key)
	return a, err
}

// WipeAEAD zeroises the expanded key of an AEAD NewAEAD made.
func WipeAEAD(a cipher.AEAD) { wipeIntegers(a) }

// SuiteKeySize is the suite's AEAD key length in bytes.
func SuiteKeySize(s format.Suite) int { return keySize(s) }

func keySize(s format.Suite) int {
	if s == format.SuiteSM4GCM {
		return 16
	}
	return 32
}

// wipeIntegers zeroes every integer reachable from x through pointers, interfaces, structs,
// arrays and slices. The standard library's AEADs keep their expanded keys in unexported
// fields, so this is the only way to zeroise them. It writes no pointer and no string data:
// the object graph stays intact (and GC write barriers are not bypassed); the AEAD merely
// computes with zero keys, and nothing uses it afterwards. It must only be given objects
// allocated for one key — every AEAD and block the constructors in derive return is — never
// shared tables; TestDestroyLeavesOtherCiphersIntact guards that across dependency updates.
func wipeIntegers(x any) { walkIntegers(x, func(b []byte) { clear(b) }) }

// walkIntegers calls fn on the bytes of every pointer-free region reachable from x.
func walkIntegers(x any, fn func([]byte)) {
	seen := make(map[unsafe.Pointer]bool)
	var walk func(v reflect.Value)
	walk = func(v reflect.Value) {
		switch v.Kind() {
		case reflect.Pointer:
			if v.IsNil() || seen[v.UnsafePointer()] {
				return
			}
			seen[v.UnsafePointer()] = true
			walk(v.Elem())
		case reflect.Interface:
			if !v.IsNil() {
				walk(v.Elem())
			}
		case reflect.Slice:
			if v.IsNil() || v.Cap() == 0 || seen[v.UnsafePointer()] {
				return
			}
			seen[v.UnsafePointer()] = true
			if et := v.Type().Elem(); pointerFree(et) {
				fn(unsafe.Slice((*byte)(v.UnsafePointer()), uintptr(v.Cap())*et.Size()))
				return
			}
			for i := range v.Len() {
				walk(v.Index(i))
			}
		case reflect.Array, reflect.Struct:
			if !v.CanAddr() {
				return // a value copied into an interface: immutable, nothing to reach
			}
			if pointerFree(v.Type()) {
				fn(unsafe.Slice((*byte)(v.Addr().UnsafePointer()), v.Type().Size()))
				return
			}
			if v.Kind() == reflect.Array {
				for i := range v.Len() {
					walk(v.Index(i))
				}
				return
			}
			for i := range v.NumField() {
				walk(v.Field(i))
			}
		case reflect.Bool, reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
			reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
			if v.CanAddr() {
				fn(unsafe.Slice((*byte)(v.Addr().UnsafePointer()), v.Type().Size()))
			}
		}
	}
	walk(reflect.ValueOf(x))
}

// pointerFree reports a type made only of booleans and integers.
func pointerFree(t reflect.Type) bool {
	switch t.Kind() {
	case reflect.Bool, reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		return true
	case reflect.Array:
		return pointerFree(t.Elem())
	case reflect.Struct:
		for i := range t.NumField() {
			if !pointerFree(t.Field(i).Type) {
				return false
			}
		}
		return true
	}
	return false
}
