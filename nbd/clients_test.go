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

// edgeScript exercises protocol edges through libnbd; each check raises on failure.
const edgeScript = `
import errno, os
sock = os.environ["NBD_SOCK"]

def conn(name):
    g = nbd.NBD()
    g.add_meta_context("base:allocation")
    g.set_export_name(name)
    g.connect_unix(sock)
    return g

def expect_err(fn, want, what):
    try:
        fn()
    except nbd.Error as e:
        # libnbd's Python binding gives the errno's name.
        assert e.errno == errno.errorcode[want], "%s: errno %s, want %s (%s)" % (what, e.errno, errno.errorcode[want], e)
    else:
        raise AssertionError(what + ": no error")

h = conn("d")
size = h.get_size()
M = 32 * 1024 * 1024
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert h.get_block_size(nbd.SIZE_MAXIMUM) == M
for cap in ("can_multi_conn", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_flush", "can_df"):
    assert getattr(h, cap)(), cap
assert h.can_meta_context("base:allocation")
assert h.get_structured_replies_negotiated()

# Let invalid requests reach the server: its answers are what is tested.
h.set_strict_mode(0)
expect_err(lambda: h.pread(2, size - 1), errno.EINVAL, "read past end")
expect_err(lambda: h.pwrite(b"ab", size - 1), errno.ENOSPC, "write past end")
expect_err(lambda: h.trim(2, size - 1), errno.EINVAL, "trim past end")
expect_err(lambda: h.zero(2, size - 1), errno.ENOSPC, "zero past end")
expect_err(lambda: h.pread(M + 1, 0), errno.EINVAL, "read above maximum block")
expect_err(lambda: h.pwrite(bytes(M + 1), 0), errno.EINVAL, "write above maximum block")
assert h.pread(0, 0) == b"", "zero-length read"
h.pwrite(b"", 0)
# The connection is still fine, and a request of exactly the maximum works.
big = os.urandom(M)
h.pwrite(big, 0)
assert h.pread(M, 0) == big, "32 MiB round trip"
h.set_strict_mode(nbd.STRICT_MASK)

# 64 pipelined requests in flight at once (the device completes them out of order).
bufs = [nbd.Buffer(4096) for _ in range(64)]
cookies = [h.aio_pread(bufs[i], i * 65536) for i in range(64)]
assert h.aio_in_flight() > 1, "requests were not pipelined"
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, c in enumerate(cookies):
    assert h.aio_command_completed(c)
    assert bufs[i].to_bytearray() == big[i * 65536:i * 65536 + 4096], "pipelined read %d" % i
wcookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i]) * 4096), M + i * 4096) for i in range(64)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in wcookies:
    assert h.aio_command_completed(c)
assert h.pread(64 * 4096, M) == b"".join(bytes([i]) * 4096 for i in range(64))

# FUA, write zeroes, fast zero, trim + block status, cache.
h.pwrite(b"\xaa" * 65536, 0, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 0) == b"\xaa" * 65536
h.zero(65536, 0)
assert h.pread(65536, 0) == bytes(65536), "write zeroes"
h.pwrite(b"\xbb" * 65536, 0)
h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
assert h.pread(65536, 0) == bytes(65536), "fast zero"
h.pwrite(b"\xcc" * 131072, 131072)
h.trim(65536, 131072, nbd.CMD_FLAG_FUA)
ext = []
def cb(metacontext, offset, entries, err):
    assert metacontext == "base:allocation"
    ext.extend(entries)
h.block_status(3 * 65536, 131072, cb)
assert ext[:2] == [65536, nbd.STATE_HOLE | nbd.STATE_ZERO], "trimmed range not a hole: %r" % ext
assert ext[2:4] == [131072, 0], "data after the hole: %r" % ext
ext = []
h.block_status(3 * 65536, 131072, cb, nbd.CMD_FLAG_REQ_ONE)
assert len(ext) == 2, "REQ_ONE gave %r" % ext
h.cache(M, 0)
h.flush()

# Flush across two connections (multi-conn): a write acknowledged on one connection is
# covered by a flush on the other, and visible there.
h2 = conn("d")
h.pwrite(b"multi-conn", 4 * 65536)
h2.flush()
assert h2.pread(10, 4 * 65536) == b"multi-conn"

# A tampered region: EIO, never data; the connection survives.
t = conn("tampered")
t.pwrite(b"fine", 0)
expect_err(lambda: t.pread(4096, 8192), errno.EIO, "read of a tampered sector")
expect_err(lambda: t.cache(4096, 8192), errno.EIO, "cache of a tampered sector")
assert t.pread(4, 0) == b"fine"

# A device that cannot zero fast: FAST_ZERO fails with ENOTSUP, plain zero works.
s = conn("slowzero")
assert s.can_fast_zero()
expect_err(lambda: s.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO), errno.ENOTSUP, "fast zero on a slow device")
s.zero(4096, 0)

# Read-only export.
r = conn("ro")
assert r.is_read_only() and not r.can_trim() and not r.can_zero()
r.set_strict_mode(0)
expect_err(lambda: r.pwrite(b"x", 0), errno.EPERM, "write to a read-only export")
expect_err(lambda: r.trim(1, 0), errno.EPERM, "trim of a read-only export")
for g in (h, h2, t, s, r):
    g.shutdown()
print("edge cases ok")
`

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
	env = append(env, "NBD_SOCK="+ts.sock)
	out := run(t, env, "nbdsh", "-c", edgeScript)
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
