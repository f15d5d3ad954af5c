package nbd

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/engine"
)

func negotiateT(t *testing.T, sock, name string, tc *tls.Config) (net.Conn, ExportInfo, error) {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return ClientNegotiate(ctx, c, name, tc)
}

// TestClientNegotiate: the attach client's handshake against this server: what GO reports,
// that the connection is left in transmission, and the typed refusals.
func TestClientNegotiate(t *testing.T) {
	dev := newTestDevice(8<<20, nil)
	ro := newTestDevice(1<<20, func(c *engine.Caps) { c.ReadOnly = true })
	ts := startServer(t, Options{}, Export{Name: "d", Device: dev}, Export{Name: "ro", Device: ro})

	conn, info, err := negotiateT(t, ts.sock, "d", nil)
	if err != nil {
		t.Fatal(err)
	}
	if info.Size != 8<<20 || info.ReadOnly() || info.Flags&tflagSendFlush == 0 || info.Flags&tflagSendFUA == 0 ||
		info.MinBlock != 1 || info.PreferredBlock != 4096 || info.MaxBlock != 32<<20 {
		t.Fatalf("info %+v", info)
	}
	// In transmission: a simple write and read back.
	c := newTClient(t, conn)
	want := pattern(4096, 3)
	if r := c.do(cmdWrite, 0, 8192, 4096, want); r.errno != 0 {
		t.Fatalf("write: %v", r.errno)
	}
	if r := c.do(cmdRead, 0, 8192, 4096, nil); r.errno != 0 || string(r.data) != string(want) {
		t.Fatalf("read back: %v", r.errno)
	}

	if _, info, err := negotiateT(t, ts.sock, "ro", nil); err != nil || !info.ReadOnly() {
		t.Fatalf("read-only export: %+v %v", info, err)
	}
	if _, _, err := negotiateT(t, ts.sock, "nope", nil); !errors.Is(err, ErrExportUnknown) {
		t.Fatalf("unknown export: %v", err)
	}
}

func TestClientNegotiateTLS(t *testing.T) {
	pki := newPKI(t)
	ts := startServer(t, Options{TLS: pki.serverConfig(t), RequireTLS: true},
		Export{Name: "vm1", Device: newTestDevice(1<<20, nil), AllowedIdentity: "vm1"},
		Export{Name: "vm2", Device: newTestDevice(1<<20, nil), AllowedIdentity: "vm2"})
	client := func(cn string) *tls.Config {
		_, _, cert := pki.issue(t, cn, false)
		return &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pki.pool, ServerName: "localhost"}
	}

	if _, _, err := negotiateT(t, ts.sock, "vm1", nil); !errors.Is(err, ErrTLSRequired) {
		t.Fatalf("plaintext: %v", err)
	}
	if _, _, err := negotiateT(t, ts.sock, "vm1", client("vm2")); !errors.Is(err, ErrExportUnknown) {
		t.Fatalf("another VM's certificate: %v", err)
	}
	conn, info, err := negotiateT(t, ts.sock, "vm1", client("vm1"))
	if err != nil || info.Size != 1<<20 {
		t.Fatalf("right certificate: %+v %v", info, err)
	}
	if _, ok := conn.(*tls.Conn); !ok {
		t.Fatalf("transmission connection is %T, want TLS", conn)
	}
	c := newTClient(t, conn)
	if r := c.do(cmdFlush, 0, 0, 0, nil); r.errno != 0 {
		t.Fatalf("flush over TLS: %v", r.errno)
	}
}
