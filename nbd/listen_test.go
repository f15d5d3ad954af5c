package nbd

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

func TestListenUnix(t *testing.T) {
	dir := shortDir(t)
	sock := filepath.Join(dir, "s")

	ln, err := ListenUnix(sock, 0)
	if err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(sock); fi.Mode().Perm() != DefaultSocketMode {
		t.Errorf("socket mode %v, want %v", fi.Mode().Perm(), DefaultSocketMode)
	}
	if _, err := ListenUnix(sock, 0); err == nil {
		t.Error("a socket in use was taken over")
	}
	// A stale socket (its server died without unlinking it) is replaced.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	if _, err := os.Stat(sock); err != nil {
		t.Fatalf("stale socket missing: %v", err)
	}
	ln, err = ListenUnix(sock, 0o600)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	if fi, _ := os.Stat(sock); fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want 0600", fi.Mode().Perm())
	}
	ln.Close()

	file := filepath.Join(dir, "file")
	os.WriteFile(file, []byte("keep me"), 0o600)
	if _, err := ListenUnix(file, 0); err == nil {
		t.Error("a regular file was replaced by a socket")
	}
	if b, _ := os.ReadFile(file); string(b) != "keep me" {
		t.Error("regular file damaged")
	}
}

func TestListenTCP(t *testing.T) {
	if _, err := ListenTCP("127.0.0.1:0", false, false); !errors.Is(err, ErrInsecureTCP) {
		t.Fatalf("plain TCP without opt-in: %v", err)
	}
	s := NewServer(Options{Logger: quietLogger()})
	dev := newTestDevice(1<<20, nil)
	s.AddExport(Export{Name: "d", Device: dev})

	// A TCP listener not made by ListenTCP(insecure) is refused without RequireTLS.
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	if err := s.Serve(context.Background(), raw); !errors.Is(err, ErrInsecureTCP) {
		t.Fatalf("Serve on plain TCP: %v", err)
	}
	if err := NewServer(Options{RequireTLS: true}).Serve(context.Background(), raw); err == nil {
		t.Fatal("RequireTLS without a TLS config accepted")
	}

	ln, err := ListenTCP("127.0.0.1:0", false, true)
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { errc <- s.Serve(context.Background(), ln) }()
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c := newTClient(t, nc)
	c.open("d", false, false)
	if r := c.do(cmdRead, 0, 0, 512, nil); r.errno != 0 {
		t.Fatalf("read over insecure TCP: %v", r.errno)
	}
	nc.Close()
	if err := s.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
}

// TestServeContext: cancelling Serve's context closes its listener and its connections.
func TestServeContext(t *testing.T) {
	s := NewServer(Options{Logger: quietLogger()})
	s.AddExport(Export{Name: "d", Device: newTestDevice(1<<20, nil)})
	sock := filepath.Join(shortDir(t), "s")
	ln, err := ListenUnix(sock, 0)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- s.Serve(ctx, ln) }()
	c := openT(t, sock, "d", false, false)
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("Serve: %v", err)
	}
	c.expectClosed()
	if err := s.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
}

type countMetrics struct {
	mu    sync.Mutex // guards the maps
	conns map[string]int
	reqs  map[string]int
	errs  map[Errno]int
}

func (m *countMetrics) Connections(export string, delta int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.conns[export] += delta
}

func (m *countMetrics) Request(export, op string, bytes int64, d time.Duration, errno Errno) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.reqs[export+"/"+op]++
	m.errs[errno]++
}

func TestMetrics(t *testing.T) {
	m := &countMetrics{conns: map[string]int{}, reqs: map[string]int{}, errs: map[Errno]int{}}
	ts := startServer(t, Options{Metrics: m}, Export{Name: "d", Device: newTestDevice(1<<20, nil)})
	c := openT(t, ts.sock, "d", false, false)
	c.do(cmdWrite, 0, 0, 3, []byte("abc"))
	c.do(cmdRead, 0, 0, 3, nil)
	c.do(cmdRead, 0, 1<<20, 3, nil) // refused at validation: counted too
	c.do(cmdFlush, 0, 0, 0, nil)
	m.mu.Lock()
	if m.conns["d"] != 1 || m.reqs["d/read"] != 2 || m.reqs["d/write"] != 1 || m.reqs["d/flush"] != 1 || m.errs[EINVAL] != 1 {
		t.Errorf("metrics: conns %v reqs %v errs %v", m.conns, m.reqs, m.errs)
	}
	m.mu.Unlock()
	c.send(cmdDisc, 0, 1, 0, 0, nil)
	c.expectClosed()
	ts.stop(t)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.conns["d"] != 0 {
		t.Errorf("connection gauge %d after disconnect", m.conns["d"])
	}
}
