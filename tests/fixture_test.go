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
func TestFixtureV1(t *testing.T) { checkFixture(t, "v1-aes", 263144, 1) }

// TestFixtureV2: the first version-2 fixture (integrity tree, provider-signed first root
// record) unseals to its input and scrubs clean.
func TestFixtureV2(t *testing.T) {
	keys := checkFixture(t, "v2-aes", 300000, 2)
	run(t, "scrub", "fixtures/v2-aes.img", "--psp", filepath.Join(keys, "psp"))
}

// checkFixture unseals fixtures/NAME.img with a copy of the fixture keys, compares the first
// n bytes with NAME.raw.sha256, checks inspect's verdict, and returns the keys' directory.
func checkFixture(t *testing.T, name string, n int64, version float64) string {
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
	img := "fixtures/" + name + ".img"
	out := filepath.Join(t.TempDir(), name+".raw")
	run(t, "unseal", "--in", img, "--out", out, "--psp", filepath.Join(keys, "psp"))
	f := mustOpen(t, out)
	h := sha256.New()
	if _, err := io.Copy(h, io.LimitReader(f, n)); err != nil {
		t.Fatal(err)
	}
	want, _ := os.ReadFile("fixtures/" + name + ".raw.sha256")
	if got := hex.EncodeToString(h.Sum(nil)); got != strings.TrimSpace(string(want)) {
		t.Fatalf("%s fixture unseals to %s, want %s", name, got, want)
	}
	m := inspectJSON(t, img, "--trust", filepath.Join(keys, "psp", "trust"))
	if m["signature"] != "valid" || m["suite"] != "aes-256-gcm" || m["generation"].(float64) != 1 || m["format_version"].(float64) != version {
		t.Fatalf("%v", m)
	}
	return keys
}
