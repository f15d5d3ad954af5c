package psp

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hpke"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/emmansun/gmsm/sm3"

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

// slotState is where an allocated ASID is in its life. Binder calls happen outside p.mu, so
// the states in between keep a concurrent Detach, Attest or Launch off a slot that is being
// loaded or cleared.
type slotState int

const (
	slotBinding  slotState = iota // reserved; LoadKey not yet returned
	slotBound                     // key loaded: attestable, detachable
	slotClearing                  // Detach is in ClearKey
	slotExpired                   // its remote key's lease ended: key cleared, ASID still held
)

type slot struct {
	state  slotState
	launch Launch // the PSP's own record; callers get copies
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

// ReloadTrust re-reads trust/*.pub.
func (p *PSP) ReloadTrust() error {
	files, err := filepath.Glob(filepath.Join(p.dir, TrustDir, "*.pub"))
	if err != nil {
		return fmt.Errorf("failed to list trust store: %w", err)
	}
	trust := make(map[string]crypto.PublicKey)
	for _, f := range files {
		der, pub, err := readPublicKey(f)
		if err != nil {
			return err
		}
		trust[string(der)] = pub
	}
	p.mu.Lock()
	p.trust = trust
	p.mu.Unlock()
	return nil
}

// ProviderAlgOf says which certificate signature algorithm a provider public key signs with
// (FORMAT.md §3.2); other key types and curves cannot sign certificates.
func ProviderAlgOf(pub crypto.PublicKey) (format.SigAlg, error) {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P384() {
			return 0, fmt.Errorf("provider ECDSA key is on %s, want P-384", k.Curve.Params().Name)
		}
		return format.SigECDSAP384, nil
	case ed25519.PublicKey:
		return format.SigEd25519, nil
	}
	return 0, fmt.Errorf("unsupported provider key type %T (want ECDSA P-384 or Ed25519)", pub)
}

// ReadProviderKey reads a provider public key (PKIX PEM, "PUBLIC KEY").
func ReadProviderKey(path string) (crypto.PublicKey, error) {
	_, pub, err := readPublicKey(path)
	return pub, err
}

func readPublicKey(path string) ([]byte, crypto.PublicKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("failed to read public key: %w", err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PUBLIC KEY" {
		return nil, nil, fmt.Errorf("failed to read %s: not a PEM public key", path)
	}
	pub, err := x509.ParsePKIXPublicKey(blk.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("failed to parse %s: %w", path, err)
	}
	if _, err := ProviderAlgOf(pub); err != nil {
		return nil, nil, fmt.Errorf("failed to read %s: %w", path, err)
	}
	return blk.Bytes, pub, nil
}

// AddTrustedProvider copies a provider's PEM public key into dir/trust (for `sealdisk psp
// trust add`). The file is named after the key's digest, so adding a key twice is a no-op.
// A running PSP sees it after ReloadTrust.
func AddTrustedProvider(dir, pubPath string) error {
	der, _, err := readPublicKey(pubPath)
	if err != nil {
		return err
	}
	sum := sha256.Sum256(der)
	dst := filepath.Join(dir, TrustDir, hex.EncodeToString(sum[:8])+".pub")
	if err := os.MkdirAll(filepath.Join(dir, TrustDir), 0o700); err != nil {
		return fmt.Errorf("failed to create trust store: %w", err)
	}
	if _, err := os.Stat(dst); err == nil {
		return nil
	}
	return writeFile(dst, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o644)
}

// TrustStore is a set of provider keys, usable without a chip (inspect).
type TrustStore map[string]crypto.PublicKey

// LoadTrustStore reads *.pub from a directory, or one .pub file.
func LoadTrustStore(path string) (TrustStore, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("failed to open trust store: %w", err)
	}
	files := []string{path}
	if fi.IsDir() {
		if files, err = filepath.Glob(filepath.Join(path, "*.pub")); err != nil {
			return nil, fmt.Errorf("failed to list trust store: %w", err)
		}
	}
	ts := TrustStore{}
	for _, f := range files {
		der, pub, err := readPublicKey(f)
		if err != nil {
			return nil, err
		}
		ts[string(der)] = pub
	}
	return ts, nil
}

// VerifySignature checks a certificate's provider signature against the trust store
// (FORMAT.md §3.4 steps 2–3).
func (ts TrustStore) VerifySignature(c *format.Certificate) error {
	if c.Body == nil {
		panic("BUG: psp: VerifySignature on a certificate without Body (neither parsed nor marshalled)")
	}
	pub, ok := ts[string(c.ProviderKey)]
	if !ok {
		sum := sha256.Sum256(c.ProviderKey)
		return fmt.Errorf("%w: provider key %x… is not in the trust store", ErrUnknownProvider, sum[:8])
	}
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if c.ProviderAlg != format.SigECDSAP384 {
			return fmt.Errorf("%w: certificate says %s but the trusted key is ECDSA", ErrBadSignature, c.ProviderAlg)
		}
		h := sha512.Sum384(c.Body)
		if !ecdsa.VerifyASN1(k, h[:], c.Signature) {
			return fmt.Errorf("%w: ECDSA P-384 signature does not verify over the certificate body", ErrBadSignature)
		}
	case ed25519.PublicKey:
		if c.ProviderAlg != format.SigEd25519 {
			return fmt.Errorf("%w: certificate says %s but the trusted key is Ed25519", ErrBadSignature, c.ProviderAlg)
		}
		if !ed25519.Verify(k, c.Body, c.Signature) {
			return fmt.Errorf("%w: Ed25519 signature does not verify over the certificate body", ErrBadSignature)
		}
	default:
		return fmt.Errorf("%w: unsupported provider key type %T", ErrBadSignature, pub)
	}
	return nil
}

// Verdict is the outcome of certificate verification, for attestation.
type Verdict struct {
	Signature  string // "valid"
	CertDigest [48]byte
}

// VerifyCertificate runs FORMAT.md §3.4 steps 2–6 against this chip, in that order, and
// returns the first refusal. A nil h skips step 6 (inspecting a certificate without its
// image); UnsealImageKey and Launch always pass the image's header.
func (p *PSP) VerifyCertificate(c *format.Certificate, h *format.Header) (*Verdict, error) {
	if c == nil {
		return nil, errors.New("failed to verify certificate: no certificate")
	}
	p.mu.Lock()
	ts := TrustStore(p.trust)
	p.mu.Unlock()
	if err := ts.VerifySignature(c); err != nil {
		return nil, err
	}
	if c.ChipID != p.id {
		return nil, fmt.Errorf("%w: certificate is for chip %x…, this chip is %x…", ErrWrongChip, c.ChipID[:8], p.id[:8])
	}
	now := p.now()
	if now.Before(c.NotBefore) {
		return nil, fmt.Errorf("%w: valid from %s, now %s", ErrNotYetValid, c.NotBefore.Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	if !now.Before(c.NotAfter) {
		return nil, fmt.Errorf("%w: valid until %s, now %s", ErrExpired, c.NotAfter.Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	if h != nil {
		if err := c.CheckHeader(h); err != nil {
			return nil, err
		}
	}
	return &Verdict{Signature: "valid", CertDigest: sha512.Sum384(c.Bytes())}, nil
}

// KeyInfo is the HPKE info binding a sealed image key to an image and a chip (FORMAT §3.3).
func KeyInfo(uuid [16]byte, chipID [32]byte) []byte {
	info := []byte("sealdisk v1 image key")
	info = append(info, uuid[:]...)
	return append(info, chipID[:]...)
}

func (p *PSP) unseal(c *format.Certificate) ([]byte, error) {
	if c.Remote {
		return nil, fmt.Errorf("%w (broker %s, key %s): only a running PSP with a broker client fetches it (sealdisk serve)", ErrRemoteKey, c.BrokerURL, c.KeyID)
	}
	if c.KEM != p.kemID {
		return nil, fmt.Errorf("%w: sealed with KEM %s, chip has %s", ErrKeyUnseal, format.KEMName(c.KEM), format.KEMName(p.kemID))
	}
	kdf, err := hpke.NewKDF(c.KDF)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKeyUnseal, err)
	}
	aead, err := hpke.NewAEAD(c.AEAD)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKeyUnseal, err)
	}
	key, err := hpke.Open(p.kem, kdf, aead, KeyInfo(c.UUID, c.ChipID), c.SealedKey)
	if err != nil {
		return nil, fmt.Errorf("%w: HPKE open with this chip's key and image %s: %v", ErrKeyUnseal, formatUUID(c.UUID), err)
	}
	if len(key) != 32 {
		zero(key)
		return nil, fmt.Errorf("%w: unsealed key is %d bytes, want 32", ErrKeyUnseal, len(key))
	}
	return key, nil
}

// UnsealImageKey verifies the certificate (steps 2–6) and unwraps the image key (step 8), for
// offline tools. The caller zeroises the key.
func (p *PSP) UnsealImageKey(c *format.Certificate, h *format.Header) ([]byte, error) {
	if h == nil {
		return nil, errors.New("failed to unseal image key: no image header to bind the certificate to")
	}
	if _, err := p.VerifyCertificate(c, h); err != nil {
		return nil, err
	}
	return p.unseal(c)
}

// Measure hashes a firmware file (FORMAT.md §9), streaming it: OVMF images are a few MiB
// but nothing stops a larger one.
func Measure(path string, alg format.MeasureAlg) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("failed to measure firmware: %w", err)
	}
	defer f.Close()
	var h interface {
		io.Writer
		Sum([]byte) []byte
	}
	switch alg {
	case format.MeasureSHA384:
		h = sha512.New384()
	case format.MeasureSM3:
		h = sm3.New()
	default:
		return nil, fmt.Errorf("failed to measure firmware: unknown algorithm %d", uint16(alg))
	}
	if _, err := io.Copy(h, f); err != nil {
		return nil, fmt.Errorf("failed to measure firmware %s: %w", path, err)
	}
	return h.Sum(nil), nil
}

// LaunchRequest asks the PSP to admit a VM's disk.
type LaunchRequest struct {
	VM           string
	Cert         *format.Certificate
	Header       *format.Header
	FirmwarePath string
	ASID         ASID // 0 = allocate
}

// Launch is an admitted VM disk: what the PSP checked, for attestation.
type Launch struct {
	VM          string
	ASID        ASID
	Measurement []byte
	MeasureAlg  format.MeasureAlg
	FirmwareOK  bool
	SignatureOK bool
	CertDigest  [48]byte // SHA-384 of the certificate bytes
	Suite       format.Suite
	UUID        [16]byte
	Time        time.Time
}

func (l Launch) clone() *Launch {
	l.Measurement = bytes.Clone(l.Measurement)
	return &l
}

// Launch runs FORMAT.md §3.4 in order: verify (2–6), measure firmware (7; on a mismatch no
// key is unwrapped and the engine is not touched), allocate an ASID, unseal (8), bind the key
// into the engine, zeroise the PSP's copy. Every refusal leaves no ASID allocated.
func (p *PSP) Launch(req LaunchRequest) (*Launch, error) {
	if p.binder == nil {
		return nil, errors.New("failed to launch: this PSP has no engine to bind keys into")
	}
	if req.Cert == nil || req.Header == nil {
		return nil, errors.New("failed to launch: a certificate and the image header are required")
	}
	v, err := p.VerifyCertificate(req.Cert, req.Header)
	if err != nil {
		return nil, err
	}
	m, err := Measure(req.FirmwarePath, req.Cert.MeasureAlg)
	if err != nil {
		return nil, err
	}
	ok := false
	for _, want := range req.Cert.Measurements {
		ok = ok || bytes.Equal(m, want)
	}
	if !ok {
		return nil, fmt.Errorf("%w: %s %s of %s is not among the certificate's %d allowed measurements",
			ErrFirmwareMismatch, req.Cert.MeasureAlg, hex.EncodeToString(m), req.FirmwarePath, len(req.Cert.Measurements))
	}
	l := Launch{
		VM: req.VM, Measurement: m, MeasureAlg: req.Cert.MeasureAlg, FirmwareOK: true,
		SignatureOK: v.Signature == "valid", CertDigest: v.CertDigest, Suite: req.Cert.Suite,
		UUID: req.Cert.UUID, Time: p.now().UTC(),
	}
	asid, err := p.reserve(req.ASID, l)
	if err != nil {
		return nil, err
	}
	roots, err := p.rootsFor(req.Cert)
	if err != nil {
		p.release(asid)
		return nil, err
	}
	var key []byte
	var remote *keyEntry
	if req.Cert.Remote {
		// The report the broker sees is the PSP's own record of this launch, checked up to
		// here: certificate, image and firmware (remote.go).
		key, remote, err = p.acquire(req.Cert, p.reserved(asid))
	} else {
		key, err = p.unseal(req.Cert)
	}
	if err != nil {
		p.release(asid)
		return nil, err
	}
	err = p.binder.LoadKey(asid, Binding{
		Suite: req.Cert.Suite, Key: key, UUID: req.Cert.UUID,
		SectorSize: int(req.Cert.SectorSize), ReadOnly: req.Cert.ReadOnly, Roots: roots,
	})
	zero(key)
	if err != nil {
		if remote != nil {
			p.dropKey(remote)
		}
		p.release(asid)
		return nil, fmt.Errorf("failed to bind key to ASID %d: %w", asid, err)
	}
	p.mu.Lock()
	s := p.slots[asid]
	if s == nil || s.state != slotBinding {
		panic(fmt.Sprintf("BUG: psp: ASID %d changed state while its key was being loaded", asid))
	}
	s.state = slotBound
	out := s.launch.clone()
	p.mu.Unlock()
	if remote != nil && !p.bindKey(remote, asid) {
		return nil, errors.Join(fmt.Errorf("failed to launch VM %q: %w (broker %s, key %s) while it was being bound",
			req.VM, ErrLeaseEnded, req.Cert.BrokerURL, req.Cert.KeyID), p.Detach(asid))
	}
	return out, nil
}

// reserve allocates want (0: the lowest free ASID) in state slotBinding.
func (p *PSP) reserve(want ASID, l Launch) (ASID, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if want == 0 {
		for a := ASID(1); int(a) <= p.maxASIDs; a++ {
			if _, busy := p.slots[a]; !busy {
				want = a
				break
			}
		}
		if want == 0 {
			return 0, fmt.Errorf("%w: all %d ASIDs are bound", ErrASIDExhausted, p.maxASIDs)
		}
	} else {
		if int64(want) > int64(p.maxASIDs) {
			return 0, fmt.Errorf("%w: ASID %d is not in 1..%d", ErrASIDRange, want, p.maxASIDs)
		}
		if s, busy := p.slots[want]; busy {
			return 0, fmt.Errorf("%w: ASID %d is held by VM %q", ErrASIDInUse, want, s.launch.VM)
		}
	}
	l.ASID = want
	p.slots[want] = &slot{state: slotBinding, launch: l}
	return want, nil
}

// reserved returns a copy of the launch record of an ASID in slotBinding.
func (p *PSP) reserved(a ASID) *Launch {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.slots[a].launch.clone()
}

func (p *PSP) release(a ASID) {
	p.mu.Lock()
	delete(p.slots, a)
	p.mu.Unlock()
}

// Detach clears the engine key slot and frees the ASID. An ASID whose launch has not finished
// binding, or which another Detach is clearing, is not bound yet/any more: ErrNoKeyBound.
func (p *PSP) Detach(a ASID) error {
	p.mu.Lock()
	s, ok := p.slots[a]
	if ok && s.state == slotExpired {
		// The lease's end already cleared the engine slot and forgot the ASID's key.
		delete(p.slots, a)
		p.mu.Unlock()
		return nil
	}
	if !ok || s.state != slotBound {
		p.mu.Unlock()
		return fmt.Errorf("failed to detach: %w: ASID %d", ErrNoKeyBound, a)
	}
	s.state = slotClearing
	p.mu.Unlock()
	if err := p.binder.ClearKey(a); err != nil {
		// The engine may still hold the key: keep the ASID bound so the caller can retry
		// and so no other VM is given a slot that is not clean.
		p.mu.Lock()
		s.state = slotBound
		p.mu.Unlock()
		return fmt.Errorf("failed to clear key slot %d: %w", a, err)
	}
	// Before release: once released, a may carry another launch's key.
	p.unbindKey(a)
	p.release(a)
	return nil
}

// Launches lists the bound launches by ASID (copies).
func (p *PSP) Launches() []*Launch {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]*Launch, 0, len(p.slots))
	for _, s := range p.slots {
		if s.state == slotBound {
			out = append(out, s.launch.clone())
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ASID < out[j].ASID })
	return out
}

// bound returns a copy of the launch bound to a, or nil.
func (p *PSP) bound(a ASID) *Launch {
	p.mu.Lock()
	defer p.mu.Unlock()
	if s, ok := p.slots[a]; ok && s.state == slotBound {
		return s.launch.clone()
	}
	return nil
}
