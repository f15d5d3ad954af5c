package tests

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestFixtureV1: every released format version keeps opening (tests/fixtures/README.md).
func TestFixtureV1(t *testing.T) {
	requireTool(t, "cp")
	keys := filepath.Join(t.TempDir(), "keys")
	if out, err := exec.Command("cp", "-r", "fixtures/v1-keys", keys).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	// git does not keep 0600; the PSP refuses looser private key files.
	for _, k := range []string{"psp/kem.key", "psp/attest.key", "prov/provider.key", "vendor/vendor.key"} {
		if err := os.Chmod(filepath.Join(keys, k), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	out := filepath.Join(t.TempDir(), "v1.raw")
	run(t, "unseal", "--in", "fixtures/v1-aes.img", "--out", out, "--psp", filepath.Join(keys, "psp"))
	f := mustOpen(t, out)
	h := sha256.New()
	if _, err := io.Copy(h, io.LimitReader(f, 263144)); err != nil {
		t.Fatal(err)
	}
	want, _ := os.ReadFile("fixtures/v1-aes.raw.sha256")
	if got := hex.EncodeToString(h.Sum(nil)); got != strings.TrimSpace(string(want)) {
		t.Fatalf("v1 fixture unseals to %s, want %s", got, want)
	}
	m := inspectJSON(t, "fixtures/v1-aes.img", "--trust", filepath.Join(keys, "psp", "trust"))
	if m["signature"] != "valid" || m["suite"] != "aes-256-gcm" || m["generation"].(float64) != 1 {
		t.Fatalf("%v", m)
	}
}
