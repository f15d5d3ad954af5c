//go:build rbd

package rbd_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/internal/cephtest"
	"github.com/sealdisk/sealdisk/internal/fixture"
	"github.com/sealdisk/sealdisk/store"
	"github.com/sealdisk/sealdisk/store/rbd"
	"github.com/sealdisk/sealdisk/store/storetest"
)

func TestMain(m *testing.M) {
	if os.Getenv(holderEnv) != "" {
		holdLock()
		return
	}
	code := cephtest.Main(m)
	fixture.Remove()
	os.Exit(code)
}

// config is client.sealdisk on the test binary's cluster.
func config(t testing.TB) rbd.Config {
	c := cephtest.Shared(t)
	return rbd.Config{Conf: c.Conf, ID: cephtest.ClientID, Keyring: c.Keyring}
}

// newImage creates a fresh image and returns its location and the open store, closed at
// cleanup.
func newImage(t testing.TB) (rbd.Config, rbd.Location, *rbd.Store) {
	t.Helper()
	cfg := config(t)
	loc := rbd.Location{Pool: cephtest.Pool, Image: cephtest.UniqueImage("t")}
	s, err := rbd.Create(cfg, loc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return cfg, loc, s
}

func TestParseLocation(t *testing.T) {
	if l, err := rbd.ParseLocation("rbd:pool/vm1"); err != nil || l != (rbd.Location{Pool: "pool", Image: "vm1"}) || l.String() != "rbd:pool/vm1" {
		t.Fatalf("%v %v", l, err)
	}
	for _, bad := range []string{"rbd:", "rbd:pool", "rbd:/img", "rbd:pool/", "rbd:p/a/b", "rbd:p/img@snap", "pool/img"} {
		if _, err := rbd.ParseLocation(bad); err == nil || !strings.Contains(err.Error(), bad) {
			t.Errorf("%q: %v, want an error naming it", bad, err)
		}
	}
}

// The model check every store passes: writes past the end grow the image, reads past it are
// short with io.EOF, punches and truncates behave as on a file.
func TestAgainstModel(t *testing.T) {
	_, _, s := newImage(t)
	storetest.Exercise(t, s, 5)
}

// RBD's own edges, each of which librbd alone gets "wrong" for a file's semantics.
func TestFileSemantics(t *testing.T) {
	_, _, s := newImage(t)
	if err := s.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
	p := bytes.Repeat([]byte{0xAB}, 8192)
	// a write crossing the end grows the image rather than being clipped
	if n, err := s.WriteAt(p, 1<<20-4096); err != nil || n != len(p) {
		t.Fatalf("write across the end: %d, %v", n, err)
	}
	if size, _ := s.Size(); size != 1<<20+4096 {
		t.Fatalf("size %d after a write across the end", size)
	}
	// a read at or past the end is io.EOF, not EINVAL
	if n, err := s.ReadAt(make([]byte, 10), 1<<21); n != 0 || err != io.EOF {
		t.Fatalf("read past the end: %d, %v", n, err)
	}
	got := make([]byte, 8192)
	if n, err := s.ReadAt(got, 1<<20); n != 4096 || err != io.EOF || !bytes.Equal(got[:n], p[:n]) {
		t.Fatalf("read across the end: %d, %v", n, err)
	}
	// a 4 KiB punch (smaller than librbd's 64 KiB discard granularity) zeroes
	if err := s.Punch(1<<20-4096, 4096); err != nil {
		t.Fatal(err)
	}
	if _, err := s.ReadAt(got[:4096], 1<<20-4096); err != nil || !bytes.Equal(got[:4096], make([]byte, 4096)) {
		t.Fatalf("a 4 KiB punch kept data: %v", err)
	}
	// a punch at or past the end does nothing, as on a file
	if err := s.Punch(1<<22, 4096); err != nil {
		t.Fatalf("punch past the end: %v", err)
	}
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
}

// Extents sees data objects only: a fresh image has none, a write makes its object allocated,
// a punch of the whole object frees it.
func TestExtents(t *testing.T) {
	_, _, s := newImage(t)
	if err := s.Truncate(64 << 20); err != nil {
		t.Fatal(err)
	}
	if ext, err := s.Extents(0, 64<<20); err != nil || len(ext) != 0 {
		t.Fatalf("fresh image: %v %v", ext, err)
	}
	if _, err := s.WriteAt([]byte{1}, 9<<20); err != nil {
		t.Fatal(err)
	}
	ext, err := s.Extents(0, 64<<20)
	if err != nil || len(ext) != 1 || ext[0][0] > 9<<20 || ext[0][1] <= 9<<20 || ext[0][1]-ext[0][0] > 4<<20 {
		t.Fatalf("one byte at 9 MiB: %v %v", ext, err)
	}
	if ext, err := s.Extents(10<<20, 11<<20); err != nil || len(ext) != 1 || ext[0] != [2]int64{10 << 20, 11 << 20} {
		t.Fatalf("window inside the object: %v %v", ext, err)
	}
	if err := s.Punch(8<<20, 4<<20); err != nil {
		t.Fatal(err)
	}
	if ext, err := s.Extents(0, 64<<20); err != nil || len(ext) != 0 {
		t.Fatalf("after punching the object: %v %v", ext, err)
	}
}

func TestOpenErrors(t *testing.T) {
	cfg := config(t)
	if _, err := rbd.Open(cfg, rbd.Location{Pool: cephtest.Pool, Image: "absent"}, true); !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), "rbd:rbd/absent") {
		t.Fatalf("absent image: %v", err)
	}
	if _, err := rbd.Open(cfg, rbd.Location{Pool: "nopool", Image: "x"}, true); err == nil || !strings.Contains(err.Error(), "nopool") {
		t.Fatalf("absent pool: %v", err)
	}
	bad := cfg
	bad.Keyring = "/nonexistent/keyring"
	if _, err := rbd.Open(bad, rbd.Location{Pool: cephtest.Pool, Image: "x"}, true); err == nil || !strings.Contains(err.Error(), "keyring") {
		t.Fatalf("missing keyring: %v", err)
	}
	_, loc, _ := newImage(t)
	if _, err := rbd.Create(cfg, loc); !errors.Is(err, os.ErrExist) {
		t.Fatalf("create over an image: %v", err)
	}
	// an image without exclusive-lock cannot be locked, so it is refused read-write
	c := cephtest.Shared(t)
	plain := cephtest.UniqueImage("nolock")
	if out, err := c.RBD("create", "--size", "1M", "--image-feature", "layering", cephtest.Pool+"/"+plain); err != nil {
		t.Fatal(err, string(out))
	}
	if _, err := rbd.Open(cfg, rbd.Location{Pool: cephtest.Pool, Image: plain}, false); err == nil || !strings.Contains(err.Error(), "exclusive-lock") {
		t.Fatalf("image without exclusive-lock: %v", err)
	}
	// a stripe unit under a sector would let one sector write tear across two objects
	striped := cephtest.UniqueImage("striped")
	if out, err := c.RBD("create", "--size", "1M", "--stripe-unit", "512", "--stripe-count", "2", cephtest.Pool+"/"+striped); err != nil {
		t.Fatal(err, string(out))
	}
	if _, err := rbd.Open(cfg, rbd.Location{Pool: cephtest.Pool, Image: striped}, true); err == nil || !strings.Contains(err.Error(), "stripe unit is 512 bytes") {
		t.Fatalf("image striped at 512 bytes: %v", err)
	}
}

func TestRenameRemove(t *testing.T) {
	cfg := config(t)
	from := rbd.Location{Pool: cephtest.Pool, Image: cephtest.UniqueImage("from")}
	s, err := rbd.Create(cfg, from)
	if err != nil {
		t.Fatal(err)
	}
	id1, _ := s.Identity()
	s.Close()
	to := from.WithSuffix(".renamed")
	if err := rbd.Rename(cfg, from, to); err != nil {
		t.Fatal(err)
	}
	if ok, err := rbd.Exists(cfg, from); ok || err != nil {
		t.Fatalf("old name exists: %v %v", ok, err)
	}
	s, err = rbd.Open(cfg, to, true)
	if err != nil {
		t.Fatal(err)
	}
	if id2, _ := s.Identity(); id2 != id1 || !strings.HasPrefix(id1, "rbd:") {
		t.Fatalf("identity %q changed to %q by a rename", id1, id2)
	}
	s.Close()
	if err := rbd.Remove(cfg, to); err != nil {
		t.Fatal(err)
	}
	if err := rbd.Remove(cfg, to); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("second remove: %v", err)
	}
}

// The exclusive lock is the image lock: a second client (another connection, as another host
// would be) is refused it and cannot write; readers are refused while a writer holds it; the
// holder's Close hands it on.
func TestExclusiveLock(t *testing.T) {
	cfg, loc, a := newImage(t)
	if err := a.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
	if err := a.Lock(true); err != nil {
		t.Fatal(err)
	}
	b, err := rbd.Open(cfg, loc, false)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	err = b.Lock(true)
	if !errors.Is(err, store.ErrLocked) || !strings.Contains(err.Error(), loc.String()) || !strings.Contains(err.Error(), "held by client.") {
		t.Fatalf("second exclusive lock: %v", err)
	}
	t.Log(err)
	if err := b.Lock(false); !errors.Is(err, store.ErrLocked) {
		t.Fatalf("shared lock beside a writer: %v", err)
	}
	ro, err := rbd.Open(cfg, loc, true)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if err := ro.Lock(false); !errors.Is(err, store.ErrLocked) {
		t.Fatalf("shared lock of a read-only open beside a writer: %v", err)
	}
	if _, err := b.WriteAt([]byte{1}, 0); err == nil {
		t.Fatal("a second client wrote an image another holds the exclusive lock of")
	}
	if _, err := a.WriteAt([]byte{2}, 0); err != nil {
		t.Fatalf("the holder cannot write: %v", err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.Lock(true); err != nil {
		t.Fatalf("lock after the holder closed: %v", err)
	}
	if _, err := b.WriteAt([]byte{3}, 0); err != nil {
		t.Fatal(err)
	}
}

const holderEnv = "SEALDISK_RBD_TEST_HOLDER"

// holdLock is the helper process of TestKilledHolder: it takes the lock, writes and flushes a
// block, says so and waits to be killed.
func holdLock() {
	var cfg rbd.Config
	var loc rbd.Location
	fmt.Sscan(os.Getenv(holderEnv), &cfg.Conf, &cfg.ID, &cfg.Keyring, &loc.Pool, &loc.Image)
	s, err := rbd.Open(cfg, loc, false)
	if err == nil {
		err = s.Lock(true)
	}
	if err == nil {
		_, err = s.WriteAt(bytes.Repeat([]byte{0x5A}, 4096), 4096)
	}
	if err == nil {
		err = s.Sync()
	}
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	fmt.Println("holding")
	select {}
}

// A holder killed with SIGKILL (a crashed host) leaves the lock to be broken: another client
// gets it once the OSD drops the dead client's watch, and what the dead one flushed is there.
func TestKilledHolder(t *testing.T) {
	cfg, loc, s := newImage(t)
	if err := s.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), holderEnv+"="+strings.Join([]string{cfg.Conf, cfg.ID, cfg.Keyring, loc.Pool, loc.Image}, " "))
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	line := make([]byte, 200)
	n, _ := out.Read(line)
	if !strings.HasPrefix(string(line[:n]), "holding") {
		t.Fatalf("holder: %s", line[:n])
	}
	if err := s.Lock(true); !errors.Is(err, store.ErrLocked) {
		t.Fatalf("lock beside a live holder: %v", err)
	}
	ro, err := rbd.Open(cfg, loc, true)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	cmd.Process.Kill()
	cmd.Wait()
	start := time.Now()
	// a reader goes ahead once the dead holder's watch is gone, though its lock is not broken
	for {
		err := ro.Lock(false)
		if err == nil {
			break
		}
		if !errors.Is(err, store.ErrLocked) || time.Since(start) > 60*time.Second {
			t.Fatalf("reader after the holder was killed: %v", err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Logf("shared lock %v after the holder was killed", time.Since(start).Round(100*time.Millisecond))
	for {
		err := s.Lock(true)
		if err == nil {
			break
		}
		if !errors.Is(err, store.ErrLocked) || time.Since(start) > 60*time.Second {
			t.Fatalf("lock after the holder was killed: %v", err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Logf("lock taken %v after the holder was killed", time.Since(start).Round(100*time.Millisecond))
	got := make([]byte, 4096)
	if _, err := s.ReadAt(got, 4096); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{0x5A}, 4096)) {
		t.Fatalf("the killed holder's flushed block: %v", err)
	}
	if _, err := s.WriteAt([]byte{1}, 0); err != nil {
		t.Fatal(err)
	}
}
