package tests

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/sealdisk/sealdisk/internal/clienttool"
)

// Real file clients (qemu-img, qemu-io, fio) on MOUNT/vm1.raw of the built serve.

// startFUSEServe serves img as vm1 with a FUSE mount; the mount is lazily unmounted after
// serve has stopped whatever the outcome (cleanups run last-in first-out).
func startFUSEServe(t *testing.T, e *env, img string) (*server, string) {
	t.Helper()
	requireFUSE(t)
	t.Cleanup(func() { unmountLazy(filepath.Join(e.dir, "mnt")) })
	s := startServe(t, e, img, true)
	return s, filepath.Join(s.mnt, "vm1.raw")
}

// TestFUSEQemuImgInfo: qemu-img sees a raw file of the virtual disk's size whose content is
// the original raw image.
func TestFUSEQemuImgInfo(t *testing.T) {
	e := newEnv(t)
	src, img := sparseSealed(t, e, 8<<20)
	_, file := startFUSEServe(t, e, img)
	out := qemuImg(t, "info", "--output=human", "-f", "raw", file)
	for _, want := range []string{"file format: raw", "virtual size: 8 MiB (8388608 bytes)"} {
		if !strings.Contains(out, want) {
			t.Errorf("qemu-img info lacks %q:\n%s", want, out)
		}
	}
	if out := qemuImg(t, "compare", "-f", "raw", "-F", "raw", src, file); !strings.Contains(out, "identical") {
		t.Fatal(out)
	}
	// A changed byte is seen, so the comparison above compared.
	f, err := os.OpenFile(file, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{0xff}, 6<<20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", src, file).CombinedOutput(); err == nil || !strings.Contains(string(out), "Content mismatch at offset 6291456") {
		t.Fatalf("qemu-img compare after a change: %v\n%s", err, out)
	}
}

// qemuIOPatterns is a qemu-io script over an 8 MiB disk whose [0,1M) and [4M,5M) hold data:
// large and small writes, FUA, zeroing with and without unmap, async writes and flush,
// discard, sub-sector writes, the last KiB. p shifts every pattern byte, so a second run over
// the same disk cannot pass on the first run's bytes.
func qemuIOPatterns(p byte) []string {
	c := func(f string, a ...any) []string { return []string{"-c", fmt.Sprintf(f, a...)} }
	var s []string
	for _, cmd := range [][]string{
		c("write -P %#x 0 1M", 0xab+p), c("write -P %#x -f 1M 64k", 0xcd+p),
		c("read -P %#x 0 1M", 0xab+p), c("read -P %#x 1M 64k", 0xcd+p),
		c("write -z 4k 8k"), c("read -P 0 4k 8k"), c("read -P %#x 12k 4k", 0xab+p),
		c("write -P %#x 5M 128k", 0x44+p), c("write -z -u 5M 64k"), c("read -P 0 5M 64k"), c("read -P %#x 5184k 64k", 0x44+p),
		c("aio_write -P %#x 2M 128k", 0x11+p), c("aio_write -P %#x 3M 128k", 0x22+p), c("aio_flush"),
		c("read -P %#x 2M 128k", 0x11+p), c("read -P %#x 3M 128k", 0x22+p),
		c("discard 2M 64k"), c("read -P 0 2M 64k"), c("read -P %#x 2112k 64k", 0x11+p),
		c("write -P %#x 8191k 1k", 0x33+p),
		c("write -P %#x 100 3", 0x55+p), c("read -P %#x 100 3", 0x55+p), c("read -P %#x 103 3993", 0xab+p),
		c("read -P %#x 8191k 1k", 0x33+p),
		c("flush"),
	} {
		s = append(s, cmd...)
	}
	return s
}

// TestFUSEQemuIOCacheModes: qemu-io's patterns through the file with -t none (O_DIRECT) and
// -t writeback; what the writeback run left is in the image after serve stops.
func TestFUSEQemuIOCacheModes(t *testing.T) {
	requireTool(t, "qemu-io")
	e := newEnv(t)
	_, img := sparseSealed(t, e, 8<<20)
	s, file := startFUSEServe(t, e, img)
	for i, cache := range []string{"none", "writeback"} {
		args := append([]string{"-f", "raw", "-t", cache}, qemuIOPatterns(byte(i))...)
		out, err := exec.Command("qemu-io", append(args, file)...).CombinedOutput()
		if err != nil || strings.Contains(string(out), "failed") || strings.Contains(string(out), "error") {
			t.Fatalf("qemu-io -t %s: %v\n%s", cache, err, out)
		}
		if n := strings.Count(string(out), "read "); n < 12 {
			t.Fatalf("qemu-io -t %s ran %d reads:\n%s", cache, n, out)
		}
	}
	s.stop(t)
	run(t, "unseal", "--in", img, "--out", img+".out", "--psp", e.psp)
	got, err := os.ReadFile(img + ".out")
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []struct {
		off, n int
		b      byte
	}{{0, 100, 0xac}, {100, 3, 0x56}, {16 << 10, 1<<20 - 16<<10, 0xac}, {1 << 20, 64 << 10, 0xce}, {4 << 10, 8 << 10, 0},
		{2 << 20, 64 << 10, 0}, {3 << 20, 128 << 10, 0x23}, {5 << 20, 64 << 10, 0}, {8191 << 10, 1 << 10, 0x34}} {
		if !bytes.Equal(got[r.off:r.off+r.n], bytes.Repeat([]byte{r.b}, r.n)) {
			t.Errorf("unsealed image at [%d,+%d) is not %#x", r.off, r.n, r.b)
		}
	}
}

// TestFUSEFioVerify: fio random writes with crc32c verification through the file, libaio,
// with O_DIRECT and buffered; fio reports no error and verifies every byte it wrote.
func TestFUSEFioVerify(t *testing.T) {
	requireTool(t, "fio")
	e := newEnv(t)
	src := filepath.Join(e.dir, "fio.raw")
	if err := os.WriteFile(src, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(src, 64<<20); err != nil {
		t.Fatal(err)
	}
	e.seal(t, src, src+".img")
	_, file := startFUSEServe(t, e, src+".img")
	for _, c := range []struct{ direct, bs, offset string }{{"1", "4k", "0"}, {"0", "4k", "32M"}, {"1", "64k", "0"}, {"0", "16k", "32M"}} {
		t.Run(fmt.Sprintf("direct=%s,bs=%s", c.direct, c.bs), func(t *testing.T) {
			cmd := exec.Command("fio", "--name=verify", "--filename="+file, "--ioengine=libaio", "--direct="+c.direct,
				"--rw=randwrite", "--bs="+c.bs, "--offset="+c.offset, "--size=32M", "--iodepth=32", "--verify=crc32c",
				"--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=json")
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			if err := cmd.Run(); err != nil || strings.Contains(stderr.String(), "verify") || strings.Contains(stderr.String(), "error") {
				t.Fatalf("fio: %v\n%s\n%s", err, stderr.String(), stdout.String())
			}
			clienttool.CheckFioVerify(t, stdout.String(), 32<<20)
		})
	}
}

// TestFUSEAllowOtherOwnership: with allow_other, another user (here nobody, standing in for
// libvirt's qemu user) is held to the file's owner and mode: it can neither read nor write a
// disk it does not own, and once the file is chowned to it (libvirt's dynamic ownership) it
// reads the disk.
func TestFUSEAllowOtherOwnership(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root: runs a client as another user")
	}
	requireTool(t, "dd")
	e := newEnv(t)
	src := filepath.Join(e.dir, "disk.raw")
	fill(t, src, 0, 1<<20, 7)
	e.seal(t, src, src+".img")
	// The other user must be able to reach the mount point, or every refusal is vacuous.
	for d := e.dir; d != filepath.Dir(d) && strings.HasPrefix(d, os.TempDir()+"/"); d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	requireFUSE(t)
	t.Cleanup(func() { unmountLazy(filepath.Join(e.dir, "mnt")) })
	s := startServe(t, e, src+".img", true, "--fuse-allow-other")
	file := filepath.Join(s.mnt, "vm1.raw")
	const nobody = 65534
	as := func(args ...string) (string, error) {
		cmd := exec.Command(args[0], args[1:]...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := as("dd", "if="+file, "bs=4096", "count=1", "status=none"); err == nil || !strings.Contains(out, "Permission denied") {
		t.Fatalf("nobody read a 0600 root-owned disk: %v\n%.200q", err, out)
	}
	if out, err := as("dd", "if=/dev/zero", "of="+file, "bs=4096", "count=1", "conv=notrunc", "status=none"); err == nil || !strings.Contains(out, "Permission denied") {
		t.Fatalf("nobody wrote a 0600 root-owned disk: %v\n%s", err, out)
	}
	if err := os.Chown(file, nobody, nobody); err != nil {
		t.Fatal(err)
	}
	out, err := as("dd", "if="+file, "bs=4096", "count=1", "status=none")
	want, _ := os.ReadFile(src)
	if err != nil || out != string(want[:4096]) {
		t.Fatalf("nobody, owning the file, reads: %v (%d bytes)\n%.300q", err, len(out), out)
	}
}
