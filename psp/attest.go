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
	FirmwareMeasurement string `json:"firmware_measurement"`
	MeasureAlg          string `json:"measure_alg"`
	FirmwareVerdict     string `json:"firmware_verdict"`
	CertDigest          string `json:"cert_digest"`
	SignatureVerdict    string `json:"signature_verdict"`
	Suite               string `json:"suite"`
	ImageUUID           string `json:"image_uuid"`
	Time                string `json:"time"`
	Nonce               string `json:"nonce"`
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

// Attest signs a report for the VM bound to asid.
func (p *PSP) Attest(asid ASID, nonce []byte) ([]byte, error) {
	p.mu.Lock()
	l := p.launches[asid]
	p.mu.Unlock()
	if l == nil {
		return nil, fmt.Errorf("failed to attest: %w: ASID %d", ErrNoKeyBound, asid)
	}
	return p.AttestLaunch(l, nonce)
}

// AttestLaunch signs a report describing l for a caller's nonce; it returns the envelope JSON.
func (p *PSP) AttestLaunch(l *Launch, nonce []byte) ([]byte, error) {
	if len(nonce) < MinNonce || len(nonce) > MaxNonce {
		return nil, fmt.Errorf("failed to attest: nonce is %d bytes, want %d..%d", len(nonce), MinNonce, MaxNonce)
	}
	sig := "invalid"
	if l.SignatureOK {
		sig = "valid"
	}
	body, err := json.Marshal(ReportBody{
		Version: ReportVersion, ChipID: hex.EncodeToString(p.id[:]), VM: l.VM, ASID: l.ASID,
		FirmwareMeasurement: hex.EncodeToString(l.Measurement), MeasureAlg: l.MeasureAlg.String(),
		FirmwareVerdict: verdict(l.FirmwareOK), CertDigest: hex.EncodeToString(l.CertDigest[:]),
		SignatureVerdict: sig, Suite: l.Suite.String(), ImageUUID: formatUUID(l.UUID),
		Time: p.now().UTC().Format(time.RFC3339), Nonce: hex.EncodeToString(nonce),
	})
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

// VerifyReport checks an envelope: the chip certificate chains to roots, the signature
// verifies with the chip's attestation key, and the nonce is the caller's.
func VerifyReport(envelope []byte, roots *x509.CertPool, nonce []byte) (*ReportBody, error) {
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
	if err := cc.VerifyChain(roots); err != nil {
		return nil, err
	}
	pub, ok := chip.PublicKey.(*ecdsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("%w: chip attestation key is %T, want ECDSA", ErrReportSignature, chip.PublicKey)
	}
	h := sha512.Sum384(env.Body)
	if !ecdsa.VerifyASN1(pub, h[:], env.Signature) {
		return nil, ErrReportSignature
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
		return nil, ErrReportNonce
	}
	return &body, nil
}
