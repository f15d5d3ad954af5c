package broker

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"
)

// Challenge nonces are self-authenticating, so no replica keeps a session:
//
//	1   version   1
//	8   issued    big-endian Unix milliseconds
//	16  random
//	32  mac       HMAC-SHA256(nonce MAC key, "sealdisk broker v1 nonce" || version || issued
//	              || random || key id)
//
// 57 bytes, inside a report's 16..64. Any replica holding nonce.key checks the MAC (which
// also binds the key id asked for) and the window; the replay store on the shared store
// directory makes each nonce usable once across replicas.
const (
	nonceVersion = 1
	nonceLen     = 1 + 8 + 16 + 32
	nonceLabel   = "sealdisk broker v1 nonce"
	// clockSkew tolerates a replica whose clock is slightly behind the one that issued.
	clockSkew = 5 * time.Second
)

var (
	ErrNonceForged  = errors.New("nonce was not issued by this broker (or for another key id)")
	ErrNonceExpired = errors.New("nonce expired")
	ErrNonceReplay  = errors.New("nonce already used")
)

func nonceMAC(key []byte, head []byte, keyID string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(nonceLabel))
	m.Write(head)
	m.Write([]byte(keyID))
	return m.Sum(nil)
}

func mintNonce(key []byte, keyID string, now time.Time) []byte {
	n := make([]byte, 0, nonceLen)
	n = append(n, nonceVersion)
	n = binary.BigEndian.AppendUint64(n, uint64(now.UnixMilli()))
	var r [16]byte
	rand.Read(r[:])
	n = append(n, r[:]...)
	return append(n, nonceMAC(key, n, keyID)...)
}

// checkNonce verifies the MAC and the window; it returns when the nonce was issued.
func checkNonce(key []byte, nonce []byte, keyID string, now time.Time, window time.Duration) (time.Time, error) {
	if len(nonce) != nonceLen || nonce[0] != nonceVersion {
		return time.Time{}, fmt.Errorf("%w: %d bytes", ErrNonceForged, len(nonce))
	}
	if !hmac.Equal(nonce[25:], nonceMAC(key, nonce[:25], keyID)) {
		return time.Time{}, ErrNonceForged
	}
	issued := time.UnixMilli(int64(binary.BigEndian.Uint64(nonce[1:9])))
	if now.Sub(issued) > window {
		return issued, fmt.Errorf("%w: issued %s, window %s", ErrNonceExpired, issued.UTC().Format(time.RFC3339), window)
	}
	if issued.Sub(now) > clockSkew {
		return issued, fmt.Errorf("%w: issued in the future (%s)", ErrNonceForged, issued.UTC().Format(time.RFC3339))
	}
	return issued, nil
}

// replayStore marks used nonces as files STORE/replay/<minute>/<hash>, created with O_EXCL:
// on a shared directory exactly one replica's create succeeds. Minutes older than the window
// are removed (their nonces fail the window check anyway).
type replayStore struct {
	dir    string
	window time.Duration

	mu        sync.Mutex // guards lastPrune
	lastPrune time.Time
}

func (r *replayStore) use(nonce []byte, issued, now time.Time) error {
	bucket := filepath.Join(r.dir, strconv.FormatInt(issued.Unix()/60, 10))
	if err := os.MkdirAll(bucket, 0o700); err != nil {
		return fmt.Errorf("failed to record nonce: %w", err)
	}
	sum := sha256.Sum256(nonce)
	f, err := os.OpenFile(filepath.Join(bucket, hex.EncodeToString(sum[:16])), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, os.ErrExist) {
		return ErrNonceReplay
	}
	if err != nil {
		return fmt.Errorf("failed to record nonce: %w", err)
	}
	f.Close()
	r.prune(now)
	return nil
}

func (r *replayStore) prune(now time.Time) {
	r.mu.Lock()
	if now.Sub(r.lastPrune) < time.Minute {
		r.mu.Unlock()
		return
	}
	r.lastPrune = now
	r.mu.Unlock()
	ents, err := os.ReadDir(r.dir)
	if err != nil {
		return
	}
	oldest := now.Add(-r.window-clockSkew).Unix()/60 - 1
	for _, e := range ents {
		if m, err := strconv.ParseInt(e.Name(), 10, 64); err == nil && m < oldest {
			os.RemoveAll(filepath.Join(r.dir, e.Name()))
		}
	}
}
