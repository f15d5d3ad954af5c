package tests

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"
)

// TestAttachKernelNBD: `sealdisk attach` puts a served VM on /dev/nbd0; data written through
// the block device reads back, is in the export after a clean detach (SIGTERM, exit 0), and
// unseals from the image after serve stops. It needs the host kernel's nbd module and root, so
// it is skipped (even in CI) where /dev/nbd0 does not exist; TestKernelNBDInGuest
// (kguest_test.go) runs the kernel's NBD client everywhere, in a TCG guest.
func TestAttachKernelNBD(t *testing.T) {
	const dev = "/dev/nbd0"
	if _, err := os.Stat(dev); err != nil {
		t.Skipf("%s does not exist (no nbd kernel module on this machine: modprobe nbd): kernel attach not tested", dev)
	}
	if os.Geteuid() != 0 {
		t.Skipf("attaching %s needs root", dev)
	}
	if b, err := os.ReadFile("/sys/block/nbd0/pid"); err == nil {
		t.Skipf("%s is in use (pid %s)", dev, strings.TrimSpace(string(b)))
	}
	e := newEnv(t)
	raw := filepath.Join(e.dir, "vm.raw")
	fill(t, raw, 0, 16<<20, 7)
	img := filepath.Join(e.dir, "vm.img")
	e.seal(t, raw, img)
	s := startServe(t, e, img, false)

	var log bytes.Buffer
	att := exec.Command(sealdisk, "attach", "--export", "vm1", "--socket", s.sock, dev)
	att.Stdout, att.Stderr = &log, &log
	if err := att.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- att.Wait() }()
	defer func() {
		if att.ProcessState == nil {
			att.Process.Signal(syscall.SIGTERM)
			<-done
		}
	}()
	// Attached when the kernel reports the size.
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		b, _ := os.ReadFile("/sys/block/nbd0/size")
		if strings.TrimSpace(string(b)) == "32768" { // 16 MiB in 512-byte sectors
			break
		}
		select {
		case err := <-done:
			t.Fatalf("attach exited early: %v\n%s", err, log.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not attached within 20 s:\n%s", dev, log.String())
		}
	}

	// Read what the image holds, write through the device (O_DIRECT: no page cache), read back.
	want, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := alignedBuf(1 << 20)
	if _, err := f.ReadAt(buf, 3<<20); err != nil || !bytes.Equal(buf, want[3<<20:4<<20]) {
		t.Fatalf("reading the sealed data through %s: %v", dev, err)
	}
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	copy(want[5<<20:], buf)
	if _, err := f.WriteAt(buf, 5<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	back := alignedBuf(1 << 20)
	if _, err := f.ReadAt(back, 5<<20); err != nil || !bytes.Equal(back, buf) {
		t.Fatalf("read back through %s: %v", dev, err)
	}
	f.Close()

	att.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("attach did not exit cleanly: %v\n%s", err, log.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("attach did not detach within 30 s:\n%s", log.String())
	}
	if b, err := os.ReadFile("/sys/block/nbd0/pid"); err == nil {
		t.Fatalf("%s still connected after detach (pid %s)", dev, b)
	}
	if err := os.WriteFile(raw, want, 0o644); err != nil {
		t.Fatal(err)
	}
	if out := qemuImg(t, "compare", "-f", "raw", "-F", "raw", raw, s.uri()); !strings.Contains(out, "identical") {
		t.Fatalf("export after detach: %s", out)
	}
	s.stop(t)
	out := filepath.Join(e.dir, "out.raw")
	run(t, "unseal", "--in", img, "--out", out, "--psp", e.psp)
	cmpFiles(t, raw, out, 16<<20)
}

// alignedBuf is n bytes aligned to 4096, as O_DIRECT needs.
func alignedBuf(n int) []byte {
	b := make([]byte, n+4096)
	off := 0
	if r := int(uintptr(unsafe.Pointer(&b[0])) % 4096); r != 0 {
		off = 4096 - r
	}
	return b[off : off+n]
}
