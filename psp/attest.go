package psp

import (
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha512"
	"crypto/subtle"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"time"
)

// Attestation report (docs/ATTESTATION.md). The body is JSON serialised once; the envelope
// carries those exact bytes (base64), an ECDSA P-384 signature over SHA-384(body) by the
// chip's attestation key, and the chip certificate for chain building to a vendor root.

// ReportVersion is the version of the report body.
const ReportVersion = 1

// Nonce length bounds.
const (
	MinNonce = 16
	MaxNonce = 64
)

var (
	ErrReportChain     = errors.New("attestation chain does not verify to the vendor root")
	ErrReportSignature = errors.New("attestation report signature does not verify")
	ErrReportNonce     = errors.New("attestation report nonce does not match")
	ErrReportFormat    = errors.New("malformed attestation report")
)

// ReportBody is what the chip attests to.
type ReportBody struct {
	Version             int    `json:"version"`
	ChipID              string `json:"chip_id"`
	VM                  string `json:"vm"`
	ASID                ASID   `json:"asid"`
	Disk                int    `json:"disk,omitempty"` // which of the VM's disks (disks[] order, nvram last); absent: the first
	FirmwareMeasurement string `json:"firmware_measurement"`
	MeasureAlg          string `json:"measure_alg"`
	FirmwareVerdict     string `json:"firmware_verdict"`
	CertDigest          string `json:"cert_digest"`
	SignatureVerdict    string `json:"signature_verdict"`
	Suite               string `json:"suite"`
	ImageUUID           string `json:"image_uuid"`
	Time                string `json:"time"`
	Nonce               string `json:"nonce"`
	// The image's rollback counter and integrity-tree root as the PSP last recorded them
	// (version-2 images, FORMAT.md §8): a verifier can pin them. Absent for version 1.
	ImageCounter *uint64 `json:"image_counter,omitempty"`
	ImageRoot    string  `json:"image_root,omitempty"`
}

// Envelope is a signed report as written to a file.
type Envelope struct {
	Body      []byte   `json:"body"`      // exact signed bytes (base64 in JSON)
	Signature []byte   `json:"signature"` // ASN.1 ECDSA P-384 over SHA-384(body)
	Chain     []string `json:"chain"`     // PEM chip certificate
}

func verdict(ok bool) string {
	if ok {
		return "match"
	}
	return "mismatch"
}

// ErrNonceLength: a nonce outside MinNonce..MaxNonce bytes.
var ErrNonceLength = fmt.Errorf("nonce must be %d..%d bytes", MinNonce, MaxNonce)

// Attest signs a report for the VM bound to asid; it returns the envelope JSON.
func (p *PSP) Attest(asid ASID, nonce []byte) ([]byte, error) {
	if err := checkNonce(nonce); err != nil {
		return nil, fmt.Errorf("failed to attest: %w", err)
	}
	l := p.bound(asid)
	if l == nil {
		return nil, fmt.Errorf("failed to attest: %w: ASID %d", ErrNoKeyBound, asid)
	}
	return p.sign(l, nonce)
}

// AttestLaunch signs a report for l, a launch this PSP returned, for a caller's nonce. The
// report is made from the PSP's own record, never from l's fields: the chip signs only what
// it checked. l must still be bound (the same launch, not a later one on its ASID).
func (p *PSP) AttestLaunch(l *Launch, nonce []byte) ([]byte, error) {
	if err := checkNonce(nonce); err != nil {
		return nil, fmt.Errorf("failed to attest: %w", err)
	}
	if l == nil {
		return nil, errors.New("failed to attest: no launch")
	}
	slot := l.Slot // the launch's own key slot: disk N of a VM is not its disk 0
	if slot == 0 {
		slot = l.ASID
	}
	rec := p.bound(slot)
	if rec == nil || rec.CertDigest != l.CertDigest || rec.VM != l.VM || !rec.Time.Equal(l.Time) {
		return nil, fmt.Errorf("failed to attest VM %q: %w: its launch on ASID %d is no longer bound", l.VM, ErrNoKeyBound, l.ASID)
	}
	return p.sign(rec, nonce)
}

func checkNonce(nonce []byte) error {
	if len(nonce) < MinNonce || len(nonce) > MaxNonce {
		return fmt.Errorf("%w, got %d", ErrNonceLength, len(nonce))
	}
	return nil
}

// sign serialises the body once and signs those bytes; the envelope carries them verbatim so
// a verifier never re-encodes JSON before checking the signature.
func (p *PSP) sign(l *Launch, nonce []byte) ([]byte, error) {
	sig := "invalid"
	if l.SignatureOK {
		sig = "valid"
	}
	rb := ReportBody{
		Version: ReportVersion, ChipID: hex.EncodeToString(p.id[:]), VM: l.VM, ASID: l.ASID, Disk: l.Disk,
		FirmwareMeasurement: hex.EncodeToString(l.Measurement), MeasureAlg: l.MeasureAlg.String(),
		FirmwareVerdict: verdict(l.FirmwareOK), CertDigest: hex.EncodeToString(l.CertDigest[:]),
		SignatureVerdict: sig, Suite: l.Suite.String(), ImageUUID: formatUUID(l.UUID),
		Time: p.now().UTC().Format(time.RFC3339), Nonce: hex.EncodeToString(nonce),
	}
	if counter, root, ok := p.ImageState(l.UUID); ok {
		rb.ImageCounter, rb.ImageRoot = &counter, hex.EncodeToString(root[:])
	}
	body, err := json.Marshal(rb)
	if err != nil {
		return nil, fmt.Errorf("failed to encode report: %w", err)
	}
	h := sha512.Sum384(body)
	s, err := p.attest.Sign(rand.Reader, h[:], nil)
	if err != nil {
		return nil, fmt.Errorf("failed to sign report: %w", err)
	}
	return json.MarshalIndent(Envelope{Body: body, Signature: s, Chain: []string{string(p.chipPEM)}}, "", "  ")
}

func formatUUID(u [16]byte) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// VerifyReport checks an envelope: the chip certificate (chain[0]; any further entries are
// intermediates) chains to roots, the signature verifies with the chip's attestation key, the
// body is for that chip, and the nonce is the caller's. Each failure has its own sentinel:
// ErrReportFormat, ErrReportChain, ErrReportSignature, ErrReportNonce.
func VerifyReport(envelope []byte, roots *x509.CertPool, nonce []byte) (*ReportBody, error) {
	if err := checkNonce(nonce); err != nil {
		return nil, fmt.Errorf("failed to verify report: %w", err)
	}
	var env Envelope
	if err := json.Unmarshal(envelope, &env); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrReportFormat, err)
	}
	if len(env.Chain) == 0 {
		return nil, fmt.Errorf("%w: no chip certificate in chain", ErrReportFormat)
	}
	blk, _ := pem.Decode([]byte(env.Chain[0]))
	if blk == nil {
		return nil, fmt.Errorf("%w: chain entry is not PEM", ErrReportFormat)
	}
	chip, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrReportFormat, err)
	}
	cc, err := chipCertFrom(chip)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrReportFormat, err)
	}
	inter := x509.NewCertPool()
	for i, s := range env.Chain[1:] {
		blk, _ := pem.Decode([]byte(s))
		if blk == nil {
			return nil, fmt.Errorf("%w: chain entry %d is not PEM", ErrReportFormat, i+1)
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%w: chain entry %d: %v", ErrReportFormat, i+1, err)
		}
		inter.AddCert(c)
	}
	if err := cc.verifyChain(roots, inter); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrReportChain, err)
	}
	pub, ok := chip.PublicKey.(*ecdsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("%w: chip attestation key is %T, want ECDSA", ErrReportSignature, chip.PublicKey)
	}
	h := sha512.Sum384(env.Body)
	if !ecdsa.VerifyASN1(pub, h[:], env.Signature) {
		return nil, fmt.Errorf("%w: not signed by chip %x…'s attestation key", ErrReportSignature, cc.ID[:8])
	}
	var body ReportBody
	if err := json.Unmarshal(env.Body, &body); err != nil {
		return nil, fmt.Errorf("%w: body: %v", ErrReportFormat, err)
	}
	if body.Version != ReportVersion {
		return nil, fmt.Errorf("%w: unsupported report version %d", ErrReportFormat, body.Version)
	}
	if body.ChipID != hex.EncodeToString(cc.ID[:]) {
		return nil, fmt.Errorf("%w: report chip id %s is not the certificate's", ErrReportSignature, body.ChipID)
	}
	got, err := hex.DecodeString(body.Nonce)
	if err != nil || subtle.ConstantTimeCompare(got, nonce) != 1 {
		return nil, fmt.Errorf("%w: the report answers another challenge (a replay?)", ErrReportNonce)
	}
	return &body, nil
}
