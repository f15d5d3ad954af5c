package psp

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/hpke"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/sealdisk/sealdisk/format"
)

// Refusal reasons; each has its own sentinel so callers and tests can branch on it.
var (
	ErrUnknownProvider  = errors.New("unknown provider")
	ErrBadSignature     = errors.New("bad certificate signature")
	ErrWrongChip        = errors.New("certificate is sealed to another chip")
	ErrExpired          = errors.New("certificate expired")
	ErrNotYetValid      = errors.New("certificate not yet valid")
	ErrImageMismatch    = format.ErrImageMismatch
	ErrFirmwareMismatch = errors.New("firmware measurement not allowed by the certificate")
	ErrASIDExhausted    = errors.New("ASID pool exhausted")
	ErrASIDInUse        = errors.New("ASID already in use")
	ErrASIDRange        = errors.New("ASID outside the pool")
	ErrKeyUnseal        = errors.New("failed to unseal image key")
	ErrRemoteKey        = errors.New("certificate references a remote key broker")
	ErrNoKeyBound       = errors.New("no key bound to this ASID")
)

// ASID is an address-space id: one per attached VM.
type ASID uint32

// Binding is what the PSP loads into an engine key slot.
type Binding struct {
	Suite      format.Suite
	Key        []byte // the 32-byte image key; the binder must copy it
	UUID       [16]byte
	SectorSize int
	ReadOnly   bool
	// Roots authenticates the image's root records and keeps its rollback counter (version-2
	// images); its key stays in the PSP.
	Roots RootKeeper
}

// KeyBinder is the engine side of key binding: only the PSP calls it. LoadKey must copy
// b.Key (the PSP zeroises its copy when LoadKey returns, so a binder that keeps the slice
// keeps zeros); ClearKey zeroises the slot. The PSP never calls LoadKey for an ASID that is
// bound, nor ClearKey for one that is not, and never both at once for the same ASID.
type KeyBinder interface {
	LoadKey(asid ASID, b Binding) error
	ClearKey(asid ASID) error
}

// DefaultASIDs is the pool size (as SEV's 509 guest ASIDs).
const DefaultASIDs = 509

// Options configure Open.
type Options struct {
	ASIDs  int              // pool size; 0 = DefaultASIDs
	Now    func() time.Time // clock; nil = time.Now
	Binder KeyBinder        // nil: Launch refuses
	// Fetcher fetches the keys of certificates that reference a key broker (keycache.go);
	// nil: such launches fail with ErrRemoteKey.
	Fetcher KeyFetcher
	// FetchTimeout bounds one fetch, retries included; 0 = 30 s.
	FetchTimeout time.Duration
	Logger       *slog.Logger // remote-key lease events; nil = discard
	// OnLeaseEnd is called (in its own goroutine's time, outside the PSP's locks) after a
	// remote key's lease ended unrenewed and the PSP cleared vm's engine slot at asid; the
	// ASID stays allocated until Detach. Nil: nothing is called.
	OnLeaseEnd func(asid ASID, vm string)
}

// PSP is one chip. It is safe for concurrent use.
type PSP struct {
	dir          string
	kem          hpke.PrivateKey
	kemID        uint16
	id           [32]byte
	attest       crypto.Signer
	chip         *x509.Certificate
	chipPEM      []byte
	vendor       *x509.Certificate
	now          func() time.Time
	binder       KeyBinder
	maxASIDs     int
	rootKey      []byte // RootKeyFile: derives each image's root MAC key (roots.go)
	counters     counterStore
	identity     map[string][32]byte // digests of the identity files as loaded (reload.go)
	fetcher      KeyFetcher
	fetchTimeout time.Duration
	onLeaseEnd   func(ASID, string)
	log          *slog.Logger
	keys         keyCache // remote keys (keycache.go)

	mu     sync.Mutex                  // guards trust, slots, images
	trust  map[string]crypto.PublicKey // PKIX DER → key
	slots  map[ASID]*slot              // an ASID is allocated iff it has a slot
	images map[[16]byte]imageState     // latest counter and root per image (attestation)
}

// Open loads the chip identity and trust store from dir.
func Open(dir string, opts Options) (*PSP, error) {
	kem, kemID, err := loadKEMKey(filepath.Join(dir, KEMKeyFile))
	if err != nil {
		return nil, err
	}
	attest, err := LoadSigner(filepath.Join(dir, AttestKeyFile))
	if err != nil {
		return nil, err
	}
	chipPEM, err := os.ReadFile(filepath.Join(dir, ChipCrtFile))
	if err != nil {
		return nil, fmt.Errorf("failed to read chip certificate: %w", err)
	}
	cc, err := ParseChipCert(chipPEM)
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(cc.PublicKey.Bytes(), kem.PublicKey().Bytes()) {
		return nil, fmt.Errorf("failed to open PSP %s: chip.crt does not endorse kem.key", dir)
	}
	vendor, err := ReadCertificate(filepath.Join(dir, VendorCrtFile))
	if err != nil {
		return nil, err
	}
	// A chip whose reports no verifier could accept is a broken installation: say so now
	// rather than at the first attestation.
	if ak, ok := attest.Public().(*ecdsa.PublicKey); !ok || !ak.Equal(cc.Cert.PublicKey) {
		return nil, fmt.Errorf("failed to open PSP %s: %s does not match %s", dir, AttestKeyFile, ChipCrtFile)
	}
	if err := cc.Cert.CheckSignatureFrom(vendor); err != nil {
		return nil, fmt.Errorf("failed to open PSP %s: %s is not signed by %s: %w", dir, ChipCrtFile, VendorCrtFile, err)
	}
	p := &PSP{
		dir: dir, kem: kem, kemID: kemID, id: cc.ID, attest: attest,
		chip: cc.Cert, chipPEM: chipPEM, vendor: vendor,
		now: opts.Now, binder: opts.Binder, maxASIDs: opts.ASIDs,
		slots: make(map[ASID]*slot), fetcher: opts.Fetcher, fetchTimeout: opts.FetchTimeout, log: opts.Logger, onLeaseEnd: opts.OnLeaseEnd,
	}
	if p.fetchTimeout <= 0 {
		p.fetchTimeout = 30 * time.Second
	}
	if p.log == nil {
		p.log = discardLogger
	}
	if p.now == nil {
		p.now = time.Now
	}
	if p.rootKey, err = loadRootKey(dir); err != nil {
		return nil, err
	}
	p.counters.dir = dir
	if p.maxASIDs <= 0 {
		p.maxASIDs = DefaultASIDs
	}
	if p.identity, err = identityDigests(dir); err != nil {
		return nil, err
	}
	if err := p.ReloadTrust(); err != nil {
		return nil, err
	}
	return p, nil
}

// ID is the chip id (FORMAT.md §3.3).
func (p *PSP) ID() [32]byte { return p.id }

// KEMID is the chip's HPKE KEM id.
func (p *PSP) KEMID() uint16 { return p.kemID }

// Vendor is the vendor root this chip's certificate chains to.
func (p *PSP) Vendor() *x509.Certificate { return p.vendor }

// MaxASIDs is the size of the ASID pool (ASIDs 1..MaxASIDs).
func (p *PSP) MaxASIDs() int { return p.maxASIDs }

// ChipPEM is the chip certificate.
func (p *PSP) ChipPEM() []byte { return p.chipPEM }
