package format

import (
	"bytes"
	"testing"
)

// FuzzParseHeader: parsing never panics, and whatever parses re-marshals to the same bytes.
func FuzzParseHeader(f *testing.F) {
	b, err := testHeader(f).Marshal(0)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add(b[:128])
	f.Add([]byte("SEALDISK"))
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := ParseHeader(data, 0)
		if err != nil {
			return
		}
		out, err := h.Marshal(0)
		if err != nil {
			t.Fatalf("parsed header does not marshal: %v", err)
		}
		if !bytes.Equal(out, data[:len(out)]) {
			t.Fatal("re-marshalled header differs from the input")
		}
	})
}

// FuzzParseCertificate: never panics; a parsed certificate re-encodes to the input exactly.
func FuzzParseCertificate(f *testing.F) {
	f.Add(testCertBytes(f))
	c := testCert()
	c.Remote, c.SealedKey, c.BrokerURL, c.KeyID = true, nil, "https://broker.example/k", "key-1"
	if _, err := c.MarshalBody(); err != nil {
		f.Fatal(err)
	}
	f.Add(c.Bytes())
	f.Add([]byte("SDCERT01"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseCertificate(data)
		if err != nil {
			return
		}
		if !bytes.Equal(c.Bytes(), data) {
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
