package tests

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/psp"
)

// nullBinder stands in for the DMA engine's key slots: the report needs a launch, not a VM.
type nullBinder struct{}

func (nullBinder) LoadKey(psp.ASID, psp.Binding) error { return nil }
func (nullBinder) ClearKey(psp.ASID) error             { return nil }

// attestReport seals a small image to e's PSP, launches it as "vm1" through the psp API (the
// serving side that does this arrives later) and writes the signed report to a file. It
// returns the report's path and the nonce as hex.
func attestReport(t *testing.T, e *env) (string, string) {
	t.Helper()
	_, img := sealed(t, e, 4096)
	p, err := psp.Open(e.psp, psp.Options{Binder: nullBinder{}})
	if err != nil {
		t.Fatal(err)
	}
	h, _, err := format.ReadHeader(mustOpen(t, img))
	if err != nil {
		t.Fatal(err)
	}
	c, err := format.ParseCertificate(h.Cert)
	if err != nil {
		t.Fatal(err)
	}
	l, err := p.Launch(psp.LaunchRequest{VM: "vm1", Cert: c, Header: h, FirmwarePath: e.fw})
	if err != nil {
		t.Fatal(err)
	}
	nonce := make([]byte, 24)
	rand.Read(nonce)
	envl, err := p.Attest(l.ASID, nonce)
	if err != nil {
		t.Fatal(err)
	}
	rep := filepath.Join(t.TempDir(), "report.json")
	if err := os.WriteFile(rep, envl, 0o644); err != nil {
		t.Fatal(err)
	}
	return rep, hex.EncodeToString(nonce)
}

func TestAttestVerify(t *testing.T) {
	e := newEnv(t)
	other := newEnv(t)
	rep, nonce := attestReport(t, e)
	root := filepath.Join(e.vendor, "vendor.crt")
	out := run(t, "attest", "verify", rep, "--vendor-root", root, "--nonce", nonce)
	if !strings.Contains(out, "report OK") || !strings.Contains(out, `vm "vm1"`) {
		t.Fatal(out)
	}
	wrong, _ := hex.DecodeString(nonce)
	wrong[0] ^= 1
	if out, err := runErr("attest", "verify", rep, "--vendor-root", root, "--nonce", hex.EncodeToString(wrong)); err == nil || !strings.Contains(out, "nonce") {
		t.Fatalf("wrong nonce: %v %s", err, out)
	}
	if out, err := runErr("attest", "verify", rep, "--vendor-root", filepath.Join(other.vendor, "vendor.crt"), "--nonce", nonce); err == nil || !strings.Contains(out, "chain") {
		t.Fatalf("other vendor: %v %s", err, out)
	}
}
