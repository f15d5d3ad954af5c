package tests

// Real NBD clients (libnbd's nbdinfo/nbdcopy/nbdsh, qemu-io, fio) against the built
// `sealdisk serve` of a sealed image: the engine's real crypto behind the real server, out
// of process. nbd/clients_test.go runs the same clients against the in-process server over
// test devices (delays, injected faults); these prove the shipped binary.

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/internal/clienttool"
)

// nbdClient runs an NBD client tool and returns its combined output; failure is fatal.
func nbdClient(t *testing.T, env []string, name string, args ...string) string {
	t.Helper()
	requireTool(t, name)
	cmd := exec.Command(name, args...)
	cmd.Env = env
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// sparseSealed seals an 8 MiB raw image with data at [0,1M) and [4M,5M) and holes elsewhere.
func sparseSealed(t *testing.T, e *env, size int64) (src, img string) {
	t.Helper()
	src = filepath.Join(e.dir, "sparse.raw")
	fill(t, src, 0, 1<<20, 3)
	fill(t, src, 4<<20, 1<<20, 4)
	if err := os.Truncate(src, size); err != nil {
		t.Fatal(err)
	}
	img = src + ".img"
	e.seal(t, src, img)
	return src, img
}

func TestServeNbdinfoListAndMap(t *testing.T) {
	e := newEnv(t)
	_, img := sparseSealed(t, e, 8<<20)
	s := startServe(t, e, img, false)

	out := nbdClient(t, nil, "nbdinfo", "--list", "--json", "nbd+unix:///?socket="+s.sock)
	exports := clienttool.ParseList(t, out)
	if len(exports) != 1 {
		t.Fatalf("exports:\n%s", out)
	}
	x := exports[0]
	if x.Name != "vm1" || x.Size != 8<<20 || x.ReadOnly || !x.CanTrim || !x.CanFUA || !x.MultiConn || x.PrefBlock != 4096 {
		t.Errorf("export: %+v", x)
	}
	if !strings.Contains(out, "base:allocation") {
		t.Errorf("base:allocation not listed:\n%s", out)
	}

	out = nbdClient(t, nil, "nbdinfo", "--map", "--json", s.uri())
	m := clienttool.ParseMap(t, out)
	// Every byte is mapped once; the data ranges are data and the rest are holes.
	typeAt := func(off int64) int {
		for _, x := range m {
			if off >= x.Offset && off < x.Offset+x.Length {
				return x.Type
			}
		}
		t.Fatalf("offset %d not in the map %+v", off, m)
		return -1
	}
	var end int64
	for _, x := range m {
		if x.Offset != end {
			t.Fatalf("map has a gap or overlap at %d: %+v", end, m)
		}
		end += x.Length
	}
	if end != 8<<20 {
		t.Fatalf("map covers %d bytes: %+v", end, m)
	}
	for off := int64(0); off < 8<<20; off += 64 << 10 {
		data := off < 1<<20 || (off >= 4<<20 && off < 5<<20)
		if got := typeAt(off); (got == 0) != data || (!data && got != 3) {
			t.Errorf("offset %d: type %d, want data=%v (map %+v)", off, got, data, m)
		}
	}
}

func TestServeNbdcopyBothWays(t *testing.T) {
	e := newEnv(t)
	src, img := sparseSealed(t, e, 8<<20)
	s := startServe(t, e, img, false)
	back := filepath.Join(e.dir, "back.raw")
	nbdClient(t, nil, "nbdcopy", s.uri(), back)
	cmpFiles(t, src, back, 8<<20)

	other := filepath.Join(e.dir, "other.raw")
	fill(t, other, 0, 8<<20, 11)
	nbdClient(t, nil, "nbdcopy", "--flush", other, s.uri())
	back2 := filepath.Join(e.dir, "back2.raw")
	nbdClient(t, nil, "nbdcopy", s.uri(), back2)
	cmpFiles(t, other, back2, 8<<20)
	s.stop(t)
	run(t, "unseal", "--in", img, "--out", img+".out", "--psp", e.psp)
	cmpFiles(t, other, img+".out", 8<<20)
}

func TestServeQemuIOPatterns(t *testing.T) {
	e := newEnv(t)
	_, img := sparseSealed(t, e, 8<<20)
	s := startServe(t, e, img, false)
	out := nbdClient(t, nil, "qemu-io", "-f", "raw",
		"-c", "write -P 0xab 0 1M",
		"-c", "write -P 0xcd -f 1M 64k", // FUA
		"-c", "read -P 0xab 0 1M",
		"-c", "read -P 0xcd 1M 64k",
		"-c", "write -z 4k 8k",
		"-c", "read -P 0 4k 8k",
		"-c", "read -P 0xab 12k 4k",
		"-c", "write -P 0x44 5M 128k",
		"-c", "write -z -u 5M 64k",
		"-c", "read -P 0 5M 64k",
		"-c", "read -P 0x44 5184k 64k",
		"-c", "aio_write -P 0x11 2M 128k",
		"-c", "aio_write -P 0x22 3M 128k",
		"-c", "aio_flush",
		"-c", "read -P 0x11 2M 128k",
		"-c", "read -P 0x22 3M 128k",
		"-c", "discard 2M 64k",
		"-c", "read -P 0 2M 64k",
		"-c", "write -P 0x33 8191k 1k", // the last KiB: a sub-sector write
		"-c", "write -P 0x55 100 3",
		"-c", "read -P 0x55 100 3",
		"-c", "read -P 0xab 103 3993", // the rest of that sector is untouched
		"-c", "read -P 0x33 8191k 1k",
		"-c", "flush",
		s.uri())
	if strings.Contains(out, "failed") || strings.Contains(out, "error") || strings.Contains(out, "invalid") {
		t.Fatalf("qemu-io:\n%s", out)
	}
	if n := strings.Count(out, "read "); n < 10 {
		t.Fatalf("qemu-io ran %d reads:\n%s", n, out)
	}
}

func TestServeNbdshEdgeCases(t *testing.T) {
	env := clienttool.NbdshEnv(t)
	e := newEnv(t)
	src := filepath.Join(e.dir, "edge.raw")
	fill(t, src, 0, 4<<20, 6)
	if err := os.Truncate(src, 64<<20); err != nil {
		t.Fatal(err)
	}
	e.seal(t, src, src+".img")
	s := startServe(t, e, src+".img", false)
	out := nbdClient(t, append(env, "NBD_URI="+s.uri()), "nbdsh", "-c", clienttool.EdgeScript)
	if !strings.Contains(out, "edge cases ok") {
		t.Fatalf("nbdsh:\n%s", out)
	}
}

// TestServeTamperedSectorIsEIO: a flipped ciphertext byte in sector 5 of the sealed image
// makes reads of that sector fail with EIO over NBD; neighbours read right and the
// connection and the service stay up.
func TestServeTamperedSectorIsEIO(t *testing.T) {
	env := clienttool.NbdshEnv(t)
	e := newEnv(t)
	src, img := sealed(t, e, 64<<10)
	m := inspectJSON(t, img)
	flip(t, img, int64(m["data_offset"].(float64))+5*4096+100)
	s := startServe(t, e, img, false)
	want, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	script := `
import errno, os
h = nbd.NBD()
h.connect_uri(os.environ["NBD_URI"])
try:
    d = h.pread(4096, 5 * 4096)
    raise AssertionError("tampered sector returned data")
except nbd.Error as e:
    assert e.errno == "EIO", e
try:
    h.pread(3 * 4096, 4 * 4096)
    raise AssertionError("read spanning the tampered sector returned data")
except nbd.Error as e:
    assert e.errno == "EIO", e
open(os.environ["OUT"], "wb").write(h.pread(5 * 4096, 0) + h.pread(10 * 4096, 6 * 4096))
h.shutdown()
print("tamper ok")
`
	outFile := filepath.Join(e.dir, "good.bin")
	out := nbdClient(t, append(env, "NBD_URI="+s.uri(), "OUT="+outFile), "nbdsh", "-c", script)
	if !strings.Contains(out, "tamper ok") {
		t.Fatalf("nbdsh:\n%s", out)
	}
	got, err := os.ReadFile(outFile)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, append(append([]byte{}, want[:5*4096]...), want[6*4096:16*4096]...)) {
		t.Fatal("untampered sectors around the tampered one read wrong")
	}
	// The service is still up for a new client.
	nbdClient(t, nil, "nbdinfo", "--size", s.uri())
	s.stop(t)
	if !strings.Contains(s.log.String(), "authentication") && !strings.Contains(s.log.String(), "integrity") {
		t.Errorf("serve log does not name the integrity failure:\n%s", s.log)
	}
}

func TestServeFioVerify(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "fio.raw")
	if err := os.WriteFile(src, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(src, 64<<20); err != nil {
		t.Fatal(err)
	}
	e.seal(t, src, src+".img")
	s := startServe(t, e, src+".img", false)
	out := nbdClient(t, nil, "fio", "--name=verify", "--ioengine=nbd", "--uri="+s.uri(),
		"--rw=randwrite", "--bs=4k", "--size=32M", "--iodepth=32", "--verify=crc32c",
		"--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=json")
	clienttool.CheckFioVerify(t, out, 32<<20)
}

// TestServeMalformedStreamClosesOnlyThatConnection: a client that sends garbage after the
// greeting is disconnected; a client connected at the same time keeps working, and new
// clients are served.
func TestServeMalformedStreamClosesOnlyThatConnection(t *testing.T) {
	env := clienttool.NbdshEnv(t)
	e := newEnv(t)
	_, img := sealed(t, e, 1<<20)
	s := startServe(t, e, img, false)
	// A well-behaved client connects first and stays connected (nbdsh waits on stdin).
	good := exec.Command("nbdsh", "-u", s.uri(), "-c", `
import sys
assert len(h.pread(4096, 0)) == 4096
print("first read ok", flush=True)
sys.stdin.readline()
assert len(h.pread(4096, 8192)) == 4096
h.flush()
print("still ok", flush=True)
`)
	good.Env = env
	stdin, err := good.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := good.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	good.Stderr = good.Stdout
	if err := good.Start(); err != nil {
		t.Fatal(err)
	}
	defer good.Process.Kill()
	lines := make(chan string, 16)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	expectLine := func(want string) {
		t.Helper()
		timeout := time.After(20 * time.Second)
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					t.Fatalf("good client ended before printing %q", want)
				}
				if l == want {
					return
				}
				t.Logf("good client: %s", l)
			case <-timeout:
				t.Fatalf("good client did not print %q", want)
			}
		}
	}
	expectLine("first read ok")
	// The bad client: garbage instead of client flags and options.
	c, err := net.Dial("unix", s.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	greeting := make([]byte, 18)
	if _, err := io.ReadFull(c, greeting); err != nil {
		t.Fatalf("greeting: %v", err)
	}
	c.Write(bytes.Repeat([]byte{0xde, 0xad, 0xbe, 0xef}, 64))
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, c); err != nil {
		t.Fatalf("server did not close the malformed connection: %v", err)
	}
	stdin.Write([]byte("\n"))
	expectLine("still ok")
	if err := good.Wait(); err != nil {
		t.Fatalf("the other connection was disturbed: %v", err)
	}
	nbdClient(t, nil, "nbdinfo", "--size", s.uri())
}
