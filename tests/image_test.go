package tests

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/format"
)

func cmpFiles(t testing.TB, a, b string, n int64) {
	t.Helper()
	requireTool(t, "cmp")
	out, err := exec.Command("cmp", "-n", fmt.Sprint(n), a, b).CombinedOutput()
	if err != nil {
		t.Fatalf("cmp %s %s: %v %s", a, b, err, out)
	}
}

func size(t testing.TB, p string) (int64, int64) {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size(), fi.Sys().(*syscall.Stat_t).Blocks * 512
}

func inspectJSON(t testing.TB, img string, args ...string) map[string]any {
	t.Helper()
	out := run(t, append([]string{"inspect", img, "--json"}, args...)...)
	var m map[string]any
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("inspect --json: %v\n%s", err, out)
	}
	return m
}

// roundTrip seals src, unseals it and checks the bytes and the zero tail.
func roundTrip(t *testing.T, e *env, src string, extra ...string) string {
	t.Helper()
	return roundTripCmp(t, e, src, cmpFiles, extra...)
}

func roundTripCmp(t *testing.T, e *env, src string, cmp func(testing.TB, string, string, int64), extra ...string) string {
	t.Helper()
	img, out := src+".img", src+".out"
	e.seal(t, src, img, extra...)
	run(t, "unseal", "--in", img, "--out", out, "--psp", e.psp)
	n, _ := size(t, src)
	cmp(t, src, out, n)
	on, _ := size(t, out)
	ss := int64(4096)
	if strings.Contains(strings.Join(extra, " "), "--sector-size 512") {
		ss = 512
	}
	if want := (n + ss - 1) / ss * ss; on != want {
		t.Fatalf("unsealed size %d, want %d (rounded up to the sector)", on, want)
	}
	f, _ := os.Open(out)
	defer f.Close()
	tail := make([]byte, on-n)
	f.ReadAt(tail, n)
	if !bytes.Equal(tail, make([]byte, len(tail))) {
		t.Fatal("rounded-up tail is not zero")
	}
	return img
}

func TestSealUnsealSizesAndSuites(t *testing.T) {
	e := newEnv(t)
	cases := []struct {
		n     int64
		extra []string
	}{
		{4096, nil}, {1, nil}, {4095, nil}, {4097, nil}, {123457, nil},
		{1000, []string{"--sector-size", "512"}}, {513, []string{"--sector-size", "512"}},
		{70001, []string{"--suite", "chacha20-poly1305"}}, {70001, []string{"--suite", "sm4-gcm"}},
		{65536, []string{"--suite", "aes-256-gcm", "--sector-size", "512"}},
	}
	for i, c := range cases {
		t.Run(fmt.Sprintf("%d-%s", c.n, strings.Join(c.extra, "")), func(t *testing.T) {
			src := filepath.Join(e.dir, fmt.Sprintf("raw%d", i))
			fill(t, src, 0, c.n, byte(i+1))
			img := roundTrip(t, e, src, c.extra...)
			m := inspectJSON(t, img)
			if len(c.extra) > 1 && c.extra[0] == "--suite" && m["suite"] != c.extra[1] {
				t.Fatalf("suite %v", m["suite"])
			}
		})
	}
}

func TestSealUnseal1GiBRandom(t *testing.T) {
	if testing.Short() {
		t.Skip("1 GiB image in -short mode")
	}
	e := newEnv(t)
	src := filepath.Join(e.dir, "big.raw")
	fill(t, src, 0, 1<<30, 7)
	img := roundTrip(t, e, src)
	os.Remove(img)
	os.Remove(src + ".out")
}

func TestSparse20GiB(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "sparse.raw")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(20 << 30)
	f.Close()
	for i, off := range []int64{0, 1<<30 + 4096*3, 7<<30 + 123, 13 << 30, 20<<30 - 1<<20} {
		fill(t, src, off, 1<<20, byte(i+10))
	}
	// a run of zeros written as data must still become a hole
	z, _ := os.OpenFile(src, os.O_RDWR, 0)
	z.WriteAt(make([]byte, 8<<20), 5<<30)
	z.Close()
	start := time.Now()
	img := roundTripCmp(t, e, src, cmpSparse)
	t.Logf("seal+unseal+compare of 20 GiB sparse: %v", time.Since(start))
	_, alloc := size(t, img)
	if alloc > 32<<20 {
		t.Fatalf("sealed image allocates %d bytes; expected about 5 MiB of data plus metadata", alloc)
	}
	_, oalloc := size(t, src+".out")
	if oalloc > 16<<20 {
		t.Fatalf("unsealed image allocates %d bytes; it should stay sparse", oalloc)
	}
	t.Logf("allocated: sealed %d bytes, unsealed %d bytes, of 20 GiB", alloc, oalloc)
}

// flip xors one byte of a file.
func flip(t testing.TB, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := []byte{0}
	f.ReadAt(b, off)
	b[0] ^= 0x5a
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func sealed(t *testing.T, e *env, n int64) (src, img string) {
	src = filepath.Join(e.dir, fmt.Sprintf("t%d.raw", time.Now().UnixNano()))
	fill(t, src, 0, n, 3)
	img = src + ".img"
	e.seal(t, src, img)
	return src, img
}

func TestTamperHeaders(t *testing.T) {
	e := newEnv(t)
	src, img := sealed(t, e, 64<<10)
	for _, off := range []int64{0, 9, 20, 45, 130, 600} {
		cp := img + ".cp"
		copyFile(t, img, cp)
		flip(t, cp, off)
		m := inspectJSON(t, cp)
		if m["header_copy"] != "backup" || m["primary_error"] == nil {
			t.Fatalf("byte %d: %v", off, m)
		}
		out := cp + ".out"
		run(t, "unseal", "--in", cp, "--out", out, "--psp", e.psp)
		cmpFiles(t, src, out, 64<<10)
		os.Remove(out)
		os.Remove(cp)
	}
	flip(t, img, 0)
	flip(t, img, format.HeaderSlotSize)
	out, err := runErr("inspect", img)
	if err == nil || !strings.Contains(out, "field magic") || !strings.Contains(out, "backup") {
		t.Fatalf("both headers broken: %v %s", err, out)
	}
}

func TestTamperDataAndMetadata(t *testing.T) {
	e := newEnv(t)
	_, img := sealed(t, e, 64<<10)
	m := inspectJSON(t, img)
	data, meta := int64(m["data_offset"].(float64)), int64(m["meta_offset"].(float64))
	// A data byte fails the sector's AEAD; any metadata byte fails its page's digest in the
	// integrity tree before the entry is used.
	page0 := `metadata page 0 does not match its digest in the tree`
	for name, c := range map[string]struct {
		off  int64
		want string
	}{
		"data byte of sector 5":   {data + 5*4096 + 100, `sector 5 failed authentication`},
		"nonce of sector 5":       {meta + 5*64 + 20, page0},
		"tag of sector 5":         {meta + 5*64 + 30, page0},
		"salt of sector 5":        {meta + 5*64 + 1, page0},
		"reserved byte of sector": {meta + 5*64 + 50, page0},
	} {
		off := c.off
		cp := img + ".cp"
		copyFile(t, img, cp)
		flip(t, cp, off)
		out, err := runErr("unseal", "--in", cp, "--out", cp+".out", "--psp", e.psp)
		if err == nil || !regexp.MustCompile(c.want).MatchString(out) {
			t.Fatalf("%s: %v %s", name, err, out)
		}
		if _, err := os.Stat(cp + ".out"); err == nil {
			t.Fatalf("%s: partial output left behind", name)
		}
		os.Remove(cp)
	}
}

func TestRefusals(t *testing.T) {
	e := newEnv(t)
	other := newEnv(t)
	_, img := sealed(t, e, 8192)
	if out, err := runErr("unseal", "--in", img, "--out", img+".o", "--psp", other.psp); err == nil || !strings.Contains(out, "unknown provider") {
		t.Fatalf("unknown provider: %v %s", err, out)
	}
	m := inspectJSON(t, img, "--trust", filepath.Join(other.psp, "trust"))
	if m["signature"] != "unknown provider" {
		t.Fatalf("unknown provider: %v", m["signature"])
	}
	run(t, "psp", "trust", "add", "--dir", other.psp, filepath.Join(e.prov, "provider.pub"))
	if out, err := runErr("unseal", "--in", img, "--out", img+".o", "--psp", other.psp); err == nil || !strings.Contains(out, "another chip") {
		t.Fatalf("wrong chip: %v %s", err, out)
	}
	if m := inspectJSON(t, img, "--trust", filepath.Join(e.psp, "trust")); m["signature"] != "valid" {
		t.Fatalf("valid: %v", m["signature"])
	}
	// expired: a certificate whose window is in the past
	src := filepath.Join(e.dir, "exp.raw")
	fill(t, src, 0, 4096, 1)
	e.seal(t, src, src+".img", "--not-before", "2020-01-01T00:00:00Z", "--not-after", "2021-01-01T00:00:00Z")
	if out, err := runErr("unseal", "--in", src+".img", "--out", src+".o", "--psp", e.psp); err == nil || !strings.Contains(out, "expired") {
		t.Fatalf("expired: %v %s", err, out)
	}
	e.seal(t, src, src+".fut", "--not-before", "2099-01-01T00:00:00Z", "--not-after", "2100-01-01T00:00:00Z")
	if out, err := runErr("unseal", "--in", src+".fut", "--out", src+".o", "--psp", e.psp); err == nil || !strings.Contains(out, "not yet valid") {
		t.Fatalf("not yet valid: %v %s", err, out)
	}
	// unseal refuses to overwrite
	if out, err := runErr("unseal", "--in", img, "--out", src, "--psp", e.psp); err == nil || !strings.Contains(out, "--force") {
		t.Fatalf("overwrite: %v %s", err, out)
	}
	// a chip certificate from another vendor is refused before sealing
	args := append([]string{"seal", "--in", src, "--out", src + ".x"}, e.certArgs()...)
	for i, a := range args {
		if a == filepath.Join(e.vendor, "vendor.crt") {
			args[i] = filepath.Join(other.vendor, "vendor.crt")
		}
	}
	if out, err := runErr(args...); err == nil || !strings.Contains(out, "refusing to seal") {
		t.Fatalf("foreign chip: %v %s", err, out)
	}
}

func regionHash(t testing.TB, img string, from int64) string {
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(f, from, 1<<40)); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func TestResealToAnotherChip(t *testing.T) {
	e := newEnv(t)
	psp2 := filepath.Join(e.dir, "psp2")
	run(t, "psp", "init", "--dir", psp2, "--vendor", e.vendor, "--kem", "p384")
	run(t, "psp", "trust", "add", "--dir", psp2, filepath.Join(e.prov, "provider.pub"))
	src, img := sealed(t, e, 300<<10)
	// The data region starts where inspect says; hash from the journal on, which covers it
	// and the metadata too.
	dataOff := inspectJSON(t, img)["data_offset"].(float64)
	before, beforeData := regionHash(t, img, format.JournalOffset), regionHash(t, img, int64(dataOff))
	run(t, "reseal", "--in", img, "--psp", e.psp, "--to-chip", filepath.Join(psp2, "chip.crt"),
		"--vendor-root", filepath.Join(e.vendor, "vendor.crt"), "--provider-key", filepath.Join(e.prov, "provider.key"))
	if after := regionHash(t, img, format.JournalOffset); after != before {
		t.Fatal("reseal changed bytes outside the headers")
	}
	m := inspectJSON(t, img)
	if m["data_offset"].(float64) != dataOff || regionHash(t, img, int64(dataOff)) != beforeData {
		t.Fatal("reseal moved or changed the data region")
	}
	if m["generation"].(float64) != 2 || m["kem"] != "dhkem-p384" {
		t.Fatalf("%v", m)
	}
	if out, err := runErr("unseal", "--in", img, "--out", img+".o", "--psp", e.psp); err == nil || !strings.Contains(out, "another chip") {
		t.Fatalf("old chip still opens it: %v %s", err, out)
	}
	run(t, "unseal", "--in", img, "--out", img+".o", "--psp", psp2)
	cmpFiles(t, src, img+".o", 300<<10)
}

func TestMeasure(t *testing.T) {
	requireTool(t, "sha384sum")
	e := newEnv(t)
	out := strings.TrimSpace(run(t, "measure", e.fw))
	want, _ := exec.Command("sha384sum", e.fw).Output()
	if out != strings.Fields(string(want))[0] {
		t.Fatalf("measure %s != sha384sum %s", out, want)
	}
	abc := filepath.Join(e.dir, "abc")
	os.WriteFile(abc, []byte("abc"), 0o644)
	if out := strings.TrimSpace(run(t, "measure", "--alg", "sm3", abc)); out != "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0" {
		t.Fatalf("sm3(abc) = %s", out)
	}
}

func mustOpen(t testing.TB, p string) *os.File {
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func copyFile(t testing.TB, from, to string) {
	t.Helper()
	requireTool(t, "cp")
	if out, err := exec.Command("cp", "--sparse=always", from, to).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
}

func TestHelpHasExamples(t *testing.T) {
	var walk func(prefix []string)
	seen := 0
	walk = func(prefix []string) {
		out := run(t, append(prefix, "--help")...)
		if !strings.Contains(out, "Example") {
			t.Errorf("sealdisk %s --help has no example", strings.Join(prefix, " "))
		}
		seen++
		// Subcommands are listed under "Available Commands:".
		_, rest, ok := strings.Cut(out, "Available Commands:")
		if !ok {
			return
		}
		rest, _, _ = strings.Cut(rest, "\n\n")
		for _, line := range strings.Split(strings.TrimSpace(rest), "\n") {
			name := strings.Fields(line)[0]
			if name == "help" || name == "completion" {
				continue
			}
			walk(append(append([]string{}, prefix...), name))
		}
	}
	walk(nil)
	if seen < 15 {
		t.Fatalf("walked only %d commands", seen)
	}
}

// TestTamperMovedSector: an authentic sector and its entry copied over another position are
// refused, naming the position they were moved to (the key is bound to the LBA).
func TestTamperMovedSector(t *testing.T) {
	e := newEnv(t)
	_, img := sealed(t, e, 64<<10)
	m := inspectJSON(t, img)
	data, meta := int64(m["data_offset"].(float64)), int64(m["meta_offset"].(float64))
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	sec, ent := make([]byte, 4096), make([]byte, 64)
	f.ReadAt(sec, data+3*4096)
	f.ReadAt(ent, meta+3*64)
	if _, err := f.WriteAt(sec, data+9*4096); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(ent, meta+9*64); err != nil {
		t.Fatal(err)
	}
	f.Close()
	// The entry moved too: the tree refuses the page.
	out, err := runErr("unseal", "--in", img, "--out", img+".out", "--psp", e.psp)
	if err == nil || !strings.Contains(out, "metadata page 0 does not match its digest in the tree") {
		t.Fatalf("moved sector and entry: %v %s", err, out)
	}
	// Only the data moved: the sector's AEAD (bound to its LBA and entry) refuses it.
	_, img2 := sealed(t, e, 64<<10)
	f, err = os.OpenFile(img2, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.ReadAt(sec, data+3*4096)
	if _, err := f.WriteAt(sec, data+9*4096); err != nil {
		t.Fatal(err)
	}
	f.Close()
	out, err = runErr("unseal", "--in", img2, "--out", img2+".out", "--psp", e.psp)
	if err == nil || !strings.Contains(out, "sector 9 failed authentication") {
		t.Fatalf("moved sector: %v %s", err, out)
	}
}
