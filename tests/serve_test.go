package tests

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// server is a running `sealdisk serve`.
type server struct {
	cmd  *exec.Cmd
	log  *bytes.Buffer
	sock string
	mnt  string
}

// startServe runs sealdisk serve for one image with NBD on a unix socket and, when fuse is
// set, a FUSE mount; it waits until both are up.
func startServe(t *testing.T, e *env, img string, fuse bool, extra ...string) *server {
	t.Helper()
	s := &server{log: &bytes.Buffer{}, sock: filepath.Join(e.dir, fmt.Sprintf("nbd-%d.sock", time.Now().UnixNano()))}
	args := []string{"serve", "--psp", e.psp, "--image", img, "--firmware", e.fw, "--name", "vm1", "--nbd", "unix:" + s.sock}
	if fuse {
		requireFUSE(t)
		s.mnt = filepath.Join(e.dir, "mnt")
		args = append(args, "--fuse-mountpoint", s.mnt)
	}
	s.cmd = exec.Command(sealdisk, append(args, extra...)...)
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.stop(t) })
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		_, err := os.Stat(s.sock)
		fuseUp := !fuse
		if fuse {
			_, ferr := os.Stat(filepath.Join(s.mnt, "vm1.raw"))
			fuseUp = ferr == nil
		}
		if err == nil && fuseUp {
			return s
		}
		if s.cmd.ProcessState != nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("serve did not come up:\n%s", s.log)
	return nil
}

func (s *server) uri() string { return "nbd+unix:///vm1?socket=" + s.sock }

// stop sends SIGTERM and requires a clean exit (0) with nothing left mounted.
func (s *server) stop(t *testing.T) {
	if s.cmd.ProcessState != nil {
		return
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- s.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("serve exited with %v:\n%s", err, s.log)
		}
	case <-time.After(30 * time.Second):
		s.cmd.Process.Kill()
		t.Errorf("serve did not stop within 30 s:\n%s", s.log)
	}
	if s.mnt != "" {
		if out, _ := exec.Command("mount").Output(); strings.Contains(string(out), s.mnt) {
			t.Errorf("%s still mounted after serve stopped", s.mnt)
		}
	}
}

func requireFUSE(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("/dev/fuse missing (CI=true)")
		}
		t.Skip("no /dev/fuse")
	}
	requireTool(t, "fusermount3")
}

func qemuImg(t *testing.T, args ...string) string {
	t.Helper()
	requireTool(t, "qemu-img")
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestServeNBDAndFUSECompareAndConvert: the served image equals the original raw image over
// NBD and through the FUSE file; a raw image converted into the export unseals to the same
// bytes after serve stops.
func TestServeNBDAndFUSECompareAndConvert(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "disk.raw")
	fill(t, src, 0, 24<<20, 5)
	img := src + ".img"
	e.seal(t, src, img)
	s := startServe(t, e, img, true)
	if out := qemuImg(t, "compare", "-f", "raw", "-F", "raw", src, s.uri()); !strings.Contains(out, "identical") {
		t.Fatal(out)
	}
	if out := qemuImg(t, "compare", "-f", "raw", "-F", "raw", src, filepath.Join(s.mnt, "vm1.raw")); !strings.Contains(out, "identical") {
		t.Fatal(out)
	}
	other := filepath.Join(e.dir, "other.raw")
	fill(t, other, 0, 24<<20, 9)
	qemuImg(t, "convert", "-n", "-f", "raw", "-O", "raw", other, s.uri())
	s.stop(t)
	run(t, "unseal", "--in", img, "--out", img+".out", "--psp", e.psp)
	cmpFiles(t, other, img+".out", 24<<20)
}

// TestServeRefusesWrongFirmware: a VM whose firmware does not match is not attached, and the
// service says why.
func TestServeRefusesWrongFirmware(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "disk.raw")
	fill(t, src, 0, 1<<20, 5)
	e.seal(t, src, src+".img")
	bad := filepath.Join(e.dir, "evil.fd")
	os.WriteFile(bad, []byte("not the firmware the provider allowed"), 0o644)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, sealdisk, "serve", "--psp", e.psp, "--image", src+".img", "--firmware", bad, "--nbd", "unix:"+filepath.Join(e.dir, "s.sock")).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "firmware measurement not allowed") {
		t.Fatalf("serve with the wrong firmware: %v\n%s", err, out)
	}
}

// bootGuest boots Debian's kernel and initrd with root on drive and returns the console.
func bootGuest(t *testing.T, drive, marker string) string {
	t.Helper()
	kernel, initrd := guestKernel(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot",
		"-kernel", kernel, "-initrd", initrd,
		"-append", "console=ttyS0 root=/dev/vda rw rootfstype=ext4 panic=-1 quiet sealdisk.marker="+marker,
		"-drive", drive)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("guest: %v\n%s", err, out)
	}
	return string(out)
}

func guestRoot(t *testing.T, e *env) (raw, img string) {
	requireTool(t, "mkfs.ext4")
	raw = filepath.Join(e.dir, "root.raw")
	if out, err := exec.Command("../scripts/guest/mkroot.sh", raw, "64M").CombinedOutput(); err != nil {
		t.Fatalf("mkroot: %v\n%s", err, out)
	}
	img = raw + ".img"
	e.seal(t, raw, img)
	return raw, img
}

func markerIn(t *testing.T, e *env, img string) string {
	requireTool(t, "debugfs")
	out := img + ".unsealed"
	run(t, "unseal", "--in", img, "--out", out, "--psp", e.psp, "--force")
	b, err := exec.Command("debugfs", "-R", "cat /marker.txt", out).Output()
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func checkConsole(t *testing.T, console, marker string) {
	sc := bufio.NewScanner(strings.NewReader(console))
	var hello, wrote bool
	for sc.Scan() {
		hello = hello || strings.Contains(sc.Text(), "GUEST: hello=hello from a sealed image")
		wrote = wrote || strings.Contains(sc.Text(), "GUEST: wrote "+marker)
	}
	if !hello || !wrote {
		t.Fatalf("guest did not read the sealed file and write its marker:\n%s", console)
	}
}

// TestGuestBootsOverNBD: a real guest boots with its root on the sealed image over NBD, reads
// a file sealed into the image, writes a marker and powers off; unseal shows the marker.
func TestGuestBootsOverNBD(t *testing.T) {
	if testing.Short() {
		t.Skip("guest boot in -short mode")
	}
	e := newEnv(t)
	_, img := guestRoot(t, e)
	s := startServe(t, e, img, false)
	marker := fmt.Sprintf("nbd-%d", time.Now().UnixNano())
	checkConsole(t, bootGuest(t, "file="+s.uri()+",format=raw,if=virtio", marker), marker)
	s.stop(t)
	if got := markerIn(t, e, img); got != marker {
		t.Fatalf("marker after serve stopped: %q, want %q", got, marker)
	}
}

// TestGuestBootsOverFUSE: the same through MOUNT/vm1.raw with cache=none (O_DIRECT).
func TestGuestBootsOverFUSE(t *testing.T) {
	if testing.Short() {
		t.Skip("guest boot in -short mode")
	}
	e := newEnv(t)
	_, img := guestRoot(t, e)
	s := startServe(t, e, img, true)
	marker := fmt.Sprintf("fuse-%d", time.Now().UnixNano())
	checkConsole(t, bootGuest(t, "file="+filepath.Join(s.mnt, "vm1.raw")+",format=raw,if=virtio,cache=none", marker), marker)
	s.stop(t)
	if got := markerIn(t, e, img); got != marker {
		t.Fatalf("marker after serve stopped: %q, want %q", got, marker)
	}
}
