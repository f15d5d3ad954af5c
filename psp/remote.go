package psp

import (
	"bytes"
	"context"
	"crypto/hpke"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"
)

// Remote keys (docs/BROKER.md). A certificate with the remote flag names a key
// broker and a key id instead of sealing the image key. At launch, after every check of
// FORMAT.md §3.4 up to the firmware measurement has passed, the PSP asks its KeyFetcher for
// the key: the fetcher gets a challenge nonce from the broker and has the PSP sign an
// attestation report over it (the launch as checked so far); the broker answers with a
// release: a grant (JSON, below) and the image key HPKE-sealed to this chip's KEM key with
// ReleaseInfo(grant) as the HPKE info. This package owns the grant's layout and meaning: the
// broker builds it with SealRelease, the PSP opens and checks it with openRelease.

// GrantVersion is the version of the grant JSON.
const GrantVersion = 1

// Grant is the broker's statement about one release. Its exact bytes travel with the sealed
// key and their SHA-256 is in the HPKE info, so a changed grant does not open.
type Grant struct {
	Version   int    `json:"version"`
	KeyID     string `json:"key_id"`
	ImageUUID string `json:"image_uuid"`
	ChipID    string `json:"chip_id"` // hex
	Nonce     string `json:"nonce"`   // hex: the challenge the report answered
	LeaseEnd  string `json:"lease_end"`
	// Scope: the VMs and firmware measurements (hex) other launches may reuse the cached key
	// for within the lease without asking the broker again. Empty: any the certificate allows.
	VMs          []string `json:"vms,omitempty"`
	Measurements []string `json:"measurements,omitempty"`
}

// Release is what a broker returns.
type Release struct {
	Grant     []byte // Grant JSON, verbatim
	SealedKey []byte // HPKE enc || ct
}

// KeyRequest is what the PSP gives its fetcher for one fetch.
type KeyRequest struct {
	BrokerURL, KeyID string
	Cert             []byte // the image certificate's bytes (the broker checks its provider)
	// Attest signs an attestation report over the broker's nonce (16..64 bytes) for the
	// launch being admitted.
	Attest func(nonce []byte) ([]byte, error)
}

// KeyFetcher asks a key broker for an image key (the broker package's Client).
type KeyFetcher interface {
	FetchKey(ctx context.Context, req KeyRequest) (*Release, error)
}

// Remote-key refusals.
var (
	// ErrRelease: a release did not open or does not match the launch.
	ErrRelease = errors.New("broker release does not match this launch")
	// ErrLeaseEnded: the cached key's lease ended (or was ending) before the key was bound.
	ErrLeaseEnded = errors.New("remote key lease ended")
)

const releaseLabel = "sealdisk v1 broker release"

// ReleaseInfo is the HPKE info of a release: it binds the sealed key to the image UUID, the
// chip, the key id and the lease end, and, through the grant's digest, to the nonce and scope.
func ReleaseInfo(uuid [16]byte, chipID [32]byte, keyID string, leaseEnd time.Time, grant []byte) []byte {
	info := []byte(releaseLabel)
	info = append(info, uuid[:]...)
	info = append(info, chipID[:]...)
	info = binary.BigEndian.AppendUint16(info, uint16(len(keyID)))
	info = append(info, keyID...)
	info = binary.BigEndian.AppendUint64(info, uint64(leaseEnd.Unix()))
	sum := sha256.Sum256(grant)
	return append(info, sum[:]...)
}

// SealRelease is the broker's half: encode g and seal key to chip under ReleaseInfo.
func SealRelease(chip *ChipCert, g Grant, key []byte) (*Release, error) {
	g.Version = GrantVersion
	end, err := time.Parse(time.RFC3339, g.LeaseEnd)
	if err != nil {
		return nil, fmt.Errorf("failed to seal release: lease_end: %w", err)
	}
	uuid, err := parseUUID(g.ImageUUID)
	if err != nil {
		return nil, fmt.Errorf("failed to seal release: %w", err)
	}
	if g.ChipID != hex.EncodeToString(chip.ID[:]) {
		return nil, errors.New("failed to seal release: grant names another chip")
	}
	gb, err := json.Marshal(g)
	if err != nil {
		return nil, fmt.Errorf("failed to encode grant: %w", err)
	}
	sealed, err := hpke.Seal(chip.PublicKey, hpke.HKDFSHA384(), hpke.AES256GCM(), ReleaseInfo(uuid, chip.ID, g.KeyID, end, gb), key)
	if err != nil {
		return nil, fmt.Errorf("failed to seal release to chip: %w", err)
	}
	return &Release{Grant: gb, SealedKey: sealed}, nil
}

func parseUUID(s string) ([16]byte, error) {
	var u [16]byte
	b, err := hex.DecodeString(string(bytes.ReplaceAll([]byte(s), []byte("-"), nil)))
	if err != nil || len(b) != 16 {
		return u, fmt.Errorf("bad image UUID %q", s)
	}
	copy(u[:], b)
	return u, nil
}

// openedRelease is a checked release: the key, its lease end and its scope.
type openedRelease struct {
	key      []byte
	leaseEnd time.Time
	vms      []string
	ms       []string
}

// covers says whether a launch may use this release's key (the grant's scope).
func (o *openedRelease) covers(l *Launch) bool {
	if len(o.vms) > 0 && !slices.Contains(o.vms, l.VM) {
		return false
	}
	return len(o.ms) == 0 || slices.Contains(o.ms, hex.EncodeToString(l.Measurement))
}

// openRelease checks a release against what this PSP asked for (image, key id, nonce, a lease
// in the future) and opens the key with the chip's KEM key.
func (p *PSP) openRelease(r *Release, uuid [16]byte, keyID string, nonce []byte) (*openedRelease, error) {
	var g Grant
	if err := json.Unmarshal(r.Grant, &g); err != nil {
		return nil, fmt.Errorf("%w: grant: %v", ErrRelease, err)
	}
	end, err := time.Parse(time.RFC3339, g.LeaseEnd)
	switch {
	case g.Version != GrantVersion:
		return nil, fmt.Errorf("%w: grant version %d", ErrRelease, g.Version)
	case err != nil:
		return nil, fmt.Errorf("%w: lease_end: %v", ErrRelease, err)
	case g.KeyID != keyID:
		return nil, fmt.Errorf("%w: grant is for key %q, the certificate names %q", ErrRelease, g.KeyID, keyID)
	case g.ImageUUID != formatUUID(uuid):
		return nil, fmt.Errorf("%w: grant is for image %s", ErrRelease, g.ImageUUID)
	case g.ChipID != hex.EncodeToString(p.id[:]):
		return nil, fmt.Errorf("%w: grant is for another chip", ErrRelease)
	case g.Nonce != hex.EncodeToString(nonce):
		return nil, fmt.Errorf("%w: grant answers another challenge", ErrRelease)
	case !p.now().Before(end):
		return nil, fmt.Errorf("%w: lease ended at %s", ErrLeaseEnded, g.LeaseEnd)
	}
	key, err := hpke.Open(p.kem, hpke.HKDFSHA384(), hpke.AES256GCM(), ReleaseInfo(uuid, p.id, keyID, end, r.Grant), r.SealedKey)
	if err != nil {
		return nil, fmt.Errorf("%w: HPKE open with this chip's key: %v", ErrRelease, err)
	}
	if len(key) != 32 {
		zero(key)
		return nil, fmt.Errorf("%w: released key is %d bytes, want 32", ErrRelease, len(key))
	}
	return &openedRelease{key: key, leaseEnd: end, vms: g.VMs, ms: g.Measurements}, nil
}
