package psp

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"
)

// counterStore keeps each image's rollback counter in the PSP directory: one file per image
// UUID, two 64-byte slots written alternately and fdatasynced, so a crash in the middle of a
// write leaves the other slot, and the highest valid sequence wins (docs/FORMAT.md §8).
//
//	slot: magic "SDCNT001" (8) | seq u64 | counter u64 | root (32) | SHA-256 of [0,56) first 8 bytes
type counterStore struct {
	dir string
	mu  sync.Mutex // serialises writes of a file and guards seqs
	seq map[[16]byte]uint64
}

const (
	counterMagic = "SDCNT001"
	counterSlot  = 64
)

func (s *counterStore) path(uuid [16]byte) string {
	return filepath.Join(s.dir, CounterDir, hex.EncodeToString(uuid[:]))
}

func (s *counterStore) read(uuid [16]byte) (st imageState, ok bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st, seq, ok, err := s.readLocked(uuid)
	if ok {
		s.seqs()[uuid] = seq
	}
	return st, ok, err
}

func (s *counterStore) seqs() map[[16]byte]uint64 {
	if s.seq == nil {
		s.seq = map[[16]byte]uint64{}
	}
	return s.seq
}

func (s *counterStore) readLocked(uuid [16]byte) (st imageState, seq uint64, ok bool, err error) {
	b, err := os.ReadFile(s.path(uuid))
	if errors.Is(err, os.ErrNotExist) {
		return st, 0, false, nil
	}
	if err != nil {
		return st, 0, false, fmt.Errorf("failed to read the image counter: %w", err)
	}
	for i := 0; i+counterSlot <= len(b) && i < 2*counterSlot; i += counterSlot {
		sl := b[i : i+counterSlot]
		sum := sha256.Sum256(sl[:56])
		if string(sl[:8]) != counterMagic || !bytes.Equal(sum[:8], sl[56:]) {
			continue
		}
		if q := binary.BigEndian.Uint64(sl[8:]); !ok || q > seq {
			seq, ok = q, true
			st.counter = binary.BigEndian.Uint64(sl[16:])
			copy(st.root[:], sl[24:56])
		}
	}
	if !ok {
		return st, 0, false, fmt.Errorf("failed to read the image counter: %s has no valid slot", s.path(uuid))
	}
	return st, seq, true, nil
}

// write records counter and root in the slot after the current one and syncs it.
func (s *counterStore) write(uuid [16]byte, counter uint64, root [32]byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	seq, known := s.seqs()[uuid]
	if !known {
		_, q, ok, err := s.readLocked(uuid)
		if err != nil {
			return err
		}
		if ok {
			seq = q
		}
	}
	seq++
	sl := make([]byte, counterSlot)
	copy(sl, counterMagic)
	binary.BigEndian.PutUint64(sl[8:], seq)
	binary.BigEndian.PutUint64(sl[16:], counter)
	copy(sl[24:56], root[:])
	sum := sha256.Sum256(sl[:56])
	copy(sl[56:], sum[:8])
	if err := os.MkdirAll(filepath.Join(s.dir, CounterDir), 0o700); err != nil {
		return fmt.Errorf("failed to create the counter directory: %w", err)
	}
	path := s.path(uuid)
	created := false
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		f, err = os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		created = true
	}
	if err != nil {
		return fmt.Errorf("failed to open the image counter: %w", err)
	}
	defer f.Close()
	if _, err := f.WriteAt(sl, int64(seq%2)*counterSlot); err != nil {
		return fmt.Errorf("failed to write the image counter: %w", err)
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		return fmt.Errorf("failed to sync the image counter: %w", err)
	}
	if created { // the new name must survive a crash too
		d, err := os.Open(filepath.Dir(path))
		if err != nil {
			return fmt.Errorf("failed to sync the counter directory: %w", err)
		}
		err = d.Sync()
		d.Close()
		if err != nil {
			return fmt.Errorf("failed to sync the counter directory: %w", err)
		}
	}
	s.seqs()[uuid] = seq
	return nil
}
