package psp

import (
	"crypto"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hpke"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/binary"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/sealdisk/sealdisk/format"
)

// File names in a vendor directory and a PSP (chip) directory.
const (
	VendorKeyFile = "vendor.key"
	VendorCrtFile = "vendor.crt"
	KEMKeyFile    = "kem.key"
	AttestKeyFile = "attest.key"
	ChipCrtFile   = "chip.crt"
	TrustDir      = "trust"

	pemHPKEPrivate = "SEALDISK HPKE PRIVATE KEY"
)

// OIDChipKEM (1.3.6.1.4.1.59999.1.1, a private arc) is the non-critical X.509 extension in a
// chip certificate that carries the chip's HPKE KEM public key: an OCTET STRING holding
// u16 KEM id (big-endian) || the KEM's serialized public key. It is how a provider learns,
// from a vendor-endorsed certificate, which key to seal image keys to. Non-critical so that
// generic X.509 tooling can still parse and chain the certificate.
var OIDChipKEM = asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 59999, 1, 1}

// KEMByID returns the HPKE KEM for a certificate KEM id.
func KEMByID(id uint16) (hpke.KEM, error) {
	switch id {
	case format.KEMMLKEM768X25519:
		return hpke.MLKEM768X25519(), nil
	case format.KEMDHKEMP384:
		return hpke.DHKEM(ecdh.P384()), nil
	}
	return nil, fmt.Errorf("unsupported HPKE KEM 0x%04x", id)
}

// ParseKEM maps "mlkem768x25519" or "p384" to a KEM id.
func ParseKEM(name string) (uint16, error) {
	switch name {
	case "mlkem768x25519", "mlkem768-x25519", "":
		return format.KEMMLKEM768X25519, nil
	case "p384", "dhkem-p384":
		return format.KEMDHKEMP384, nil
	}
	return 0, fmt.Errorf("unknown KEM %q (want mlkem768x25519 or p384)", name)
}

// ChipIDOf is FORMAT.md §3.3's chip id: SHA-256 of the KEM public key bytes.
func ChipIDOf(pub hpke.PublicKey) [32]byte { return sha256.Sum256(pub.Bytes()) }

// zero overwrites a copy of key material we hold. Every secret this package reads or unwraps
// goes through it once the secret has been used.
func zero(b []byte) { clear(b) }

// WritePrivateFile creates path with mode 0600 holding data, synced; it never overwrites (a
// secret's file, read back with ReadPrivateFile).
func WritePrivateFile(path string, data []byte) error { return writeFile(path, data, 0o600) }

func writeFile(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return fmt.Errorf("failed to create %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("failed to write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("failed to sync %s: %w", path, err)
	}
	return f.Close()
}

// WritePrivatePEM stores a private key (PKCS#8) with mode 0600; it never overwrites.
func WritePrivatePEM(path string, key crypto.Signer) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("failed to encode private key: %w", err)
	}
	return writeFile(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
}

// ErrKeyFileMode: a private key file is readable by group or others.
var ErrKeyFileMode = errors.New("private key file permissions are too open")

// ReadPrivateFile reads a secret file, refusing one whose mode is wider than 0600.
func ReadPrivateFile(path string) ([]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("failed to read private key: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%w: %s has mode %04o, want 0600", ErrKeyFileMode, path, fi.Mode().Perm())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("failed to read private key: %w", err)
	}
	return b, nil
}

// LoadSigner reads a PKCS#8 PEM private key file (mode 0600) as a crypto.Signer.
func LoadSigner(path string) (crypto.Signer, error) {
	b, err := ReadPrivateFile(path)
	if err != nil {
		return nil, err
	}
	defer zero(b)
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("failed to load %s: not a PKCS#8 PEM private key", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	zero(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("failed to load %s: %w", path, err)
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("failed to load %s: key type %T cannot sign", path, k)
	}
	return s, nil
}

// ReadCertificate reads one PEM certificate.
func ReadCertificate(path string) (*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("failed to read certificate: %w", err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("failed to read %s: not a PEM certificate", path)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("failed to parse %s: %w", path, err)
	}
	return c, nil
}

func certPEM(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func serial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}

// Vendor is a vendor root CA: it endorses chips (InitChip).
type Vendor struct {
	Cert *x509.Certificate
	Key  crypto.Signer
}

// LoadVendor reads dir/vendor.crt and dir/vendor.key (mode 0600) and checks that they are a
// pair, so a chip is never endorsed by a key the root does not name.
func LoadVendor(dir string) (*Vendor, error) {
	cert, err := ReadCertificate(filepath.Join(dir, VendorCrtFile))
	if err != nil {
		return nil, err
	}
	if !cert.IsCA {
		return nil, fmt.Errorf("failed to load vendor %s: %s is not a CA certificate", dir, VendorCrtFile)
	}
	key, err := LoadSigner(filepath.Join(dir, VendorKeyFile))
	if err != nil {
		return nil, err
	}
	pub, ok := key.Public().(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P384() {
		return nil, fmt.Errorf("failed to load vendor %s: %s is %T, want ECDSA P-384", dir, VendorKeyFile, key.Public())
	}
	if !pub.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("failed to load vendor %s: %s does not match %s", dir, VendorKeyFile, VendorCrtFile)
	}
	return &Vendor{Cert: cert, Key: key}, nil
}

// refuseExisting keeps an init from leaving a half-overwritten identity behind: either all
// of its files are new, or it writes nothing.
func refuseExisting(dir string, names ...string) error {
	for _, n := range names {
		if _, err := os.Lstat(filepath.Join(dir, n)); err == nil {
			return fmt.Errorf("refusing to overwrite %s", filepath.Join(dir, n))
		}
	}
	return nil
}

// InitVendor creates a development vendor root CA in dir: vendor.key (0600), vendor.crt.
// A real deployment points sealdisk at its vendor's root instead.
func InitVendor(dir, name string) error {
	if name == "" {
		name = "sealdisk development vendor"
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("failed to create vendor directory: %w", err)
	}
	if err := refuseExisting(dir, VendorKeyFile, VendorCrtFile); err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		return fmt.Errorf("failed to generate vendor key: %w", err)
	}
	sn, err := serial()
	if err != nil {
		return err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          sn,
		Subject:               pkix.Name{CommonName: name, Organization: []string{"sealdisk vendor"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return fmt.Errorf("failed to create vendor certificate: %w", err)
	}
	if err := WritePrivatePEM(filepath.Join(dir, VendorKeyFile), key); err != nil {
		return err
	}
	return writeFile(filepath.Join(dir, VendorCrtFile), certPEM(der), 0o644)
}

// InitChip creates a chip identity in dir, endorsed by the vendor in vendorDir: kem.key
// (HPKE private key, 0600), attest.key (ECDSA P-384, 0600), chip.crt (vendor-signed, carrying
// the KEM public key in OIDChipKEM), vendor.crt (the root, for chain building) and trust/.
func InitChip(dir, vendorDir string, kemID uint16) error {
	kem, err := KEMByID(kemID)
	if err != nil {
		return err
	}
	v, err := LoadVendor(vendorDir)
	if err != nil {
		return err
	}
	vcert, vkey := v.Cert, v.Key
	if err := refuseExisting(dir, KEMKeyFile, AttestKeyFile, ChipCrtFile, VendorCrtFile, RootKeyFile); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(dir, TrustDir), 0o700); err != nil {
		return fmt.Errorf("failed to create PSP directory: %w", err)
	}
	kpriv, err := kem.GenerateKey()
	if err != nil {
		return fmt.Errorf("failed to generate HPKE key: %w", err)
	}
	kbytes, err := kpriv.Bytes()
	if err != nil {
		return fmt.Errorf("failed to encode HPKE key: %w", err)
	}
	defer zero(kbytes)
	akey, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		return fmt.Errorf("failed to generate attestation key: %w", err)
	}
	pub := kpriv.PublicKey()
	id := ChipIDOf(pub)
	ext := binary.BigEndian.AppendUint16(nil, kemID)
	ext = append(ext, pub.Bytes()...)
	extDER, err := asn1.Marshal(ext)
	if err != nil {
		return fmt.Errorf("failed to encode KEM extension: %w", err)
	}
	sn, err := serial()
	if err != nil {
		return err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:    sn,
		Subject:         pkix.Name{CommonName: hex.EncodeToString(id[:]), Organization: []string{"sealdisk PSP"}},
		NotBefore:       now.Add(-time.Hour),
		NotAfter:        vcert.NotAfter,
		KeyUsage:        x509.KeyUsageDigitalSignature,
		ExtraExtensions: []pkix.Extension{{Id: OIDChipKEM, Value: extDER}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, vcert, akey.Public(), vkey)
	if err != nil {
		return fmt.Errorf("failed to create chip certificate: %w", err)
	}
	kpem := pem.EncodeToMemory(&pem.Block{Type: pemHPKEPrivate, Headers: map[string]string{"KEM": strconv.Itoa(int(kemID))}, Bytes: kbytes})
	err = writeFile(filepath.Join(dir, KEMKeyFile), kpem, 0o600)
	zero(kpem)
	if err != nil {
		return err
	}
	if err := WritePrivatePEM(filepath.Join(dir, AttestKeyFile), akey); err != nil {
		return err
	}
	if err := writeFile(filepath.Join(dir, ChipCrtFile), certPEM(der), 0o644); err != nil {
		return err
	}
	if err := writeFile(filepath.Join(dir, VendorCrtFile), certPEM(vcert.Raw), 0o644); err != nil {
		return err
	}
	k, err := loadRootKey(dir)
	zero(k)
	return err
}

func loadKEMKey(path string) (hpke.PrivateKey, uint16, error) {
	b, err := ReadPrivateFile(path)
	if err != nil {
		return nil, 0, err
	}
	defer zero(b)
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != pemHPKEPrivate {
		return nil, 0, fmt.Errorf("failed to load %s: not a %s", path, pemHPKEPrivate)
	}
	defer zero(blk.Bytes)
	id, err := strconv.ParseUint(blk.Headers["KEM"], 10, 16)
	if err != nil {
		return nil, 0, fmt.Errorf("failed to load %s: bad KEM header: %w", path, err)
	}
	kem, err := KEMByID(uint16(id))
	if err != nil {
		return nil, 0, fmt.Errorf("failed to load %s: %w", path, err)
	}
	k, err := kem.NewPrivateKey(blk.Bytes)
	if err != nil {
		return nil, 0, fmt.Errorf("failed to load %s: %w", path, err)
	}
	return k, uint16(id), nil
}

// ChipCert is a parsed chip certificate: the attestation key's X.509 certificate and the
// HPKE public key it endorses. ParseChipCert checks that the pieces agree (KEM matches
// KEMID, ID is the public key's chip id and the subject CN); it does not check the chain,
// which needs the verifier's choice of vendor root (VerifyChain).
type ChipCert struct {
	Cert      *x509.Certificate
	KEM       hpke.KEM
	KEMID     uint16 // == KEM.ID(), the certificate's hpke_kem
	PublicKey hpke.PublicKey
	ID        [32]byte
}

// ErrChipChain: a chip certificate is not endorsed by the given vendor root(s).
var ErrChipChain = errors.New("chip certificate does not chain to the vendor root")

// ParseChipCert parses a PEM chip certificate and its KEM extension.
func ParseChipCert(pemBytes []byte) (*ChipCert, error) {
	blk, _ := pem.Decode(pemBytes)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, errors.New("failed to parse chip certificate: not a PEM certificate")
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("failed to parse chip certificate: %w", err)
	}
	return chipCertFrom(c)
}

func chipCertFrom(c *x509.Certificate) (*ChipCert, error) {
	for _, e := range c.Extensions {
		if !e.Id.Equal(OIDChipKEM) {
			continue
		}
		var raw []byte
		if rest, err := asn1.Unmarshal(e.Value, &raw); err != nil || len(rest) != 0 || len(raw) < 3 {
			return nil, errors.New("failed to parse chip certificate: malformed KEM extension")
		}
		id := binary.BigEndian.Uint16(raw)
		kem, err := KEMByID(id)
		if err != nil {
			return nil, fmt.Errorf("failed to parse chip certificate: %w", err)
		}
		pub, err := kem.NewPublicKey(raw[2:])
		if err != nil {
			return nil, fmt.Errorf("failed to parse chip certificate KEM key: %w", err)
		}
		cc := &ChipCert{Cert: c, KEM: kem, KEMID: id, PublicKey: pub, ID: ChipIDOf(pub)}
		// The attestation key signs reports (ECDSA P-384, attest.go); the CN names the chip
		// so that a human reading the certificate sees the id certificates are sealed to.
		if ak, ok := c.PublicKey.(*ecdsa.PublicKey); !ok || ak.Curve != elliptic.P384() {
			return nil, fmt.Errorf("failed to parse chip certificate: attestation key is %T, want ECDSA P-384", c.PublicKey)
		}
		if want := hex.EncodeToString(cc.ID[:]); c.Subject.CommonName != want {
			return nil, fmt.Errorf("failed to parse chip certificate: subject CN %q is not the chip id %s", c.Subject.CommonName, want)
		}
		return cc, nil
	}
	return nil, errors.New("failed to parse chip certificate: no sealdisk KEM extension (not a chip certificate)")
}

// VerifyChain checks that the chip certificate was issued by one of roots and is within its
// validity period now. A provider calls it before sealing a key to the chip.
func (c *ChipCert) VerifyChain(roots *x509.CertPool) error {
	return c.verifyChain(roots, nil)
}

func (c *ChipCert) verifyChain(roots, intermediates *x509.CertPool) error {
	if roots == nil {
		// A nil Roots would mean "the system roots": never what a sealdisk verifier wants.
		return fmt.Errorf("%w: no vendor root given", ErrChipChain)
	}
	_, err := c.Cert.Verify(x509.VerifyOptions{
		Roots: roots, Intermediates: intermediates,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return fmt.Errorf("%w: chip %x…: %v", ErrChipChain, c.ID[:8], err)
	}
	return nil
}

// RootPool makes a pool holding one vendor root.
func RootPool(root *x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(root)
	return p
}
