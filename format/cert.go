package format

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// Certificate layout (FORMAT.md §3.1–3.2), big-endian; the body is the signed bytes:
//
//	8 magic "SDCERT01" | 2 version | 2 flags (bit0 read-only, bit1 remote)
//	16 image_uuid | 8 virtual_size | 4 sector_size | 2 data_suite | 2 measure_alg
//	8 not_before | 8 not_after (int64 Unix seconds) | 32 chip_id
//	2 hpke_kem | 2 hpke_kdf | 2 hpke_aead | 2 provider_alg | 2+n provider_key (PKIX DER)
//	2 count + 2 digest_len + count×len measurements
//	4+n sealed_key | 2+n broker_url | 2+n key_id
//	-- end of body --
//	2+n signature; nothing after it

const (
	certFlagReadOnly = 1 << 0
	certFlagRemote   = 1 << 1

	maxProviderKey  = 1024
	maxMeasurements = 64
	maxSealedKey    = 4096
	maxBrokerURL    = 1024
	maxKeyID        = 256
	maxSignature    = 512
	certWhere       = "certificate"
)

// ErrImageMismatch: a certificate is for another image (UUID, size, sector size, suite or
// read-only flag differ from the header).
var ErrImageMismatch = errors.New("certificate does not match the image")

// Validate checks every field rule of FORMAT.md §3.1 on a certificate being built or parsed.
func (c *Certificate) Validate() error {
	bad := func(field, format string, args ...any) error {
		return &FieldError{Where: certWhere, Field: field, Reason: fmt.Sprintf(format, args...)}
	}
	switch {
	case c.UUID == [16]byte{}:
		return bad("image_uuid", "is all zero")
	case c.SectorSize != 512 && c.SectorSize != 4096:
		return bad("sector_size", "must be 512 or 4096, got %d", c.SectorSize)
	case c.VirtualSize == 0 || c.VirtualSize%uint64(c.SectorSize) != 0 || c.VirtualSize > MaxVirtualSize:
		return bad("virtual_size", "must be a positive multiple of the sector size up to 2^50, got %d", c.VirtualSize)
	case !c.Suite.Valid():
		return bad("data_suite", "unknown suite %d", uint16(c.Suite))
	case c.MeasureAlg.DigestSize() == 0:
		return bad("measure_alg", "unknown algorithm %d", uint16(c.MeasureAlg))
	case !c.NotAfter.After(c.NotBefore):
		return bad("not_after", "%s is not after not_before %s", c.NotAfter.UTC().Format(time.RFC3339), c.NotBefore.UTC().Format(time.RFC3339))
	case c.KEM != KEMMLKEM768X25519 && c.KEM != KEMDHKEMP384:
		return bad("hpke_kem", "unsupported KEM 0x%04x", c.KEM)
	case c.KDF != KDFHKDFSHA384:
		return bad("hpke_kdf", "unsupported KDF 0x%04x", c.KDF)
	case c.AEAD != AEADAES256GCM:
		return bad("hpke_aead", "unsupported AEAD 0x%04x", c.AEAD)
	case c.ProviderAlg != SigECDSAP384 && c.ProviderAlg != SigEd25519:
		return bad("provider_alg", "unknown algorithm %d", uint16(c.ProviderAlg))
	case len(c.ProviderKey) == 0 || len(c.ProviderKey) > maxProviderKey:
		return bad("provider_key", "length %d is outside [1, %d]", len(c.ProviderKey), maxProviderKey)
	case len(c.Measurements) == 0 || len(c.Measurements) > maxMeasurements:
		return bad("measurements", "count %d is outside [1, %d]", len(c.Measurements), maxMeasurements)
	}
	for i, m := range c.Measurements {
		if len(m) != c.MeasureAlg.DigestSize() {
			return bad("measurements", "digest %d is %d bytes, %s needs %d", i, len(m), c.MeasureAlg, c.MeasureAlg.DigestSize())
		}
	}
	if c.Remote {
		switch {
		case len(c.SealedKey) != 0:
			return bad("sealed_key", "must be empty when the remote flag is set")
		case len(c.BrokerURL) == 0 || len(c.BrokerURL) > maxBrokerURL || !strings.HasPrefix(c.BrokerURL, "https://"):
			return bad("broker_url", "must be an https:// URL of at most %d bytes, got %q", maxBrokerURL, c.BrokerURL)
		case len(c.KeyID) == 0 || len(c.KeyID) > maxKeyID || !printable(c.KeyID):
			return bad("key_id", "must be 1..%d printable ASCII characters", maxKeyID)
		}
	} else {
		switch {
		case len(c.SealedKey) == 0 || len(c.SealedKey) > maxSealedKey:
			return bad("sealed_key", "length %d is outside [1, %d]", len(c.SealedKey), maxSealedKey)
		case c.BrokerURL != "":
			return bad("broker_url", "must be empty without the remote flag")
		case c.KeyID != "":
			return bad("key_id", "must be empty without the remote flag")
		}
	}
	return nil
}

func printable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x21 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// MarshalBody validates c, encodes the signed body and stores it in c.Body.
func (c *Certificate) MarshalBody() ([]byte, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	var w writer
	w.str(CertMagic)
	w.u16(Version)
	var flags uint16
	if c.ReadOnly {
		flags |= certFlagReadOnly
	}
	if c.Remote {
		flags |= certFlagRemote
	}
	w.u16(flags)
	w.raw(c.UUID[:])
	w.u64(c.VirtualSize)
	w.u32(c.SectorSize)
	w.u16(uint16(c.Suite))
	w.u16(uint16(c.MeasureAlg))
	w.u64(uint64(c.NotBefore.Unix()))
	w.u64(uint64(c.NotAfter.Unix()))
	w.raw(c.ChipID[:])
	w.u16(c.KEM)
	w.u16(c.KDF)
	w.u16(c.AEAD)
	w.u16(uint16(c.ProviderAlg))
	w.u16(uint16(len(c.ProviderKey)))
	w.raw(c.ProviderKey)
	w.u16(uint16(len(c.Measurements)))
	w.u16(uint16(c.MeasureAlg.DigestSize()))
	for _, m := range c.Measurements {
		w.raw(m)
	}
	w.u32(uint32(len(c.SealedKey)))
	w.raw(c.SealedKey)
	w.u16(uint16(len(c.BrokerURL)))
	w.str(c.BrokerURL)
	w.u16(uint16(len(c.KeyID)))
	w.str(c.KeyID)
	c.Body = w.b
	return c.Body, nil
}

// Bytes is the certificate as stored: body || u16 length || signature.
func (c *Certificate) Bytes() []byte {
	if c.Body == nil {
		panic("BUG: format: Certificate.Bytes before MarshalBody or ParseCertificate")
	}
	var w writer
	w.raw(c.Body)
	w.u16(uint16(len(c.Signature)))
	w.raw(c.Signature)
	return w.b
}

// ParseCertificate decodes a stored certificate. Body keeps the exact signed bytes.
func ParseCertificate(b []byte) (*Certificate, error) {
	r := &reader{b: b, where: certWhere}
	c := &Certificate{}
	if m := r.take("magic", 8); m != nil && string(m) != CertMagic {
		r.fail("magic", fmt.Sprintf("is %q, not %q", m, CertMagic))
	}
	if v := r.u16("version"); r.err == nil && v != Version {
		r.fail("version", fmt.Sprintf("unsupported certificate version %d", v))
	}
	flags := r.u16("flags")
	if r.err == nil && flags&^(certFlagReadOnly|certFlagRemote) != 0 {
		r.fail("flags", fmt.Sprintf("unknown bits 0x%04x", flags&^(certFlagReadOnly|certFlagRemote)))
	}
	c.ReadOnly, c.Remote = flags&certFlagReadOnly != 0, flags&certFlagRemote != 0
	copy16(c.UUID[:], r.take("image_uuid", 16))
	c.VirtualSize = r.u64("virtual_size")
	c.SectorSize = r.u32("sector_size")
	c.Suite = Suite(r.u16("data_suite"))
	c.MeasureAlg = MeasureAlg(r.u16("measure_alg"))
	c.NotBefore = time.Unix(int64(r.u64("not_before")), 0).UTC()
	c.NotAfter = time.Unix(int64(r.u64("not_after")), 0).UTC()
	copy16(c.ChipID[:], r.take("chip_id", 32))
	c.KEM = r.u16("hpke_kem")
	c.KDF = r.u16("hpke_kdf")
	c.AEAD = r.u16("hpke_aead")
	c.ProviderAlg = SigAlg(r.u16("provider_alg"))
	c.ProviderKey = clone(r.take("provider_key", int(r.u16("provider_key"))))
	count := int(r.u16("measurements"))
	dlen := int(r.u16("measurements"))
	if r.err == nil && (count == 0 || count > maxMeasurements) {
		r.fail("measurements", fmt.Sprintf("count %d is outside [1, %d]", count, maxMeasurements))
	}
	if r.err == nil && dlen != c.MeasureAlg.DigestSize() {
		r.fail("measurements", fmt.Sprintf("digest length %d does not match %s", dlen, c.MeasureAlg))
	}
	for i := 0; r.err == nil && i < count; i++ {
		c.Measurements = append(c.Measurements, clone(r.take("measurements", dlen)))
	}
	n := r.u32("sealed_key")
	if r.err == nil && n > maxSealedKey {
		r.fail("sealed_key", fmt.Sprintf("length %d exceeds %d", n, maxSealedKey))
	}
	c.SealedKey = clone(r.take("sealed_key", int(n)))
	c.BrokerURL = string(r.take("broker_url", int(r.u16("broker_url"))))
	c.KeyID = string(r.take("key_id", int(r.u16("key_id"))))
	if r.err != nil {
		return nil, r.err
	}
	c.Body = clone(b[:r.off])
	sl := int(r.u16("signature"))
	if r.err == nil && (sl == 0 || sl > maxSignature) {
		r.fail("signature", fmt.Sprintf("length %d is outside [1, %d]", sl, maxSignature))
	}
	c.Signature = clone(r.take("signature", sl))
	if r.err == nil && r.off != len(b) {
		r.fail("signature", fmt.Sprintf("%d trailing bytes after certificate signature", len(b)-r.off))
	}
	if r.err != nil {
		return nil, r.err
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

func clone(b []byte) []byte {
	if b == nil {
		return nil
	}
	return append([]byte{}, b...)
}

// CheckHeader refuses a certificate that is not for this header's image (FORMAT.md §3.4
// step 6), naming the field.
func (c *Certificate) CheckHeader(h *Header) error {
	mismatch := func(field string, cert, hdr any) error {
		return fmt.Errorf("%w: %s is %v in the certificate but %v in the header", ErrImageMismatch, field, cert, hdr)
	}
	switch {
	case c.UUID != h.UUID:
		return mismatch("image_uuid", fmt.Sprintf("%x", c.UUID), fmt.Sprintf("%x", h.UUID))
	case c.VirtualSize != h.VirtualSize:
		return mismatch("virtual_size", c.VirtualSize, h.VirtualSize)
	case c.SectorSize != h.SectorSize:
		return mismatch("sector_size", c.SectorSize, h.SectorSize)
	case c.Suite != h.Suite:
		return mismatch("data_suite", c.Suite, h.Suite)
	case c.ReadOnly != h.ReadOnly:
		return mismatch("read-only flag", c.ReadOnly, h.ReadOnly)
	}
	return nil
}
