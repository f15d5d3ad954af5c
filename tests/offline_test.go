package tests

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/psp"
)

// TestCreateBlank20G: a blank 20 GiB image costs almost no disk, and unseals to 20 GiB of
// zeros that stay a hole.
func TestCreateBlank20G(t *testing.T) {
	e := newEnv(t)
	img := filepath.Join(e.dir, "blank.img")
	run(t, append([]string{"create", "--size", "20G", "--out", img}, e.certArgs()...)...)
	m := inspectJSON(t, img, "--trust", filepath.Join(e.psp, "trust"))
	if m["virtual_size"].(float64) != 20<<30 || m["signature"] != "valid" || m["allocated_data_bytes"].(float64) != 0 {
		t.Fatalf("%v", m)
	}
	if _, alloc := size(t, img); alloc > 4<<20 {
		t.Fatalf("blank 20 GiB image allocates %d bytes", alloc)
	}
	out := filepath.Join(e.dir, "blank.raw")
	run(t, "unseal", "--in", img, "--out", out, "--psp", e.psp)
	n, alloc := size(t, out)
	if n != 20<<30 || alloc > 1<<20 {
		t.Fatalf("unsealed blank image: size %d, allocated %d", n, alloc)
	}
	// Whatever data extents the file system reports must read as zeros.
	f := mustOpen(t, out)
	buf := make([]byte, 1<<20)
	for _, r := range dataExtents(t, f, n) {
		for off := r[0]; off < r[1]; off += int64(len(buf)) {
			k := min(int64(len(buf)), r[1]-off)
			if _, err := f.ReadAt(buf[:k], off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf[:k], make([]byte, k)) {
				t.Fatalf("blank image unseals to non-zero bytes at %d", off)
			}
		}
	}
}

// TestCertificateOptions: every certificate flag lands in the certificate inspect shows, and a
// provider other than the signer is reported as unknown.
func TestCertificateOptions(t *testing.T) {
	e := newEnv(t)
	keys := filepath.Join(e.dir, "acme")
	run(t, "provider", "keygen", "--dir", keys, "--name", "acme", "--alg", "ed25519")
	for _, f := range []string{"acme.key", "acme.pub"} {
		if _, err := os.Stat(filepath.Join(keys, f)); err != nil {
			t.Fatal(err)
		}
	}
	fi, _ := os.Stat(filepath.Join(keys, "acme.key"))
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("private key mode %v, want 0600", fi.Mode().Perm())
	}
	run(t, "psp", "trust", "add", "--dir", e.psp, filepath.Join(keys, "acme.pub"))
	sm3 := strings.TrimSpace(run(t, "measure", "--alg", "sm3", e.fw))
	src := filepath.Join(e.dir, "opts.raw")
	fill(t, src, 0, 40000, 9)
	img := src + ".img"
	before := time.Now().Add(-2 * time.Minute)
	run(t, "seal", "--in", src, "--out", img, "--chip", filepath.Join(e.psp, "chip.crt"),
		"--vendor-root", filepath.Join(e.vendor, "vendor.crt"), "--provider-key", filepath.Join(keys, "acme.key"),
		"--measurement", sm3, "--measure-alg", "sm3", "--suite", "chacha20-poly1305", "--sector-size", "512",
		"--valid-for", "48h", "--read-only")
	m := inspectJSON(t, img, "--provider-pub", filepath.Join(keys, "acme.pub"))
	ms, _ := m["measurements"].([]any)
	if m["signature"] != "valid" || m["provider_alg"] != "ed25519" || m["measure_alg"] != "sm3" ||
		len(ms) != 1 || ms[0] != sm3 || m["suite"] != "chacha20-poly1305" ||
		m["sector_size"].(float64) != 512 || m["read_only"] != true {
		t.Fatalf("%v", m)
	}
	nb, err1 := time.Parse(time.RFC3339, m["not_before"].(string))
	na, err2 := time.Parse(time.RFC3339, m["not_after"].(string))
	if err1 != nil || err2 != nil || nb.Before(before) || na.Sub(nb) < 47*time.Hour || na.Sub(nb) > 49*time.Hour {
		t.Fatalf("validity %v .. %v (%v %v)", m["not_before"], m["not_after"], err1, err2)
	}
	// Checked against another provider's key only, the signer is unknown.
	if m := inspectJSON(t, img, "--provider-pub", filepath.Join(e.prov, "provider.pub")); m["signature"] != "unknown provider" {
		t.Fatalf("signature against another provider: %v", m["signature"])
	}
	if m := inspectJSON(t, img); m["signature"] != "not checked" {
		t.Fatalf("signature without trust: %v", m["signature"])
	}
	out := src + ".out"
	run(t, "unseal", "--in", img, "--out", out, "--psp", e.psp)
	cmpFiles(t, src, out, 40000)
}

// TestUnsealForce: unseal keeps an existing output unless --force, and then replaces it.
func TestUnsealForce(t *testing.T) {
	e := newEnv(t)
	src, img := sealed(t, e, 12288)
	out := filepath.Join(e.dir, "existing.raw")
	if err := os.WriteFile(out, []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	if o, err := runErr("unseal", "--in", img, "--out", out, "--psp", e.psp); err == nil || !strings.Contains(o, "--force") {
		t.Fatalf("overwrite without --force: %v %s", err, o)
	}
	if b, _ := os.ReadFile(out); string(b) != "keep me" {
		t.Fatal("refused unseal changed the existing file")
	}
	run(t, "unseal", "--in", img, "--out", out, "--psp", e.psp, "--force")
	cmpFiles(t, src, out, 12288)
}

// TestAttestTamperedReport: a report whose body was changed after signing is refused.
func TestAttestTamperedReport(t *testing.T) {
	e := newEnv(t)
	rep, nonce := attestReport(t, e)
	b, err := os.ReadFile(rep)
	if err != nil {
		t.Fatal(err)
	}
	var envl psp.Envelope
	if err := json.Unmarshal(b, &envl); err != nil {
		t.Fatalf("report is not an envelope: %v", err)
	}
	if !bytes.Contains(envl.Body, []byte(`"vm1"`)) {
		t.Fatalf("report body does not name the VM: %s", envl.Body)
	}
	envl.Body = bytes.Replace(envl.Body, []byte(`"vm1"`), []byte(`"vm2"`), 1)
	bad, _ := json.Marshal(envl)
	tampered := rep + ".bad"
	if err := os.WriteFile(tampered, bad, 0o644); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(e.vendor, "vendor.crt")
	if o, err := runErr("attest", "verify", tampered, "--vendor-root", root, "--nonce", nonce); err == nil || !strings.Contains(o, "signature") {
		t.Fatalf("tampered report: %v %s", err, o)
	}
}

// TestExt4Hello: a real file system survives sealing: mkfs.ext4 -d builds an image holding a
// hello file, and after seal and unseal debugfs reads the same file back out of it.
func TestExt4Hello(t *testing.T) {
	requireTool(t, "mkfs.ext4")
	requireTool(t, "debugfs")
	e := newEnv(t)
	root := filepath.Join(e.dir, "root")
	os.Mkdir(root, 0o755)
	const hello = "hello from a sealed image\n"
	if err := os.WriteFile(filepath.Join(root, "hello.txt"), []byte(hello), 0o644); err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(e.dir, "fs.raw")
	if err := os.WriteFile(src, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(src, 32<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", root, src).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v %s", err, out)
	}
	roundTrip(t, e, src)
	out, err := exec.Command("debugfs", "-R", "cat /hello.txt", src+".out").Output()
	if err != nil || string(out) != hello {
		t.Fatalf("debugfs cat /hello.txt from the unsealed image: %v %q", err, out)
	}
}
