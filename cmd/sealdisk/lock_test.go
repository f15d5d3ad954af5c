package main

import (
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/store"
)

// The offline tools take the server's lock: an image held read-write (as an attached VM holds
// it) is neither unsealed nor resealed, one held read-only is unsealed but not resealed, and
// inspect reads either; a seal or create whose OUT.tmp another one is writing is refused and
// leaves that file alone, while a leftover of a crashed one is replaced.
func TestOfflineToolsRespectTheLock(t *testing.T) {
	d := t.TempDir()
	p := func(s string) string { return filepath.Join(d, s) }
	ok(t, "vendor", "init", "--dir", p("vendor"))
	ok(t, "psp", "init", "--dir", p("psp"), "--vendor", p("vendor"), "--kem", "p384")
	ok(t, "psp", "init", "--dir", p("psp2"), "--vendor", p("vendor"), "--kem", "p384")
	ok(t, "provider", "keygen", "--dir", p("prov"))
	ok(t, "psp", "trust", "add", "--dir", p("psp"), p("prov/provider.pub"))
	must(t, os.WriteFile(p("fw"), []byte("firmware"), 0o644))
	raw := make([]byte, 64<<10)
	rand.Read(raw)
	must(t, os.WriteFile(p("disk.raw"), raw, 0o644))
	cert := []string{"--chip", p("psp/chip.crt"), "--vendor-root", p("vendor/vendor.crt"), "--provider-key", p("prov/provider.key"), "--firmware", p("fw")}
	ok(t, append([]string{"seal", "--in", p("disk.raw"), "--out", p("vm.img")}, cert...)...)
	reseal := []string{"reseal", "--in", p("vm.img"), "--psp", p("psp"), "--to-chip", p("psp2/chip.crt"), "--vendor-root", p("vendor/vendor.crt"), "--provider-key", p("prov/provider.key")}
	refused := func(what string, args ...string) {
		t.Helper()
		_, err := sealdisk(t, args...)
		if !errors.Is(err, store.ErrLocked) || !strings.Contains(err.Error(), what) {
			t.Fatalf("sealdisk %s on a held image: %v; want ErrLocked and %q", args[0], err, what)
		}
	}

	w, err := store.OpenLocked(p("vm.img"), false)
	must(t, err)
	refused("unseal: "+p("vm.img")+" is in use", "unseal", "--in", p("vm.img"), "--out", p("out.raw"), "--psp", p("psp"))
	refused("reseal: "+p("vm.img")+" is in use", reseal...)
	refused("scrub: "+p("vm.img")+" is in use", "scrub", p("vm.img"), "--psp", p("psp"))
	if _, err := os.Stat(p("out.raw")); err == nil {
		t.Fatal("a refused unseal wrote its output")
	}
	inspect(t, p("vm.img")) // lock-free
	w.Close()

	r, err := store.OpenLocked(p("vm.img"), true)
	must(t, err)
	ok(t, "unseal", "--in", p("vm.img"), "--out", p("out.raw"), "--psp", p("psp"))
	ok(t, "scrub", p("vm.img"), "--psp", p("psp")) // readers share
	refused("reseal: "+p("vm.img")+" is in use", reseal...)
	r.Close()
	ok(t, reseal...)

	// OUT.tmp held by another seal: refused, and not removed.
	must(t, os.WriteFile(p("new.img.tmp"), []byte("being written"), 0o600))
	tmp, err := store.OpenLocked(p("new.img.tmp"), false)
	must(t, err)
	refused("another seal or create is writing "+p("new.img"), append([]string{"seal", "--in", p("disk.raw"), "--out", p("new.img")}, cert...)...)
	refused("another seal or create is writing "+p("new.img"), append([]string{"create", "--size", "1M", "--out", p("new.img")}, cert...)...)
	if b, err := os.ReadFile(p("new.img.tmp")); err != nil || string(b) != "being written" {
		t.Fatalf("a refused seal touched the other's temporary file: %q, %v", b, err)
	}
	tmp.Close()
	// Unlocked, it is a leftover: replaced.
	ok(t, append([]string{"seal", "--in", p("disk.raw"), "--out", p("new.img")}, cert...)...)
	if _, err := os.Stat(p("new.img.tmp")); err == nil {
		t.Fatal("temporary file left behind")
	}
}

// A seal or create holds its OUT.tmp locked while it writes, so a second one is refused
// instead of deleting it; the finished image is unlocked.
func TestNewImageHoldsItsTemporaryFile(t *testing.T) {
	d := t.TempDir()
	p := func(s string) string { return filepath.Join(d, s) }
	ok(t, "vendor", "init", "--dir", p("vendor"))
	ok(t, "psp", "init", "--dir", p("psp"), "--vendor", p("vendor"), "--kem", "p384")
	ok(t, "provider", "keygen", "--dir", p("prov"))
	cmd := &cobra.Command{}
	var f certFlags
	f.register(cmd)
	must(t, cmd.Flags().Parse([]string{"--chip", p("psp/chip.crt"), "--vendor-root", p("vendor/vendor.crt"), "--provider-key", p("prov/provider.key"), "--measurement", strings.Repeat("00", 48)}))
	_, _, finish, err := newImage(p("vm.img"), &f, 1<<20, format.Layout{})
	must(t, err)
	if o, err := store.OpenLocked(p("vm.img.tmp"), true); !errors.Is(err, store.ErrLocked) {
		o.Close()
		t.Fatalf("OUT.tmp being written is not locked: %v", err)
	}
	if _, _, _, err := newImage(p("vm.img"), &f, 1<<20, format.Layout{}); !errors.Is(err, store.ErrLocked) {
		t.Fatalf("second newImage on the same --out: %v", err)
	}
	must(t, finish(nil))
	o, err := store.OpenLocked(p("vm.img"), false)
	must(t, err)
	o.Close()
}
