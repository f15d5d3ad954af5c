package format

import (
	"bytes"
	"testing"
)

// Seed corpora also live in testdata/fuzz/<target>/ (generated from these seeds plus a few
// broken variants); `go test` runs them as regular cases.

// FuzzParseHeader: parsing never panics, every refusal is a *FieldError, and whatever parses
// re-marshals to the same bytes.
func FuzzParseHeader(f *testing.F) {
	h := testHeader(f)
	f.Add(mustMarshal(f, h, 0), 0)
	f.Add(mustMarshal(f, h, 1), 1)
	h.Cert = certBytes(f, remoteCert())
	h.Generation = 42
	slot := make([]byte, HeaderSlotSize)
	copy(slot, mustMarshal(f, h, 0))
	f.Add(slot, 0)
	f.Add([]byte("SEALDISK"), 0)
	f.Fuzz(func(t *testing.T, data []byte, copy int) {
		copy &= 1
		h, err := ParseHeader(data, copy)
		if err != nil {
			if _, ok := err.(*FieldError); !ok {
				t.Fatalf("refusal is not a *FieldError: %T %v", err, err)
			}
			return
		}
		out, err := h.Marshal(copy)
		if err != nil {
			t.Fatalf("parsed header does not marshal: %v", err)
		}
		if !bytes.Equal(out, data[:len(out)]) {
			t.Fatal("re-marshalled header differs from the input")
		}
	})
}

// FuzzParseCertificate: never panics, every refusal is a *FieldError, and a parsed
// certificate re-encodes to the input exactly, its body as the verbatim prefix.
func FuzzParseCertificate(f *testing.F) {
	f.Add(certBytes(f, testCert()))
	f.Add(certBytes(f, remoteCert()))
	sm3 := testCert()
	sm3.MeasureAlg, sm3.Suite = MeasureSM3, SuiteSM4GCM
	sm3.Measurements = [][]byte{make([]byte, 32), bytes.Repeat([]byte{1}, 32)}
	f.Add(certBytes(f, sm3))
	f.Add([]byte("SDCERT01"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseCertificate(data)
		if err != nil {
			if _, ok := err.(*FieldError); !ok {
				t.Fatalf("refusal is not a *FieldError: %T %v", err, err)
			}
			return
		}
		if !bytes.Equal(c.Bytes(), data) || !bytes.Equal(c.Body, data[:len(c.Body)]) {
			t.Fatal("certificate bytes differ from the input")
		}
		body := bytes.Clone(c.Body)
		if _, err := c.MarshalBody(); err != nil {
			t.Fatalf("parsed certificate does not marshal: %v", err)
		}
		if !bytes.Equal(body, c.Body) {
			t.Fatal("re-marshalled body differs")
		}
	})
}

// FuzzParseRootSlot: parsing a root record slot never panics, and a record that parses
// re-marshals (its body and authenticator) to the slot's bytes.
func FuzzParseRootSlot(f *testing.F) {
	h, err := NewHeader(testUUID, 1<<30, 4096, SuiteAES256GCM, false, Layout{}, certBytes(f, testCert()))
	if err != nil {
		f.Fatal(err)
	}
	rec := RootFor(h)
	rec.Auth, rec.Seq, rec.Counter, rec.Epoch, rec.Head = RootByPSP, 3, 42, 2, 8192
	f.Add(MarshalRootSlot(rec.MarshalBody(), bytes.Repeat([]byte{7}, 32)))
	rec.Auth = RootByProvider
	f.Add(MarshalRootSlot(rec.MarshalBody(), bytes.Repeat([]byte{9}, 103)))
	f.Add(make([]byte, RootSlotSize))
	f.Fuzz(func(t *testing.T, data []byte) {
		slot := make([]byte, RootSlotSize)
		copy(slot, data)
		rec, body, auth, err := ParseRootSlot(slot, h)
		if err != nil {
			return
		}
		if rec.UUID != h.UUID {
			t.Fatal("a record of another image parsed")
		}
		if !bytes.Equal(MarshalRootSlot(body, auth), slot) || !bytes.Equal(rec.MarshalBody(), body) {
			t.Fatal("a parsed root record re-marshals differently")
		}
	})
}
