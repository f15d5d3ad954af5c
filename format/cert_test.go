package format

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"
	"time"
)

func TestCertificateRoundTrip(t *testing.T) {
	sm3 := testCert()
	sm3.Suite, sm3.MeasureAlg, sm3.KEM = SuiteSM4GCM, MeasureSM3, KEMDHKEMP384
	sm3.Measurements = [][]byte{bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32)}
	sm3.ProviderAlg, sm3.Signature = SigEd25519, bytes.Repeat([]byte{3}, 64)
	limits := remoteCert()
	limits.ReadOnly = true
	limits.ProviderKey = make([]byte, maxProviderKey)
	limits.Measurements = make([][]byte, maxMeasurements)
	for i := range limits.Measurements {
		limits.Measurements[i] = bytes.Repeat([]byte{byte(i)}, 48)
	}
	limits.BrokerURL = "https://b.example/" + strings.Repeat("p", maxBrokerURL-len("https://b.example/"))
	limits.KeyID = strings.Repeat("~", maxKeyID)
	limits.Signature = make([]byte, maxSignature)
	limits.NotBefore, limits.NotAfter = time.Unix(-1<<40, 0).UTC(), time.Unix(1<<40, 0).UTC()
	bigKey := testCert()
	bigKey.SealedKey = make([]byte, maxSealedKey)

	for name, c := range map[string]*Certificate{"local": testCert(), "remote": remoteCert(), "sm3": sm3, "limits": limits, "sealed key limit": bigKey} {
		in := certBytes(t, c)
		got, err := ParseCertificate(in)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !bytes.Equal(got.Bytes(), in) || !bytes.Equal(got.Body, in[:len(c.Body)]) {
			t.Fatalf("%s: round trip differs", name)
		}
		body := bytes.Clone(got.Body)
		if _, err := got.MarshalBody(); err != nil || !bytes.Equal(got.Body, body) {
			t.Fatalf("%s: re-marshalled body differs: %v", name, err)
		}
		if got.ReadOnly != c.ReadOnly || got.Remote != c.Remote || got.UUID != c.UUID || got.ChipID != c.ChipID ||
			!got.NotBefore.Equal(c.NotBefore) || !got.NotAfter.Equal(c.NotAfter) || got.KeyID != c.KeyID || got.BrokerURL != c.BrokerURL {
			t.Fatalf("%s: fields differ", name)
		}
		// Body and the byte fields are copies: the caller may reuse its buffer.
		for i := range in {
			in[i] = 0
		}
		if !bytes.Equal(got.Body, body) || got.ProviderKey[0] == 0 && c.ProviderKey[0] != 0 {
			t.Fatalf("%s: parsed certificate aliases the input", name)
		}
	}
}

func TestCertificateTruncatedAndTrailing(t *testing.T) {
	for _, c := range []*Certificate{testCert(), remoteCert()} {
		b := certBytes(t, c)
		for n := 0; n < len(b); n++ {
			var fe *FieldError
			if _, err := ParseCertificate(b[:n]); err == nil {
				t.Fatalf("truncated at %d accepted", n)
			} else if !asField(err, &fe) || fe.Where != "certificate" {
				t.Fatalf("truncated at %d: %v", n, err)
			}
		}
		_, err := ParseCertificate(append(bytes.Clone(b), 0))
		wantField(t, "trailing", err, "certificate", "signature")
		if err == nil || !strings.Contains(err.Error(), "trailing bytes after certificate signature") {
			t.Errorf("trailing message: %v", err)
		}
	}
}

func asField(err error, fe **FieldError) bool {
	e, ok := err.(*FieldError)
	*fe = e
	return ok
}

// TestCertificateRefusals: every rule of §3.1 refused on both sides — MarshalBody will not
// write it, and ParseCertificate refuses the bytes naming the same field.
func TestCertificateRefusals(t *testing.T) {
	v7 := testUUID
	v7[6] = 0x70
	remote := func(url, keyID string) func(c *Certificate) {
		return func(c *Certificate) { c.Remote, c.SealedKey, c.BrokerURL, c.KeyID = true, nil, url, keyID }
	}
	for _, tc := range []struct {
		name, field string
		mod         func(c *Certificate)
	}{
		{"zero uuid", "image_uuid", func(c *Certificate) { c.UUID = [16]byte{} }},
		{"v7 uuid", "image_uuid", func(c *Certificate) { c.UUID = v7 }},
		{"sector 1000", "sector_size", func(c *Certificate) { c.SectorSize = 1000 }},
		{"sector 0", "sector_size", func(c *Certificate) { c.SectorSize = 0 }},
		{"size unaligned", "virtual_size", func(c *Certificate) { c.VirtualSize = 4097 }},
		{"size 0", "virtual_size", func(c *Certificate) { c.VirtualSize = 0 }},
		{"size over 1 PiB", "virtual_size", func(c *Certificate) { c.VirtualSize = 1<<50 + 4096 }},
		{"suite 0", "data_suite", func(c *Certificate) { c.Suite = 0 }},
		{"suite 7", "data_suite", func(c *Certificate) { c.Suite = 7 }},
		{"measure 0", "measure_alg", func(c *Certificate) { c.MeasureAlg = 0 }},
		{"measure 3", "measure_alg", func(c *Certificate) { c.MeasureAlg = 3 }},
		{"empty window", "not_after", func(c *Certificate) { c.NotAfter = c.NotBefore }},
		{"reversed window", "not_after", func(c *Certificate) { c.NotAfter = c.NotBefore.Add(-time.Second) }},
		{"sub-second window", "not_after", func(c *Certificate) { c.NotAfter = c.NotBefore.Add(time.Second / 2) }},
		{"kem", "hpke_kem", func(c *Certificate) { c.KEM = 0x0020 }},
		{"kdf", "hpke_kdf", func(c *Certificate) { c.KDF = 0x0001 }},
		{"aead", "hpke_aead", func(c *Certificate) { c.AEAD = 0x0003 }},
		{"provider alg 0", "provider_alg", func(c *Certificate) { c.ProviderAlg = 0 }},
		{"provider alg 3", "provider_alg", func(c *Certificate) { c.ProviderAlg = 3 }},
		{"no provider key", "provider_key", func(c *Certificate) { c.ProviderKey = nil }},
		{"long provider key", "provider_key", func(c *Certificate) { c.ProviderKey = make([]byte, maxProviderKey+1) }},
		{"no measurements", "measurements", func(c *Certificate) { c.Measurements = nil }},
		{"65 measurements", "measurements", func(c *Certificate) {
			for len(c.Measurements) <= maxMeasurements {
				c.Measurements = append(c.Measurements, make([]byte, 48))
			}
		}},
		{"sm3 digest for sha384", "measurements", func(c *Certificate) { c.Measurements = [][]byte{make([]byte, 32)} }},
		{"sha384 digest for sm3", "measurements", func(c *Certificate) { c.MeasureAlg = MeasureSM3 }},
		{"empty digests", "measurements", func(c *Certificate) { c.Measurements = [][]byte{{}} }},
		{"local without sealed key", "sealed_key", func(c *Certificate) { c.SealedKey = nil }},
		{"long sealed key", "sealed_key", func(c *Certificate) { c.SealedKey = make([]byte, maxSealedKey+1) }},
		{"local with broker", "broker_url", func(c *Certificate) { c.BrokerURL = "https://x" }},
		{"local with key id", "key_id", func(c *Certificate) { c.KeyID = "k" }},
		{"remote with sealed key", "sealed_key", func(c *Certificate) { c.Remote, c.BrokerURL, c.KeyID = true, "https://x", "k" }},
		{"remote without url", "broker_url", remote("", "k")},
		{"http url", "broker_url", remote("http://x", "k")},
		{"upper-case scheme", "broker_url", remote("HTTPS://x", "k")},
		{"no host", "broker_url", remote("https://", "k")},
		{"no host, path", "broker_url", remote("https:///path", "k")},
		{"space in url", "broker_url", remote("https://x/a b", "k")},
		{"control in url", "broker_url", remote("https://x/\n", "k")},
		{"bad url escape", "broker_url", remote("https://x/%zz", "k")},
		{"long url", "broker_url", remote("https://x/"+strings.Repeat("a", maxBrokerURL), "k")},
		{"remote without key id", "key_id", remote("https://x", "")},
		{"long key id", "key_id", remote("https://x", strings.Repeat("k", maxKeyID+1))},
		{"tab in key id", "key_id", remote("https://x", "a\tb")},
		{"del in key id", "key_id", remote("https://x", "a\x7f")},
		{"utf-8 key id", "key_id", remote("https://x", "schlüssel")},
	} {
		c := testCert()
		tc.mod(c)
		_, err := c.MarshalBody()
		wantField(t, tc.name+" (marshal)", err, "certificate", tc.field)
		if err := c.Validate(); err == nil {
			t.Errorf("%s: Validate accepted", tc.name)
		}
		c.Body = c.encodeBody()
		_, err = ParseCertificate(c.Bytes())
		wantField(t, tc.name+" (parse)", err, "certificate", tc.field)
	}

	// Bytes no marshaller writes: patch them.
	good := certBytes(t, testCert())
	body := len(testCert().encodeBody())
	patch := func(off int, val []byte) []byte {
		b := bytes.Clone(good)
		copy(b[off:], val)
		return b
	}
	u16 := func(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }
	dlenOff := 8 + 2 + 2 + 16 + 8 + 4 + 2 + 2 + 8 + 8 + 32 + 8 + 2 + 120 + 2
	for _, tc := range []struct {
		name, field string
		in          []byte
	}{
		{"magic", "magic", patch(0, []byte("SDCERT02"))},
		{"version 2", "version", patch(8, u16(2))},
		{"version 0", "version", patch(8, u16(0))},
		{"flag bit 2", "flags", patch(10, u16(4))},
		{"flag bit 15", "flags", patch(10, u16(0x8000))},
		{"digest length 32 for sha384", "measurements", patch(dlenOff, u16(32))},
		{"digest length 0", "measurements", patch(dlenOff, u16(0))},
		{"measurement count 0", "measurements", patch(dlenOff-2, u16(0))},
		{"measurement count 65535", "measurements", patch(dlenOff-2, u16(0xffff))},
		{"sealed key length huge", "sealed_key", patch(dlenOff+2+48, []byte{0xff, 0xff, 0xff, 0xff})},
		{"empty signature", "signature", append(bytes.Clone(good[:body]), 0, 0)},
		{"long signature", "signature", append(append(bytes.Clone(good[:body]), u16(maxSignature+1)...), make([]byte, maxSignature+1)...)},
		{"signature length past end", "signature", patch(body, u16(104))},
		{"provider key past end", "provider_key", patch(dlenOff-2-120-2, u16(0x400))[:300]},
		{"empty input", "magic", nil},
	} {
		_, err := ParseCertificate(tc.in)
		wantField(t, tc.name, err, "certificate", tc.field)
	}
	_, err := ParseCertificate(patch(8, u16(2)))
	if err == nil || !strings.Contains(err.Error(), "unsupported certificate version 2") {
		t.Errorf("version message: %v", err)
	}
}

// TestCertificateFirstBadFieldNamed: with several bad fields, the error names the first in
// byte order, both when marshalling and when parsing.
func TestCertificateFirstBadFieldNamed(t *testing.T) {
	c := testCert()
	c.MeasureAlg = 9                           // measure_alg (offset 42) ...
	c.Measurements = [][]byte{make([]byte, 5)} // ... before measurements
	c.KeyID = "k"                              // ... before key_id
	_, err := c.MarshalBody()
	wantField(t, "marshal", err, "certificate", "measure_alg")
	c.Body = c.encodeBody()
	_, err = ParseCertificate(c.Bytes())
	wantField(t, "parse", err, "certificate", "measure_alg")
}

func TestCertificateAcceptsEdges(t *testing.T) {
	for name, mod := range map[string]func(c *Certificate){
		"space in key id":   func(c *Certificate) { c.KeyID = "key one" },
		"url with port":     func(c *Certificate) { c.BrokerURL = "https://10.0.0.1:8443" },
		"url with query":    func(c *Certificate) { c.BrokerURL = "https://kb.example/v1/keys?tenant=7#x" },
		"one-second window": func(c *Certificate) { c.NotAfter = c.NotBefore.Add(time.Second) },
	} {
		c := remoteCert()
		mod(c)
		b := certBytes(t, c)
		if _, err := ParseCertificate(b); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestBytesPanics(t *testing.T) {
	for name, c := range map[string]*Certificate{
		"no body": testCert(),
		"long signature": func() *Certificate {
			c := testCert()
			c.Body = []byte{1}
			c.Signature = make([]byte, maxSignature+1)
			return c
		}(),
	} {
		func() {
			defer func() {
				if r, _ := recover().(string); !strings.HasPrefix(r, "BUG: ") {
					t.Errorf("%s: want a BUG panic, got %q", name, r)
				}
			}()
			c.Bytes()
		}()
	}
}
