package tests

import (
	"crypto/rand"
	"encoding/hex"
	"path/filepath"
	"strings"
	"testing"
)

// attestReport seals a small image to e's PSP, serves it as "vm1" with `sealdisk serve`, asks
// the running server for a report over the admin socket (`sealdisk admin attest`), as a
// verifier's agent on the host would, and stops the server. It returns the report's path and
// the nonce as hex.
func attestReport(t *testing.T, e *env) (string, string) {
	t.Helper()
	_, img := sealed(t, e, 4096)
	admin := filepath.Join(e.dir, "admin.sock")
	s := startServe(t, e, img, false, "--admin-socket", admin)
	nonce := make([]byte, 24)
	rand.Read(nonce)
	rep := filepath.Join(t.TempDir(), "report.json")
	run(t, "admin", "--socket", admin, "attest", "vm1", "--nonce", hex.EncodeToString(nonce), "--out", rep)
	s.stop(t)
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
