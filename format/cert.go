package format

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"
)

// Certificate layout (FORMAT.md §3.1–§3.2), big-endian. The body is the signed bytes.
//
//	size     field          rule
//	8        magic          "SDCERT01"
//	2        version        1
//	2        flags          bit 0 read-only, bit 1 remote key; other bits 0
//	16       image_uuid     as the header (version-4 UUID, not all zero)
//	8        virtual_size   as the header
//	4        sector_size    as the header (512 or 4096)
//	2        data_suite     1..3
//	2        measure_alg    1 SHA-384 (48-byte digests), 2 SM3 (32-byte digests)
//	8        not_before     int64 Unix seconds
//	8        not_after      int64 Unix seconds; > not_before
//	32       chip_id        SHA-256 of the chip's HPKE public key
//	2        hpke_kem       0x647a ML-KEM-768+X25519 or 0x0011 DHKEM(P-384)
//	2        hpke_kdf       0x0002 HKDF-SHA384
//	2        hpke_aead      0x0002 AES-256-GCM
//	2        provider_alg   1 ECDSA P-384/SHA-384, 2 Ed25519
//	2+n      provider_key   PKIX DER, 1 ≤ n ≤ 1024
//	2+2+m·d  measurements   count m (1..64), digest length d (matching measure_alg), digests
//	4+n      sealed_key     HPKE enc||ct; n = 0 iff remote; n ≤ 4096
//	2+n      broker_url     https:// URL, n ≤ 1024; n = 0 iff not remote
//	2+n      key_id         printable ASCII, n ≤ 256; n = 0 iff not remote
//	-------- end of body --------
//	2+n      signature      1 ≤ n ≤ 512; nothing may follow

const (
	certFlagReadOnly = 1 << 0
	certFlagRemote   = 1 << 1
	certFlagsKnown   = certFlagReadOnly | certFlagRemote

	maxProviderKey  = 1024
	maxMeasurements = 64
	maxSealedKey    = 4096
	maxBrokerURL    = 1024
	maxKeyID        = 256
	maxSignature    = 512
	certWhere       = "certificate"
)

// ErrImageMismatch: a certificate is for another image (UUID, size, sector size, suite or
// read-only flag differ from the header). FORMAT.md §3.4 step 6.
var ErrImageMismatch = errors.New("certificate does not match the image")

func ruleMeasureAlg(a MeasureAlg) string {
	if a.DigestSize() == 0 {
		return fmt.Sprintf("unknown algorithm %d", uint16(a))
	}
	return ""
}

func ruleValidity(notBefore, notAfter int64) string {
	if notAfter <= notBefore {
		return fmt.Sprintf("%s is not after not_before %s",
			time.Unix(notAfter, 0).UTC().Format(time.RFC3339), time.Unix(notBefore, 0).UTC().Format(time.RFC3339))
	}
	return ""
}

func ruleKEM(id uint16) string {
	if id != KEMMLKEM768X25519 && id != KEMDHKEMP384 {
		return fmt.Sprintf("unsupported KEM 0x%04x", id)
	}
	return ""
}

func ruleKDF(id uint16) string {
	if id != KDFHKDFSHA384 {
		return fmt.Sprintf("unsupported KDF 0x%04x", id)
	}
	return ""
}

func ruleAEAD(id uint16) string {
	if id != AEADAES256GCM {
		return fmt.Sprintf("unsupported AEAD 0x%04x", id)
	}
	return ""
}

func ruleProviderAlg(a SigAlg) string {
	if !a.Valid() {
		return fmt.Sprintf("unknown algorithm %d", uint16(a))
	}
	return ""
}

// ruleProviderKey: the spec only caps n, but a PKIX DER key is never empty.
func ruleProviderKey(n int) string {
	if n == 0 || n > maxProviderKey {
		return fmt.Sprintf("length %d is outside [1, %d]", n, maxProviderKey)
	}
	return ""
}

func ruleMeasurements(count, digestLen int, a MeasureAlg) string {
	switch {
	case count == 0 || count > maxMeasurements:
		return fmt.Sprintf("count %d is outside [1, %d]", count, maxMeasurements)
	case digestLen != a.DigestSize():
		return fmt.Sprintf("digest length %d does not match %s (%d bytes)", digestLen, a, a.DigestSize())
	}
	return ""
}

func ruleSealedKey(n uint64, remote bool) string {
	switch {
	case remote && n != 0:
		return fmt.Sprintf("must be empty when the remote flag is set, got %d bytes", n)
	case !remote && n == 0:
		return "is empty but the remote flag is clear"
	case n > maxSealedKey:
		return fmt.Sprintf("length %d exceeds %d", n, maxSealedKey)
	}
	return ""
}

func ruleBrokerURL(s string, remote bool) string {
	switch {
	case !remote && s != "":
		return "must be empty without the remote flag"
	case !remote:
		return ""
	case s == "":
		return "is empty but the remote flag is set"
	case len(s) > maxBrokerURL:
		return fmt.Sprintf("length %d exceeds %d", len(s), maxBrokerURL)
	case !strings.HasPrefix(s, "https://") || !asciiIn(s, 0x21, 0x7e):
		return fmt.Sprintf("%q is not an https:// URL", s)
	}
	if u, err := url.Parse(s); err != nil || u.Host == "" {
		return fmt.Sprintf("%q is not an https:// URL with a host", s)
	}
	return ""
}

// ruleKeyID: "printable ASCII" is 0x20..0x7e, space included.
func ruleKeyID(s string, remote bool) string {
	switch {
	case !remote && s != "":
		return "must be empty without the remote flag"
	case !remote:
		return ""
	case s == "":
		return "is empty but the remote flag is set"
	case len(s) > maxKeyID:
		return fmt.Sprintf("length %d exceeds %d", len(s), maxKeyID)
	case !asciiIn(s, 0x20, 0x7e):
		return fmt.Sprintf("%q is not printable ASCII", s)
	}
	return ""
}

// ruleSignature: the spec only caps n, but no supported algorithm has an empty signature.
func ruleSignature(n int) string {
	if n == 0 || n > maxSignature {
		return fmt.Sprintf("length %d is outside [1, %d]", n, maxSignature)
	}
	return ""
}

func asciiIn(s string, lo, hi byte) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < lo || s[i] > hi {
			return false
		}
	}
	return true
}

// Validate checks every field rule of FORMAT.md §3.1 (in byte order, so the first bad field
// is named, as ParseCertificate would). It does not look at Body or Signature.
func (c *Certificate) Validate() error {
	r := &reader{where: certWhere}
	r.check("image_uuid", ruleUUID(c.UUID))
	r.check("sector_size", ruleSectorSize(c.SectorSize))
	r.check("virtual_size", ruleVirtualSize(c.VirtualSize, c.SectorSize))
	r.check("data_suite", ruleSuite(c.Suite))
	r.check("measure_alg", ruleMeasureAlg(c.MeasureAlg))
	r.check("not_after", ruleValidity(c.NotBefore.Unix(), c.NotAfter.Unix()))
	r.check("hpke_kem", ruleKEM(c.KEM))
	r.check("hpke_kdf", ruleKDF(c.KDF))
	r.check("hpke_aead", ruleAEAD(c.AEAD))
	r.check("provider_alg", ruleProviderAlg(c.ProviderAlg))
	r.check("provider_key", ruleProviderKey(len(c.ProviderKey)))
	r.check("measurements", ruleMeasurements(len(c.Measurements), c.MeasureAlg.DigestSize(), c.MeasureAlg))
	for i, m := range c.Measurements {
		if len(m) != c.MeasureAlg.DigestSize() {
			r.check("measurements", fmt.Sprintf("digest %d is %d bytes, %s needs %d", i, len(m), c.MeasureAlg, c.MeasureAlg.DigestSize()))
		}
	}
	r.check("sealed_key", ruleSealedKey(uint64(len(c.SealedKey)), c.Remote))
	r.check("broker_url", ruleBrokerURL(c.BrokerURL, c.Remote))
	r.check("key_id", ruleKeyID(c.KeyID, c.Remote))
	return r.err
}

// MarshalBody validates c, encodes the signed body and stores it in c.Body.
func (c *Certificate) MarshalBody() ([]byte, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	c.Body = c.encodeBody()
	return c.Body, nil
}

// encodeBody writes the fields as they are, valid or not (tests use it to build bad bytes).
// The digest length written is the first digest's, which Validate makes the algorithm's.
func (c *Certificate) encodeBody() []byte {
	var w writer
	w.str(CertMagic)
	w.u16(CertVersion)
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
	dlen := c.MeasureAlg.DigestSize()
	if len(c.Measurements) > 0 {
		dlen = len(c.Measurements[0])
	}
	w.u16(uint16(len(c.Measurements)))
	w.u16(uint16(dlen))
	for _, m := range c.Measurements {
		w.raw(m)
	}
	w.u32(uint32(len(c.SealedKey)))
	w.raw(c.SealedKey)
	w.u16(uint16(len(c.BrokerURL)))
	w.str(c.BrokerURL)
	w.u16(uint16(len(c.KeyID)))
	w.str(c.KeyID)
	return w.b
}

// Bytes is the certificate as stored: Body || u16 length || Signature.
func (c *Certificate) Bytes() []byte {
	if c.Body == nil {
		panic("BUG: format: Certificate.Bytes before MarshalBody or ParseCertificate")
	}
	if len(c.Signature) > maxSignature {
		panic(fmt.Sprintf("BUG: format: %d-byte certificate signature exceeds %d", len(c.Signature), maxSignature))
	}
	var w writer
	w.b = make([]byte, 0, len(c.Body)+2+len(c.Signature))
	w.raw(c.Body)
	w.u16(uint16(len(c.Signature)))
	w.raw(c.Signature)
	return w.b
}

// ParseCertificate decodes a stored certificate in one pass, checking each field as it is
// read (table above). Every refusal is a *FieldError naming the field. Body keeps a copy of
// the exact signed bytes, which verifiers use instead of a re-encoding.
func ParseCertificate(b []byte) (*Certificate, error) {
	r := &reader{b: b, where: certWhere}
	c := &Certificate{}
	if m := r.take("magic", 8); m != nil && string(m) != CertMagic {
		r.fail("magic", fmt.Sprintf("is %q, not %q", m, CertMagic))
	}
	// A later version may lay out everything after this differently: stop here.
	if v := r.u16("version"); r.err == nil && v != CertVersion {
		r.fail("version", fmt.Sprintf("unsupported certificate version %d", v))
	}
	flags := r.u16("flags")
	if flags&^certFlagsKnown != 0 {
		r.check("flags", fmt.Sprintf("unknown bits 0x%04x", flags&^certFlagsKnown))
	}
	c.ReadOnly, c.Remote = flags&certFlagReadOnly != 0, flags&certFlagRemote != 0
	c.UUID = r.array16("image_uuid")
	r.check("image_uuid", ruleUUID(c.UUID))
	c.VirtualSize = r.u64("virtual_size")
	c.SectorSize = r.u32("sector_size")
	r.check("sector_size", ruleSectorSize(c.SectorSize))
	r.check("virtual_size", ruleVirtualSize(c.VirtualSize, c.SectorSize))
	c.Suite = Suite(r.u16("data_suite"))
	r.check("data_suite", ruleSuite(c.Suite))
	c.MeasureAlg = MeasureAlg(r.u16("measure_alg"))
	r.check("measure_alg", ruleMeasureAlg(c.MeasureAlg))
	nb, na := int64(r.u64("not_before")), int64(r.u64("not_after"))
	r.check("not_after", ruleValidity(nb, na))
	c.NotBefore, c.NotAfter = time.Unix(nb, 0).UTC(), time.Unix(na, 0).UTC()
	c.ChipID = r.array32("chip_id")
	c.KEM = r.u16("hpke_kem")
	r.check("hpke_kem", ruleKEM(c.KEM))
	c.KDF = r.u16("hpke_kdf")
	r.check("hpke_kdf", ruleKDF(c.KDF))
	c.AEAD = r.u16("hpke_aead")
	r.check("hpke_aead", ruleAEAD(c.AEAD))
	c.ProviderAlg = SigAlg(r.u16("provider_alg"))
	r.check("provider_alg", ruleProviderAlg(c.ProviderAlg))
	n := int(r.u16("provider_key"))
	r.check("provider_key", ruleProviderKey(n))
	c.ProviderKey = clone(r.take("provider_key", n))
	count, dlen := int(r.u16("measurements")), int(r.u16("measurements"))
	r.check("measurements", ruleMeasurements(count, dlen, c.MeasureAlg))
	for i := 0; r.err == nil && i < count; i++ {
		c.Measurements = append(c.Measurements, clone(r.take("measurements", dlen)))
	}
	sk := r.u32("sealed_key")
	r.check("sealed_key", ruleSealedKey(uint64(sk), c.Remote))
	c.SealedKey = clone(r.take("sealed_key", int(sk)))
	c.BrokerURL = string(r.take("broker_url", int(r.u16("broker_url"))))
	r.check("broker_url", ruleBrokerURL(c.BrokerURL, c.Remote))
	c.KeyID = string(r.take("key_id", int(r.u16("key_id"))))
	r.check("key_id", ruleKeyID(c.KeyID, c.Remote))
	if r.err != nil {
		return nil, r.err
	}
	c.Body = clone(b[:r.off])
	n = int(r.u16("signature"))
	r.check("signature", ruleSignature(n))
	c.Signature = clone(r.take("signature", n))
	if r.err == nil && r.off != len(b) {
		r.fail("signature", fmt.Sprintf("%d trailing bytes after certificate signature", len(b)-r.off))
	}
	if r.err != nil {
		return nil, r.err
	}
	return c, nil
}

func clone(b []byte) []byte {
	if b == nil {
		return nil
	}
	return append([]byte{}, b...)
}

// imageMismatch names the first field in which c and h describe different images ("" when
// they agree) and says how (FORMAT.md §2 last paragraph, §3.4 step 6).
func imageMismatch(c *Certificate, h *Header) (field, reason string) {
	differ := func(cert, hdr any) string {
		return fmt.Sprintf("is %v in the certificate but %v in the header", cert, hdr)
	}
	switch {
	case c.UUID != h.UUID:
		return "image_uuid", differ(fmt.Sprintf("%x", c.UUID), fmt.Sprintf("%x", h.UUID))
	case c.VirtualSize != h.VirtualSize:
		return "virtual_size", differ(c.VirtualSize, h.VirtualSize)
	case c.SectorSize != h.SectorSize:
		return "sector_size", differ(c.SectorSize, h.SectorSize)
	case c.Suite != h.Suite:
		return "data_suite", differ(c.Suite, h.Suite)
	case c.ReadOnly != h.ReadOnly:
		return "flags", "read-only " + differ(c.ReadOnly, h.ReadOnly)
	}
	return "", ""
}

// CheckHeader refuses a certificate that is not for this header's image, naming the field;
// the error wraps ErrImageMismatch.
func (c *Certificate) CheckHeader(h *Header) error {
	if field, reason := imageMismatch(c, h); field != "" {
		return fmt.Errorf("%w: %s %s", ErrImageMismatch, field, reason)
	}
	return nil
}
