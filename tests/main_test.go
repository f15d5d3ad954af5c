// Package tests drives the built sealdisk binary out of process, with real files and real
// tools, as an operator would.
package tests

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sealdisk/sealdisk/internal/clienttool"
)

var sealdisk string // path of the binary built for this run

// buildFlags and atExit are set by files behind build tags (rbd_test.go): the flags the binary
// is built with, and what TestMain stops after the tests (the Ceph cluster).
var (
	buildFlags []string
	atExit     []func() error
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "sealdisk-e2e-")
	if err != nil {
		panic(err)
	}
	sealdisk = filepath.Join(dir, "sealdisk")
	args := append(append([]string{"build"}, buildFlags...), "-o", sealdisk, "../cmd/sealdisk")
	out, err := exec.Command("go", args...).CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build failed: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	for _, f := range atExit {
		if f() != nil && code == 0 {
			code = 1
		}
	}
	os.RemoveAll(dir)
	os.Exit(code)
}

// requireTool fails in CI (CI=true) and skips elsewhere when a tool is missing.
func requireTool(t testing.TB, name string) { clienttool.Require(t, name) }

// run executes sealdisk with args and fails the test on error.
func run(t testing.TB, args ...string) string {
	t.Helper()
	out, err := runErr(args...)
	if err != nil {
		t.Fatalf("sealdisk %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// runErr executes sealdisk and returns combined output and the error.
func runErr(args ...string) (string, error) {
	cmd := exec.Command(sealdisk, args...)
	var b bytes.Buffer
	cmd.Stdout, cmd.Stderr = &b, &b
	err := cmd.Run()
	return b.String(), err
}

// env is a vendor, a PSP with a trusted provider, and a firmware file, in one directory.
type env struct {
	dir, vendor, psp, prov, fw string
}

func newEnv(t testing.TB) *env {
	t.Helper()
	d := t.TempDir()
	e := &env{dir: d, vendor: filepath.Join(d, "vendor"), psp: filepath.Join(d, "psp"), prov: filepath.Join(d, "prov"), fw: filepath.Join(d, "OVMF.fd")}
	run(t, "vendor", "init", "--dir", e.vendor)
	run(t, "psp", "init", "--dir", e.psp, "--vendor", e.vendor)
	run(t, "provider", "keygen", "--dir", e.prov)
	run(t, "psp", "trust", "add", "--dir", e.psp, filepath.Join(e.prov, "provider.pub"))
	if err := os.WriteFile(e.fw, []byte("OVMF stand-in for tests"), 0o644); err != nil {
		t.Fatal(err)
	}
	return e
}

// certArgs are the certificate flags sealing to e's PSP.
func (e *env) certArgs(extra ...string) []string {
	return append([]string{"--chip", filepath.Join(e.psp, "chip.crt"), "--vendor-root", filepath.Join(e.vendor, "vendor.crt"),
		"--provider-key", filepath.Join(e.prov, "provider.key"), "--firmware", e.fw}, extra...)
}

func (e *env) seal(t testing.TB, in, out string, extra ...string) {
	t.Helper()
	run(t, append([]string{"seal", "--in", in, "--out", out}, e.certArgs(extra...)...)...)
}

// fill writes n deterministic pseudo-random bytes at off (AES-CTR keystream: fast).
func fill(t testing.TB, path string, off, n int64, seed byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	blk, _ := aes.NewCipher(bytes.Repeat([]byte{seed}, 32))
	s := cipher.NewCTR(blk, make([]byte, 16))
	buf := make([]byte, 1<<20)
	for done := int64(0); done < n; {
		k := min(int64(len(buf)), n-done)
		clear(buf[:k])
		s.XORKeyStream(buf[:k], buf[:k])
		if _, err := f.WriteAt(buf[:k], off+done); err != nil {
			t.Fatal(err)
		}
		done += k
	}
}
