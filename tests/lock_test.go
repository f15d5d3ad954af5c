package tests

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestTwoServesOnOneImage: the corruption, tried again. A second `sealdisk serve` on
// an image the first serves read-write (by another path) is refused with the lock's message
// and exits; unseal is refused while the first serves; the first's writes are intact in the
// image after it stops (unseal clean).
func TestTwoServesOnOneImage(t *testing.T) {
	e := newEnv(t)
	img := filepath.Join(e.dir, "vm.img")
	run(t, append([]string{"create", "--size", "8M", "--out", img}, e.certArgs()...)...)
	alias := filepath.Join(e.dir, "alias.img")
	if err := os.Symlink(img, alias); err != nil {
		t.Fatal(err)
	}
	s := startServe(t, e, img, false)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	second := exec.CommandContext(ctx, sealdisk, "serve", "--psp", e.psp, "--image", alias, "--firmware", e.fw,
		"--name", "vm2", "--nbd", "unix:"+filepath.Join(e.dir, "nbd2.sock"))
	out, err := second.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("the second serve kept running on a served image:\n%s", out)
	}
	if err == nil || !strings.Contains(string(out), "image is locked by another user") || !strings.Contains(string(out), "holds it read-write") {
		t.Fatalf("second serve: %v\n%s", err, out)
	}

	if out, err := runErr("unseal", "--in", img, "--out", filepath.Join(e.dir, "early.raw"), "--psp", e.psp); err == nil ||
		!strings.Contains(out, "is in use") || !strings.Contains(out, "image is locked by another user") {
		t.Fatalf("unseal of a served image: %v\n%s", err, out)
	}

	other := filepath.Join(e.dir, "other.raw")
	fill(t, other, 0, 8<<20, 9)
	qemuImg(t, "convert", "-n", "-f", "raw", "-O", "raw", other, s.uri())
	s.stop(t)
	run(t, "unseal", "--in", img, "--out", filepath.Join(e.dir, "after.raw"), "--psp", e.psp)
	cmpFiles(t, other, filepath.Join(e.dir, "after.raw"), 8<<20)
	startServe(t, e, alias, false) // the lock went with the first server
}

// TestTrustReloadWithoutRestart: `psp trust add` + SIGHUP attaches a VM its provider's absence
// kept out; `psp trust remove` + `admin reload` refuses that provider's images from then on
// and lists the VM still attached with one; no restart in between.
func TestTrustReloadWithoutRestart(t *testing.T) {
	e := newEnv(t)
	run(t, "provider", "keygen", "--dir", filepath.Join(e.dir, "prov2"), "--alg", "ed25519")
	prov2 := filepath.Join(e.dir, "prov2")
	create := func(name, provDir string) string {
		img := filepath.Join(e.dir, name+".img")
		run(t, "create", "--size", "1M", "--out", img, "--chip", filepath.Join(e.psp, "chip.crt"), "--vendor-root", filepath.Join(e.vendor, "vendor.crt"),
			"--provider-key", filepath.Join(provDir, "provider.key"), "--firmware", e.fw)
		return img
	}
	img1, img2, img3 := create("vm1", e.prov), create("vm2", prov2), create("vm3", prov2)

	cfg := filepath.Join(e.dir, "sealdisk.yaml")
	admin := filepath.Join(e.dir, "admin.sock")
	var b strings.Builder
	fmt.Fprintf(&b, "psp:\n  dir: %s\nnbd:\n  listen: [\"unix:%s\"]\nadmin:\n  socket: %s\nengine:\n  cache_size: 16M\nvms:\n", e.psp, filepath.Join(e.dir, "nbd.sock"), admin)
	for _, vm := range [][2]string{{"vm1", img1}, {"vm2", img2}} {
		fmt.Fprintf(&b, "  - name: %s\n    image: %s\n    firmware: %s\n", vm[0], vm[1], e.fw)
	}
	if err := os.WriteFile(cfg, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	s := &server{log: &bytes.Buffer{}}
	s.cmd = exec.Command(sealdisk, "serve", "--config", cfg)
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.stop(t) })
	waitFor(t, s, "admin socket", func() bool { _, err := os.Stat(admin); return err == nil })
	status := func() statusJSON {
		var st statusJSON
		if err := json.Unmarshal([]byte(run(t, "admin", "--socket", admin, "status", "--json")), &st); err != nil {
			t.Fatal(err)
		}
		return st
	}
	names := func() string {
		var n []string
		for _, v := range status().VMs {
			n = append(n, v.Name)
		}
		return strings.Join(n, ",")
	}
	if got := names(); got != "vm1" || !strings.Contains(status().NotAttached["vm2"], "unknown provider") {
		t.Fatalf("at start: %s, %v", got, status().NotAttached)
	}

	run(t, "psp", "trust", "add", "--dir", e.psp, filepath.Join(prov2, "provider.pub"))
	s.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, s, "vm2 attached after trust add + SIGHUP", func() bool { return names() == "vm1,vm2" })

	var name string
	for _, l := range strings.Split(run(t, "psp", "trust", "list", "--dir", e.psp), "\n") {
		if strings.Contains(l, "ed25519") {
			name = strings.Fields(l)[0]
		}
	}
	run(t, "psp", "trust", "remove", "--dir", e.psp, name)
	out := run(t, "admin", "--socket", admin, "reload")
	if !strings.Contains(out, "provider no longer trusted, still attached until detached: vm2") {
		t.Fatalf("admin reload after trust remove:\n%s", out)
	}
	if out, err := runErr("admin", "--socket", admin, "attach", "--name", "vm3", "--image", img3, "--firmware", e.fw); err == nil || !strings.Contains(out, "unknown provider") {
		t.Fatalf("attach of the removed provider's image: %v\n%s", err, out)
	}
	if got := names(); got != "vm1,vm2" {
		t.Fatalf("after trust remove: %s", got)
	}
}
