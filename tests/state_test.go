package tests

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// guestKernel is Debian's kernel and initrd (linux-image-amd64).
func guestKernel(t *testing.T) (kernel, initrd string) {
	t.Helper()
	requireTool(t, "qemu-system-x86_64")
	kernels, _ := filepath.Glob("/boot/vmlinuz-*")
	initrds, _ := filepath.Glob("/boot/initrd.img-*")
	if len(kernels) == 0 || len(initrds) == 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("no kernel in /boot (linux-image-amd64): run make deps")
		}
		t.Skip("no kernel in /boot")
	}
	return kernels[len(kernels)-1], initrds[len(initrds)-1]
}

// monitor is a QEMU human monitor on a Unix socket.
type monitor struct {
	t *testing.T
	c net.Conn
	r *bufio.Reader
}

func dialMonitor(t *testing.T, sock string) *monitor {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		c, err := net.Dial("unix", sock)
		if err == nil {
			m := &monitor{t: t, c: c, r: bufio.NewReader(c)}
			m.readPrompt()
			return m
		}
		if time.Now().After(deadline) {
			t.Fatalf("QEMU monitor %s: %v", sock, err)
		}
	}
}

func (m *monitor) readPrompt() string {
	m.t.Helper()
	var b strings.Builder
	m.c.SetReadDeadline(time.Now().Add(30 * time.Second))
	for !strings.HasSuffix(b.String(), "(qemu) ") {
		c, err := m.r.ReadByte()
		if err != nil {
			m.t.Fatalf("QEMU monitor: %v after %q", err, b.String())
		}
		b.WriteByte(c)
	}
	return b.String()
}

// do runs one monitor command and returns what it printed.
func (m *monitor) do(cmd string) string {
	m.t.Helper()
	if _, err := fmt.Fprintf(m.c, "%s\n", cmd); err != nil {
		m.t.Fatal(err)
	}
	return m.readPrompt()
}

// migrate saves the VM through the shell command dst and waits for QEMU to report it complete.
func (m *monitor) migrate(dst string) {
	m.t.Helper()
	m.do(fmt.Sprintf("migrate %q", "exec:"+dst))
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(200 * time.Millisecond) {
		out := m.do("info migrate")
		switch {
		case strings.Contains(out, "Migration status: completed"):
			return
		case strings.Contains(out, "Migration status: failed"), strings.Contains(out, "Migration status: cancelled"):
			m.t.Fatalf("migration to %s: %s", dst, out)
		case time.Now().After(deadline):
			m.t.Fatalf("migration to %s did not complete: %s", dst, out)
		}
	}
}

var tickRE = regexp.MustCompile(`GUEST: tick (\d+)`)

// lastTick is the highest tick in a console log (0: none yet).
func lastTick(path string) int {
	b, _ := os.ReadFile(path)
	n := 0
	for _, m := range tickRE.FindAllSubmatch(b, -1) {
		if k, _ := strconv.Atoi(string(m[1])); k > n {
			n = k
		}
	}
	return n
}

func waitTick(t *testing.T, console string, above int, within time.Duration) int {
	t.Helper()
	for deadline := time.Now().Add(within); ; time.Sleep(200 * time.Millisecond) {
		if n := lastTick(console); n > above {
			return n
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(console)
			t.Fatalf("no tick above %d on the console within %s:\n%s", above, within, b)
		}
	}
}

// TestStateSealedAcrossSaveAndRestore: a running TCG guest is saved through `sealdisk state
// seal` (QEMU's migrate "exec:…"), a new QEMU restores it through `state unseal` (-incoming
// "exec:…") and the guest carries on ticking from where it was, without booting again. A marker
// the guest holds in memory is in a plain save of the same guest and not in the sealed file; a
// sealed file with a changed byte or cut short is refused, and the wrong firmware too.
func TestStateSealedAcrossSaveAndRestore(t *testing.T) {
	if testing.Short() {
		t.Skip("guest in -short mode")
	}
	kernel, initrd := guestKernel(t)
	requireTool(t, "mkfs.ext4")
	e := newEnv(t)
	root := filepath.Join(e.dir, "root.raw")
	if out, err := exec.Command("../scripts/guest/mkroot.sh", root, "32M").CombinedOutput(); err != nil {
		t.Fatalf("mkroot: %v\n%s", err, out)
	}
	mark := make([]byte, 12)
	rand.Read(mark)
	marker := "SDMEM" + hex.EncodeToString(mark) // in the guest's memory through its command line
	qemu := func(name string, extra ...string) (*exec.Cmd, string, string) {
		console, mon := filepath.Join(e.dir, name+".console"), filepath.Join(e.dir, name+".mon")
		args := append([]string{"-accel", "tcg", "-m", "512", "-display", "none", "-no-reboot",
			"-kernel", kernel, "-initrd", initrd,
			"-append", "console=ttyS0 root=/dev/vda ro rootfstype=ext4 panic=-1 quiet sealdisk.ticker sealdisk.mem=" + marker,
			"-drive", "file=" + root + ",format=raw,if=virtio,readonly=on",
			"-serial", "file:" + console, "-monitor", "unix:" + mon + ",server=on,wait=off"}, extra...)
		cmd := exec.Command("qemu-system-x86_64", args...)
		var log bytes.Buffer
		cmd.Stdout, cmd.Stderr = &log, &log
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if cmd.ProcessState == nil {
				cmd.Process.Kill()
				cmd.Wait()
			}
		})
		return cmd, console, mon
	}

	src, console, mon := qemu("source")
	waitTick(t, console, 1, 3*time.Minute)
	m := dialMonitor(t, mon)
	plain := filepath.Join(e.dir, "plain.state")
	m.migrate("cat > " + plain)
	if b, _ := os.ReadFile(plain); !bytes.Contains(b, []byte(marker)) {
		t.Fatalf("the plain save (%d bytes) does not hold the guest's marker: the check below would prove nothing", len(b))
	}
	m.do("cont")
	before := waitTick(t, console, lastTick(console), 30*time.Second)
	sealed := filepath.Join(e.dir, "vm.state")
	m.migrate(sealdisk + " state seal --out " + sealed + " " + strings.Join(e.certArgs(), " "))
	fmt.Fprintf(m.c, "quit\n") // QEMU closes the monitor: no prompt follows
	src.Wait()
	b, err := os.ReadFile(sealed)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(b, []byte(marker)) || bytes.Contains(b, []byte("GUEST: tick")) {
		t.Fatal("the sealed state file holds plaintext of the guest's memory")
	}
	if fi, _ := os.Stat(sealed); fi.Mode().Perm() != 0o600 {
		t.Fatalf("state file mode %v, want 0600", fi.Mode().Perm())
	}

	// Refused before any restore: a changed byte, the file cut short, another firmware.
	bad := filepath.Join(e.dir, "bad.state")
	changed := bytes.Clone(b)
	changed[len(changed)/2] ^= 1
	os.WriteFile(bad, changed, 0o600)
	if out, err := runErr("state", "unseal", "--in", bad, "--psp", e.psp, "--firmware", e.fw, "--out", bad+".out"); err == nil || !strings.Contains(out, "failed authentication") {
		t.Fatalf("a changed byte: %v %s", err, out)
	}
	hl, cl := 36+int(binary.BigEndian.Uint32(b[32:36])), 64<<10+16 // header, chunk (FORMAT.md §11)
	os.WriteFile(bad, b[:hl+(len(b)-hl)/cl*cl-cl], 0o600)          // a chunk boundary before the end
	if out, err := runErr("state", "unseal", "--in", bad, "--psp", e.psp, "--firmware", e.fw, "--out", bad+".out"); err == nil || !strings.Contains(out, "truncated") {
		t.Fatalf("a file cut short by a chunk: %v %s", err, out)
	}
	if _, err := os.Stat(bad + ".out"); err == nil {
		t.Fatal("a refused unseal left its output")
	}
	other := filepath.Join(e.dir, "other.fd")
	os.WriteFile(other, []byte("other firmware"), 0o644)
	if out, err := runErr("state", "unseal", "--in", sealed, "--psp", e.psp, "--firmware", other, "--out", bad+".out"); err == nil || !strings.Contains(out, "not among the certificate's") {
		t.Fatalf("another firmware: %v %s", err, out)
	}

	// The restore: a new QEMU reads the stream from state unseal and the guest goes on.
	_, console2, _ := qemu("restored", "-incoming", "exec:"+sealdisk+" state unseal --in "+sealed+" --psp "+e.psp+" --firmware "+e.fw)
	after := waitTick(t, console2, 0, 2*time.Minute)
	c2, _ := os.ReadFile(console2)
	if after < before || bytes.Contains(c2, []byte("GUEST: booted")) {
		t.Fatalf("restored guest: first tick %d, saved after tick %d; console:\n%s", after, before, c2)
	}
	t.Logf("saved after tick %d, restored guest ticks on at %d; sealed state %d bytes", before, after, len(b))
}
