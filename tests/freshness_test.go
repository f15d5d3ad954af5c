package tests

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// scrubJSON runs scrub --json and returns its report and whether it exited non-zero.
func scrubJSON(t *testing.T, e *env, img string) (map[string]any, bool) {
	t.Helper()
	out, err := runErr("scrub", img, "--psp", e.psp, "--json")
	i := strings.Index(out, "{")
	if i < 0 {
		t.Fatalf("scrub printed no report: %v %s", err, out)
	}
	var m map[string]any
	if derr := json.NewDecoder(strings.NewReader(out[i:])).Decode(&m); derr != nil {
		t.Fatalf("scrub report: %v\n%s", derr, out)
	}
	return m, err != nil
}

func badLBAs(m map[string]any) map[float64]bool {
	out := map[float64]bool{}
	for _, b := range m["bad_sectors"].([]any) {
		out[b.(map[string]any)["lba"].(float64)] = true
	}
	return out
}

// TestFreshnessThroughBinary: every way of changing a version-2 image's metadata, tree or root
// records without its keys — a zeroed entry, a punched metadata page, a changed tree node,
// zeroed root slots — is an error from unseal and a finding of scrub, never zeros or old data;
// scrub reports every bad sector rather than the first.
func TestFreshnessThroughBinary(t *testing.T) {
	e := newEnv(t)
	src, img := sealed(t, e, 256<<10) // 64 sectors: metadata page 0, tree node (1, 0)
	m := inspectJSON(t, img)
	meta, data, tree := int64(m["meta_offset"].(float64)), int64(m["data_offset"].(float64)), int64(m["tree_offset"].(float64))

	rep, failed := scrubJSON(t, e, img)
	if failed || rep["clean"] != true || rep["tree"] != "ok" || rep["checked_bytes"].(float64) != 256<<10 {
		t.Fatalf("scrub of a clean image: %v", rep)
	}

	// Two data sectors changed: both reported, the tree still fine.
	cp := img + ".data"
	copyFile(t, img, cp)
	flip(t, cp, data+3*4096+7)
	flip(t, cp, data+7*4096+7)
	rep, failed = scrubJSON(t, e, cp)
	if bad := badLBAs(rep); !failed || len(bad) != 2 || !bad[3] || !bad[7] || rep["tree"] != "ok" {
		t.Fatalf("scrub of two bad sectors: %v", rep)
	}

	cases := []struct {
		name, want string
		change     func(f *os.File) error
	}{
		{"zeroed entry", "metadata page 0 does not match its digest in the tree", func(f *os.File) error {
			_, err := f.WriteAt(make([]byte, 64), meta+5*64)
			return err
		}},
		{"punched metadata page", "metadata page 0 does not match its digest in the tree", func(f *os.File) error {
			return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, meta, 4096)
		}},
		{"changed tree node", "tree node 0 at level 1 does not match", func(f *os.File) error {
			b := []byte{0}
			f.ReadAt(b, tree+40)
			b[0] ^= 1
			_, err := f.WriteAt(b, tree+40)
			return err
		}},
		{"zeroed root slots", "no committed state", func(f *os.File) error {
			_, err := f.WriteAt(make([]byte, 8192), 128<<10)
			return err
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cp := filepath.Join(e.dir, strings.ReplaceAll(c.name, " ", "_")+".img")
			copyFile(t, img, cp)
			f, err := os.OpenFile(cp, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			if err := c.change(f); err != nil {
				t.Fatal(err)
			}
			f.Close()
			out, err := runErr("unseal", "--in", cp, "--out", cp+".raw", "--psp", e.psp)
			if err == nil || !strings.Contains(out, c.want) {
				t.Fatalf("unseal: %v %s", err, out)
			}
			if _, err := os.Stat(cp + ".raw"); err == nil {
				t.Fatal("a refused unseal left its output")
			}
			// scrub: a report that is not clean, or (an image it cannot open) the reason.
			out, err = runErr("scrub", cp, "--psp", e.psp, "--json")
			if err == nil || !strings.Contains(out, `"clean": false`) && !strings.Contains(out, c.want) {
				t.Fatalf("scrub: %v %s", err, out)
			}
		})
	}
	// The untouched image still unseals to its source.
	run(t, "unseal", "--in", img, "--out", img+".raw", "--psp", e.psp)
	cmpFiles(t, src, img+".raw", 256<<10)
}

// TestWholeImageRollback: after a flush through the served FUSE file, an older copy of the
// whole image is refused at attach and by unseal, naming both counters.
func TestWholeImageRollback(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "disk.raw")
	fill(t, src, 0, 64<<10, 9)
	img := filepath.Join(e.dir, "vm1.img")
	e.seal(t, src, img)
	old := img + ".old"
	copyFile(t, img, old)
	s := startConfigServe(t, e)
	s.adminRun(t, "attach", "--name", "vm1", "--image", img, "--firmware", e.fw)
	f, err := os.OpenFile(filepath.Join(s.mnt, "vm1.raw"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xee}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil { // FLUSH: the counter goes to 1
		t.Fatal(err)
	}
	f.Close()
	// A copy taken now is the image of a host that crashed after the flush: scrub recovers
	// its committed journal in memory and reports the counter it began from.
	crashed := img + ".crashed"
	copyFile(t, img, crashed)
	// The attestation report carries the counter the flush committed, and the root.
	nonce := strings.Repeat("ab", 24)
	rep := filepath.Join(e.dir, "report.json")
	s.adminRun(t, "attest", "vm1", "--nonce", nonce, "--out", rep)
	out := run(t, "attest", "verify", rep, "--vendor-root", filepath.Join(e.vendor, "vendor.crt"), "--nonce", nonce)
	if !regexp.MustCompile(`image counter 1 root [0-9a-f]{64}`).MatchString(out) {
		t.Fatalf("attest verify printed no counter 1 and root:\n%s", out)
	}
	s.adminRun(t, "detach", "vm1")
	if r, failed := scrubJSON(t, e, crashed); failed || r["counter"] != 1.0 || r["recovered_blocks"] == nil || r["recovered_blocks"].(float64) == 0 || !strings.Contains(r["tree"].(string), "recovery") {
		t.Fatalf("scrub of the copy taken after the flush: %v", r)
	}
	if err := os.Rename(old, img); err != nil {
		t.Fatal(err)
	}
	out, err = runErr("admin", "--socket", s.admin, "attach", "--name", "vm1", "--image", img, "--firmware", e.fw)
	if err == nil || !strings.Contains(out, "image rolled back: counter 0, expected 1") {
		t.Fatalf("attach of the older copy: %v %s", err, out)
	}
	out, err = runErr("unseal", "--in", img, "--out", img+".raw", "--psp", e.psp)
	if err == nil || !strings.Contains(out, "image rolled back: counter 0, expected 1") {
		t.Fatalf("unseal of the older copy: %v %s", err, out)
	}
}

// TestOlderSectorAndPageThroughBinary: a sector and its entry, or a whole metadata page, put
// back from an older authentic copy of the image (taken after an earlier flush) is refused by
// the tree — never the older data.
func TestOlderSectorAndPageThroughBinary(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "disk.raw")
	fill(t, src, 0, 64<<10, 9)
	img := filepath.Join(e.dir, "vm1.img")
	e.seal(t, src, img)
	m := inspectJSON(t, img)
	meta, data := int64(m["meta_offset"].(float64)), int64(m["data_offset"].(float64))
	s := startConfigServe(t, e)
	write := func(b byte) {
		s.adminRun(t, "attach", "--name", "vm1", "--image", img, "--firmware", e.fw)
		f, err := os.OpenFile(filepath.Join(s.mnt, "vm1.raw"), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt(bytes.Repeat([]byte{b}, 4096), 0); err != nil {
			t.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		f.Close()
		s.adminRun(t, "detach", "vm1") // a checkpoint: data and pages in place
	}
	write(0x11)
	old := img + ".old"
	copyFile(t, img, old)
	write(0x22)
	for _, c := range []struct {
		name string
		off  []int64 // ranges copied from the old copy: offset, length
	}{
		{"older sector and entry", []int64{data, 4096, meta, 64}},
		{"older metadata page", []int64{meta, 4096}},
	} {
		t.Run(c.name, func(t *testing.T) {
			cp := img + ".cp"
			copyFile(t, img, cp)
			from, err := os.Open(old)
			if err != nil {
				t.Fatal(err)
			}
			to, err := os.OpenFile(cp, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			for i := 0; i < len(c.off); i += 2 {
				b := make([]byte, c.off[i+1])
				from.ReadAt(b, c.off[i])
				if _, err := to.WriteAt(b, c.off[i]); err != nil {
					t.Fatal(err)
				}
			}
			from.Close()
			to.Close()
			out, err := runErr("unseal", "--in", cp, "--out", cp+".raw", "--psp", e.psp)
			if err == nil || !strings.Contains(out, "metadata page 0 does not match its digest in the tree") {
				t.Fatalf("unseal: %v %s", err, out)
			}
		})
	}
	// The current image reads the newest data.
	run(t, "unseal", "--in", img, "--out", img+".raw", "--psp", e.psp)
	got, err := os.ReadFile(img + ".raw")
	if err != nil || !bytes.Equal(got[:4096], bytes.Repeat([]byte{0x22}, 4096)) {
		t.Fatalf("current image: %v", err)
	}
}
