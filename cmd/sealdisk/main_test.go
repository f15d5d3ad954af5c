package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	mrand "math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/engine"
	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/image"
	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/sector"
	"github.com/sealdisk/sealdisk/store/storetest"
)

func TestParseSize(t *testing.T) {
	for in, want := range map[string]uint64{
		"4096": 4096, "1K": 1 << 10, "10M": 10 << 20, "20G": 20 << 30, "20g": 20 << 30, "2T": 2 << 40,
		"20GiB": 20 << 30, "20GB": 20 << 30, " 3M ": 3 << 20, "1P": 1 << 50,
	} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "0", "-1G", "1.5G", "G", "12X", "2P", "99999999999T"} {
		if _, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) accepted", in)
		}
	}
}

// sealdisk runs the command tree in process and returns its standard output.
func sealdisk(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRoot()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(append([]string{"--log-level", "error"}, args...))
	err := root.Execute()
	return out.String(), err
}

func ok(t *testing.T, args ...string) string {
	t.Helper()
	out, err := sealdisk(t, args...)
	if err != nil {
		t.Fatalf("sealdisk %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func inspect(t *testing.T, args ...string) map[string]any {
	t.Helper()
	var m map[string]any
	out := ok(t, append([]string{"inspect", "--json"}, args...)...)
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("inspect --json: %v\n%s", err, out)
	}
	return m
}

func TestCommandsInProcess(t *testing.T) {
	d := t.TempDir()
	p := func(s string) string { return filepath.Join(d, s) }
	ok(t, "vendor", "init", "--dir", p("vendor"), "--name", "test vendor")
	ok(t, "psp", "init", "--dir", p("psp"), "--vendor", p("vendor"))
	ok(t, "provider", "keygen", "--dir", p("prov"))
	ok(t, "provider", "keygen", "--dir", p("prov2"), "--alg", "ed25519")
	ok(t, "psp", "trust", "add", "--dir", p("psp"), p("prov/provider.pub"))
	must(t, os.WriteFile(p("fw"), []byte("firmware"), 0o644))
	digest := strings.TrimSpace(ok(t, "measure", p("fw")))
	if len(digest) != 96 {
		t.Fatalf("measure printed %q", digest)
	}
	cert := []string{"--chip", p("psp/chip.crt"), "--vendor-root", p("vendor/vendor.crt"), "--provider-key", p("prov/provider.key")}

	// create: a blank image; sizes take suffixes; flags are checked before anything is written.
	if _, err := sealdisk(t, append([]string{"create", "--size", "1M", "--out", p("x.img")}, cert...)...); err == nil || !strings.Contains(err.Error(), "--firmware or --measurement") {
		t.Fatalf("create without measurements: %v", err)
	}
	// A remote key: the image key comes from a 0600 file (as 'broker put --key-out' writes
	// it); the certificate names the broker and key id and carries no sealed key.
	remote := append([]string{"create", "--size", "1M", "--out", p("remote.img"), "--firmware", p("fw"), "--broker-url", "https://kb.example", "--key-id", "k1"}, cert...)
	if _, err := sealdisk(t, remote...); err == nil || !strings.Contains(err.Error(), "--key-file") {
		t.Fatalf("create with a remote key and no key file: %v", err)
	}
	if err := os.WriteFile(p("k1.key"), bytes.Repeat([]byte{7}, 32), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := sealdisk(t, append(remote, "--key-file", p("k1.key"))...); err == nil || !strings.Contains(err.Error(), "permissions") {
		t.Fatalf("create with a world-readable key file: %v", err)
	}
	os.Chmod(p("k1.key"), 0o600)
	ok(t, append(remote, "--key-file", p("k1.key"))...)
	if rm := inspect(t, p("remote.img"), "--trust", p("psp/trust")); rm["remote_key"] != true || rm["broker_url"] != "https://kb.example" || rm["key_id"] != "k1" {
		t.Fatalf("inspect of a remote-key image: %v", rm)
	}
	ok(t, append([]string{"create", "--size", "2M", "--out", p("blank.img"), "--measurement", digest, "--read-only"}, cert...)...)
	m := inspect(t, p("blank.img"), "--trust", p("psp/trust"))
	if m["virtual_size"].(float64) != 2<<20 || m["read_only"] != true || m["signature"] != "valid" || m["journal"] != "empty" ||
		m["allocated_data_bytes"].(float64) != 0 || m["measurements"].([]any)[0] != digest {
		t.Fatalf("inspect blank: %v", m)
	}

	// seal → unseal round trip, through OUT.tmp files that do not stay behind.
	raw := make([]byte, 3*4096+5)
	rand.Read(raw)
	must(t, os.WriteFile(p("disk.raw"), raw, 0o644))
	ok(t, append([]string{"seal", "--in", p("disk.raw"), "--out", p("vm.img"), "--firmware", p("fw"), "--suite", "chacha20-poly1305"}, cert...)...)
	if _, err := sealdisk(t, append([]string{"seal", "--in", p("disk.raw"), "--out", p("vm.img"), "--firmware", p("fw")}, cert...)...); err == nil {
		t.Fatal("seal overwrote an existing image")
	}
	ok(t, "unseal", "--in", p("vm.img"), "--out", p("out.raw"), "--psp", p("psp"))
	got, err := os.ReadFile(p("out.raw"))
	must(t, err)
	if !bytes.Equal(got[:len(raw)], raw) || len(got) != 4*4096 {
		t.Fatal("unsealed bytes differ")
	}
	if _, err := sealdisk(t, "unseal", "--in", p("vm.img"), "--out", p("out.raw"), "--psp", p("psp")); err == nil || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("unseal over an existing file: %v", err)
	}
	ok(t, "unseal", "--in", p("vm.img"), "--out", p("out.raw"), "--psp", p("psp"), "--force")
	if tmps, _ := filepath.Glob(p("*.tmp")); len(tmps) > 0 {
		t.Fatalf("temporary files left behind: %v", tmps)
	}

	// inspect: trust is repeatable; the verdict names what is wrong.
	m = inspect(t, p("vm.img"))
	if m["signature"] != "not checked" || m["suite"] != "chacha20-poly1305" || m["header_copy"] != "primary" {
		t.Fatalf("inspect: %v", m)
	}
	if m := inspect(t, p("vm.img"), "--provider-pub", p("prov2/provider.pub")); m["signature"] != "unknown provider" {
		t.Fatalf("other provider: %v", m["signature"])
	}
	if m := inspect(t, p("vm.img"), "--provider-pub", p("prov2/provider.pub"), "--trust", p("prov/provider.pub")); m["signature"] != "valid" {
		t.Fatalf("two trust sources: %v", m["signature"])
	}
	text := ok(t, "inspect", p("vm.img"))
	for _, want := range []string{"header copy:", "primary", "journal:", "empty", "signature:", "not checked"} {
		if !strings.Contains(text, want) {
			t.Fatalf("inspect text lacks %q:\n%s", want, text)
		}
	}

	// A crashed image: a FUA write of sector 1 committed in the journal only. inspect shows
	// the committed blocks; unseal recovers them in memory and leaves the image unchanged.
	newData := bytes.Repeat([]byte{0x5a}, 4096)
	crashAfterFUA(t, p("vm.img"), p("psp"), p("crashed.img"), 1, newData)
	m = inspect(t, p("crashed.img"))
	if m["format_version"].(float64) != 2 || m["integrity_tree"] != true || !strings.HasPrefix(m["journal"].(string), "holds") {
		t.Fatalf("inspect crashed image: %v", m)
	}
	before, err := os.ReadFile(p("crashed.img"))
	must(t, err)
	ok(t, "unseal", "--in", p("crashed.img"), "--out", p("replayed.raw"), "--psp", p("psp"))
	got, err = os.ReadFile(p("replayed.raw"))
	must(t, err)
	if !bytes.Equal(got[4096:8192], newData) || !bytes.Equal(got[:4096], raw[:4096]) || !bytes.Equal(got[8192:len(raw)], raw[8192:]) {
		t.Fatal("unseal did not recover the committed journal")
	}
	if after, err := os.ReadFile(p("crashed.img")); err != nil || !bytes.Equal(after, before) {
		t.Fatalf("unseal changed the image it read (%v)", err)
	}
	img, err := image.Open(p("vm.img"), true)
	must(t, err)
	img.Close()

	// reseal to another chip carries the counter (1) in a provider-signed root record; the
	// new chip opens the image and records that counter.
	cp := exec.Command("cp", "--sparse=always", p("crashed.img"), p("moved.img"))
	if out, err := cp.CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	ok(t, "psp", "init", "--dir", p("psp2"), "--vendor", p("vendor"))
	ok(t, "psp", "trust", "add", "--dir", p("psp2"), p("prov/provider.pub"))
	ok(t, "reseal", "--in", p("moved.img"), "--psp", p("psp"), "--to-chip", p("psp2/chip.crt"), "--vendor-root", p("vendor/vendor.crt"), "--provider-key", p("prov/provider.key"))
	carried := false
	for _, r := range inspect(t, p("moved.img"))["root_slots"].([]any) {
		r := r.(map[string]any)
		carried = carried || (r["auth"] == "provider" && r["counter"] == float64(1))
	}
	if !carried {
		t.Fatalf("reseal wrote no provider-signed record with counter 1: %v", inspect(t, p("moved.img"))["root_slots"])
	}
	ok(t, "unseal", "--in", p("moved.img"), "--out", p("moved.raw"), "--psp", p("psp2"))
	if got, err := os.ReadFile(p("moved.raw")); err != nil || !bytes.Equal(got[4096:8192], newData) {
		t.Fatalf("the resealed image reads differently on the new chip (%v)", err)
	}
	p2, err := psp.Open(p("psp2"), psp.Options{})
	must(t, err)
	if n, known, err := p2.ImageCounter(img.Header.UUID); err != nil || !known || n != 1 {
		t.Fatalf("the new chip holds counter %d (known %v, %v), want 1", n, known, err)
	}

	// A failed unseal leaves nothing behind and names the sector.
	// (crashed.img: the PSP's counter is its now, and vm.img is behind it.)
	if _, err := sealdisk(t, "unseal", "--in", p("vm.img"), "--out", p("old.raw"), "--psp", p("psp")); err == nil || !strings.Contains(err.Error(), "image rolled back: counter 0, expected 1") {
		t.Fatalf("unseal of an image behind the PSP's counter: %v", err)
	}
	must(t, flipAt(p("crashed.img"), int64(img.Header.DataPos(2))+9))
	if _, err := sealdisk(t, "unseal", "--in", p("crashed.img"), "--out", p("bad.raw"), "--psp", p("psp")); err == nil || !strings.Contains(err.Error(), "sector 2 failed authentication") {
		t.Fatalf("tampered unseal: %v", err)
	}
	if _, err := os.Stat(p("bad.raw")); err == nil {
		t.Fatal("a failed unseal left its output")
	}
	if _, err := sealdisk(t, "unseal", "--in", p("crashed.img"), "--out", p("out.raw"), "--psp", p("psp"), "--force"); err == nil {
		t.Fatal("tampered unseal succeeded")
	}
	if got, _ := os.ReadFile(p("out.raw")); !bytes.Equal(got[:len(raw)], raw) {
		t.Fatal("a failed unseal --force destroyed the existing output")
	}

	// Every command's help carries an example.
	var walk func(args []string)
	seen := 0
	walk = func(args []string) {
		root := newRoot()
		cmd, _, err := root.Find(args)
		must(t, err)
		if cmd.Example == "" {
			t.Errorf("sealdisk %s has no example", strings.Join(args, " "))
		}
		seen++
		for _, sub := range cmd.Commands() {
			if !slices.Contains([]string{"help", "completion"}, sub.Name()) {
				walk(append(slices.Clone(args), sub.Name()))
			}
		}
	}
	walk(nil)
	if seen < 15 {
		t.Fatalf("walked %d commands", seen)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func flipAt(path string, off int64) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	b := []byte{0}
	if _, err := f.ReadAt(b, off); err != nil {
		return err
	}
	b[0] ^= 0xff
	_, err = f.WriteAt(b, off)
	return err
}

// crashAfterFUA copies the image at in into a crashable store, writes data at lba with FUA
// through the engine, and saves what a crash right after the acknowledgement leaves (the
// synced state only) at out.
func crashAfterFUA(t *testing.T, in, pspDir, out string, lba int64, data []byte) {
	t.Helper()
	b, err := os.ReadFile(in)
	must(t, err)
	st := storetest.NewCrash()
	must(t, st.Truncate(int64(len(b))))
	for off := 0; off < len(b); off += 64 << 10 { // sparse: the journal region is mostly holes
		if c := b[off:min(off+64<<10, len(b))]; !bytes.Equal(c, make([]byte, len(c))) {
			_, err = st.WriteAt(c, int64(off))
			must(t, err)
		}
	}
	must(t, st.Sync())
	img, err := image.Open(in, true)
	must(t, err)
	defer img.Close()
	pp, err := psp.Open(pspDir, psp.Options{})
	must(t, err)
	key, err := pp.UnsealImageKey(img.Cert, img.Header)
	must(t, err)
	roots, err := pp.RootsFor(img.Cert)
	must(t, err)
	eng := engine.New(engine.Options{IdleFlush: time.Hour})
	defer eng.Close()
	h := img.Header
	must(t, eng.LoadKey(1, psp.Binding{Suite: h.Suite, Key: key, UUID: h.UUID, SectorSize: int(h.SectorSize), Roots: roots}))
	d, err := eng.Attach(1, st, false)
	must(t, err)
	must(t, d.WriteAt(context.Background(), data, lba*int64(h.SectorSize), true))
	crashed := st.Crash(mrand.New(mrand.NewSource(1)), 0)
	must(t, d.Close())
	size, err := crashed.Size()
	must(t, err)
	f, err := os.OpenFile(out, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	must(t, err)
	defer f.Close()
	must(t, f.Truncate(size))
	c := make([]byte, 64<<10)
	for off := int64(0); off < size; off += int64(len(c)) {
		c := c[:min(int64(len(c)), size-off)]
		_, err = crashed.ReadAt(c, off)
		must(t, err)
		if !bytes.Equal(c, make([]byte, len(c))) {
			_, err = f.WriteAt(c, off)
			must(t, err)
		}
	}
}

// TestVersion1Images: a version-1 image (sealed here as the tools did before version 2) still
// unseals, its journal replayed in memory; upgrade makes a version-2 image of it with the same
// UUID that unseals to the same bytes and scrubs clean, and leaves the input as it was.
func TestVersion1Images(t *testing.T) {
	d := t.TempDir()
	p := func(s string) string { return filepath.Join(d, s) }
	ok(t, "vendor", "init", "--dir", p("vendor"), "--name", "test vendor")
	ok(t, "psp", "init", "--dir", p("psp"), "--vendor", p("vendor"))
	ok(t, "provider", "keygen", "--dir", p("prov"))
	ok(t, "psp", "trust", "add", "--dir", p("psp"), p("prov/provider.pub"))
	must(t, os.WriteFile(p("fw"), []byte("firmware"), 0o644))
	raw := make([]byte, 8*4096)
	rand.Read(raw)
	must(t, os.WriteFile(p("disk.raw"), raw, 0o644))

	f := certFlags{chip: p("psp/chip.crt"), vendorRoot: p("vendor/vendor.crt"), providerKey: p("prov/provider.key"),
		firmware: []string{p("fw")}, suite: "auto", sectorSize: 4096, validFor: time.Hour}
	img, c, finish, err := newImage(p("v1.img"), &f, uint64(len(raw)), format.Layout{Version: format.HeaderVersion1})
	must(t, err)
	sess, err := c.NewSession()
	must(t, err)
	src, err := os.Open(p("disk.raw"))
	must(t, err)
	must(t, image.Seal(context.Background(), src, img, sess, nil))
	src.Close()
	writeTrimJournal(t, img, c, 1) // as a crashed version-1 engine would leave it
	must(t, finish(nil))
	want := bytes.Clone(raw)
	clear(want[4096:8192])

	if m := inspect(t, p("v1.img")); m["format_version"].(float64) != 1 || m["journal_records"].(float64) != 1 {
		t.Fatalf("inspect v1: %v", m)
	}
	ok(t, "unseal", "--in", p("v1.img"), "--out", p("v1.raw"), "--psp", p("psp"))
	if got, err := os.ReadFile(p("v1.raw")); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("v1 unseal (journal replayed) differs: %v", err)
	}
	if _, err := sealdisk(t, "scrub", p("v1.img"), "--psp", p("psp")); err == nil || !strings.Contains(err.Error(), "version-1 image") {
		t.Fatalf("scrub of a v1 image: %v", err)
	}
	before, err := os.ReadFile(p("v1.img"))
	must(t, err)
	ok(t, "upgrade", "--in", p("v1.img"), "--out", p("v2.img"), "--psp", p("psp"))
	if after, err := os.ReadFile(p("v1.img")); err != nil || !bytes.Equal(after, before) {
		t.Fatal("upgrade changed its input")
	}
	m1, m2 := inspect(t, p("v1.img")), inspect(t, p("v2.img"))
	if m2["format_version"].(float64) != 2 || m2["integrity_tree"] != true || m2["image_uuid"] != m1["image_uuid"] || m2["cert_sha384"] != m1["cert_sha384"] {
		t.Fatalf("upgraded: %v", m2)
	}
	ok(t, "unseal", "--in", p("v2.img"), "--out", p("v2.raw"), "--psp", p("psp"))
	if got, err := os.ReadFile(p("v2.raw")); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("the upgraded image reads differently: %v", err)
	}
	ok(t, "scrub", p("v2.img"), "--psp", p("psp"))
	if _, err := sealdisk(t, "upgrade", "--in", p("v2.img"), "--out", p("v3.img"), "--psp", p("psp")); err == nil || !strings.Contains(err.Error(), "already a version-2 image") {
		t.Fatalf("upgrade of a v2 image: %v", err)
	}
}

// writeTrimJournal writes an epoch-1 version-1 journal holding one trim record for lba.
func writeTrimJournal(t *testing.T, img *image.Image, c *sector.Cipher, lba uint64) {
	t.Helper()
	hdr := make([]byte, sector.JournalHeaderSize)
	c.MarshalJournalHeader(1, hdr)
	rec := make([]byte, sector.JournalRecordSize)
	c.MarshalJournalRecord(&sector.JournalRecord{Kind: sector.RecordZero, Epoch: 1, Seq: 0, LBA: lba}, rec)
	off := int64(img.Header.JournalOffset)
	_, err := img.Store.WriteAt(hdr, off)
	must(t, err)
	_, err = img.Store.WriteAt(rec, off+sector.JournalHeaderSize)
	must(t, err)
}

// TestNoIntegrityTree: --no-integrity-tree makes a version-2 image without the tree (a root
// record, counter and data journal still); it round-trips and scrub says it has no tree.
func TestNoIntegrityTree(t *testing.T) {
	d := t.TempDir()
	p := func(s string) string { return filepath.Join(d, s) }
	ok(t, "vendor", "init", "--dir", p("vendor"), "--name", "test vendor")
	ok(t, "psp", "init", "--dir", p("psp"), "--vendor", p("vendor"))
	ok(t, "provider", "keygen", "--dir", p("prov"))
	ok(t, "psp", "trust", "add", "--dir", p("psp"), p("prov/provider.pub"))
	must(t, os.WriteFile(p("fw"), []byte("firmware"), 0o644))
	raw := make([]byte, 5*4096)
	rand.Read(raw)
	must(t, os.WriteFile(p("disk.raw"), raw, 0o644))
	ok(t, "seal", "--in", p("disk.raw"), "--out", p("vm.img"), "--firmware", p("fw"), "--no-integrity-tree",
		"--chip", p("psp/chip.crt"), "--vendor-root", p("vendor/vendor.crt"), "--provider-key", p("prov/provider.key"))
	if m := inspect(t, p("vm.img")); m["format_version"].(float64) != 2 || m["integrity_tree"] != false || m["root_slots"] == nil {
		t.Fatalf("inspect: %v", m)
	}
	ok(t, "unseal", "--in", p("vm.img"), "--out", p("out.raw"), "--psp", p("psp"))
	if got, err := os.ReadFile(p("out.raw")); err != nil || !bytes.Equal(got, raw) {
		t.Fatalf("round trip: %v", err)
	}
	if out := ok(t, "scrub", p("vm.img"), "--psp", p("psp")); !strings.Contains(out, "no integrity tree") {
		t.Fatalf("scrub: %s", out)
	}
}
