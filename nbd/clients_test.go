package nbd

// Tests that drive real NBD clients (libnbd's nbdinfo/nbdcopy/nbdsh, qemu-img, qemu-io,
// fio) against the in-process server. A missing tool skips, except with CI=true where it
// fails: `make deps` installs them.

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/engine"
	"github.com/sealdisk/sealdisk/internal/clienttool"
)

func requireTool(t testing.TB, name string) string { return clienttool.Require(t, name) }

func nbdshEnv(t testing.TB) []string { return clienttool.NbdshEnv(t) }

// run runs a client with a deadline and returns its combined output; failure is fatal.
func run(t testing.TB, env []string, name string, args ...string) string {
	t.Helper()
	out, err := runErr(env, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func runErr(env []string, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = env
	var b bytes.Buffer
	cmd.Stdout, cmd.Stderr = &b, &b
	err := cmd.Run()
	return b.String(), err
}

func nbdURI(sock, export string) string {
	return "nbd+unix:///" + export + "?socket=" + sock
}

// slowEvenBlocks delays reads of every other 64 KiB block, so pipelined requests complete
// out of order whatever the client does.
func slowEvenBlocks(off int64) time.Duration {
	if (off>>16)%2 == 0 {
		return 2 * time.Millisecond
	}
	return 0
}

func TestClientNbdinfoList(t *testing.T) {
	requireTool(t, "nbdinfo")
	ts := startServer(t, Options{}, twoExports()...)
	out := run(t, nil, "nbdinfo", "--list", "--json", "nbd+unix:///?socket="+ts.sock)
	exports := clienttool.ParseList(t, out)
	if len(exports) != 2 {
		t.Fatalf("exports: %s", out)
	}
	d, ro := exports[0], exports[1]
	if d.Name != "disk" || d.Description != "the first disk" || d.Size != testSize || d.ReadOnly ||
		!d.CanTrim || !d.CanFastZero || !d.MultiConn || d.MinBlock != 1 || d.PrefBlock != 4096 || d.MaxBlock != 32<<20 {
		t.Errorf("disk export: %+v", d)
	}
	if ro.Name != "ro" || !ro.ReadOnly || ro.CanTrim {
		t.Errorf("read-only export: %+v", ro)
	}
}

func TestClientNbdinfoMap(t *testing.T) {
	requireTool(t, "nbdinfo")
	dev := newTestDevice(1<<20, nil)
	ctx := context.Background()
	dev.WriteAt(ctx, []byte("data"), 128<<10, false)
	dev.WriteAt(ctx, []byte("more"), 512<<10+1, false)
	ts := startServer(t, Options{}, Export{Name: "d", Device: dev})
	out := run(t, nil, "nbdinfo", "--map", "--json", nbdURI(ts.sock, "d"))
	m := clienttool.ParseMap(t, out)
	type ext struct {
		off, n int64
		typ    int
	}
	var got []ext
	for _, e := range m {
		got = append(got, ext{e.Offset, e.Length, e.Type})
	}
	const hz = 3 // hole|zero
	want := []ext{{0, 128 << 10, hz}, {128 << 10, 64 << 10, 0}, {192 << 10, 320 << 10, hz}, {512 << 10, 64 << 10, 0}, {576 << 10, 448 << 10, hz}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("map = %v, want %v", got, want)
	}
}

// sampleImage writes a raw image with data, a zero run and a hole.
func sampleImage(t testing.TB, dir string, size int) string {
	t.Helper()
	b := pattern(size, 42)
	clear(b[size/4 : size/2]) // zeros the copy may turn into holes
	p := filepath.Join(dir, "src.img")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestClientNbdcopy(t *testing.T) {
	requireTool(t, "nbdcopy")
	requireTool(t, "qemu-img")
	const size = 8 << 20
	dev := newTestDevice(size, nil)
	dev.delay = slowEvenBlocks
	ts := startServer(t, Options{}, Export{Name: "d", Device: dev})
	dir := shortDir(t)
	src := sampleImage(t, dir, size)
	uri := nbdURI(ts.sock, "d")

	run(t, nil, "nbdcopy", "--flush", src, uri)
	back := filepath.Join(dir, "back.img")
	run(t, nil, "nbdcopy", uri, back)
	a, _ := os.ReadFile(src)
	b, _ := os.ReadFile(back)
	if !bytes.Equal(a, b) {
		t.Fatal("nbdcopy round trip differs")
	}
	run(t, nil, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri)
	if dev.flushes.Load() == 0 {
		t.Error("nbdcopy --flush did not reach the device")
	}
}

func TestClientQemuImg(t *testing.T) {
	requireTool(t, "qemu-img")
	const size = 8 << 20
	ts := startServer(t, Options{}, Export{Name: "d", Device: newTestDevice(size, nil)})
	dir := shortDir(t)
	src := sampleImage(t, dir, size)
	uri := nbdURI(ts.sock, "d")
	run(t, nil, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri)
	run(t, nil, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri)
	// And a difference is noticed: compare exits 1.
	other := filepath.Join(dir, "other.img")
	os.WriteFile(other, make([]byte, size), 0o600)
	if out, err := runErr(nil, "qemu-img", "compare", "-f", "raw", "-F", "raw", other, uri); err == nil {
		t.Fatalf("qemu-img compare found no difference:\n%s", out)
	}
}

func TestClientQemuIO(t *testing.T) {
	requireTool(t, "qemu-io")
	ts := startServer(t, Options{}, Export{Name: "d", Device: newTestDevice(8<<20, nil)})
	out := run(t, nil, "qemu-io", "-f", "raw",
		"-c", "write -P 0xab 0 1M",
		"-c", "write -P 0xcd -f 1M 64k", // FUA
		"-c", "read -P 0xab 0 1M",
		"-c", "read -P 0xcd 1M 64k",
		"-c", "write -z 4k 8k",
		"-c", "read -P 0 4k 8k",
		"-c", "write -P 0x44 5M 128k",
		"-c", "write -z -n -u 5M 64k", // fast zero, may unmap
		"-c", "read -P 0 5M 64k",
		"-c", "read -P 0x44 5184k 64k",
		"-c", "read -P 0xab 0 4k",
		"-c", "aio_write -P 0x11 2M 128k",
		"-c", "aio_write -P 0x22 3M 128k",
		"-c", "aio_flush",
		"-c", "read -P 0x11 2M 128k",
		"-c", "read -P 0x22 3M 128k",
		"-c", "discard 2M 64k",
		"-c", "read -P 0 2M 64k",
		"-c", "write -P 0x33 8191k 1k",
		"-c", "read -P 0x33 8191k 1k",
		"-c", "flush",
		nbdURI(ts.sock, "d"))
	if strings.Contains(out, "failed") || strings.Contains(out, "error") || strings.Contains(out, "invalid") {
		t.Fatalf("qemu-io:\n%s", out)
	}
}

func TestClientNbdshEdgeCases(t *testing.T) {
	env := nbdshEnv(t)
	dev := newTestDevice(64<<20, nil)
	dev.delay = slowEvenBlocks
	tampered := newTestDevice(1<<20, nil)
	tampered.failReads(8192, 1)
	ts := startServer(t, Options{},
		Export{Name: "d", Device: dev},
		Export{Name: "tampered", Device: tampered},
		Export{Name: "slowzero", Device: &notFastDevice{newTestDevice(1<<20, nil)}},
		Export{Name: "ro", Device: newTestDevice(1<<20, func(c *engine.Caps) { c.ReadOnly = true })},
	)
	env = append(env, "NBD_SOCK="+ts.sock, "NBD_URI=nbd+unix:///d?socket="+ts.sock)
	out := run(t, env, "nbdsh", "-c", clienttool.EdgeScript)
	if !strings.Contains(out, "edge cases ok") {
		t.Fatalf("nbdsh:\n%s", out)
	}
	if dev.maxActive.Load() < 2 {
		t.Errorf("device never saw concurrent reads (max %d)", dev.maxActive.Load())
	}
	if dev.flushes.Load() < 2 || dev.fuaTrims.Load() != 1 {
		t.Errorf("flushes reaching the device: %d, FUA trims: %d", dev.flushes.Load(), dev.fuaTrims.Load())
	}
}

func TestClientFio(t *testing.T) {
	requireTool(t, "fio")
	ts := startServer(t, Options{}, Export{Name: "d", Device: newTestDevice(16<<20, nil)})
	out := run(t, nil, "fio", "--name=verify", "--ioengine=nbd", "--uri="+nbdURI(ts.sock, "d"),
		"--rw=randwrite", "--bs=4k", "--size=16M", "--iodepth=32", "--verify=crc32c",
		"--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=json")
	clienttool.CheckFioVerify(t, out, 16<<20)
}
