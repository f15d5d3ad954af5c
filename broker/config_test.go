package broker_test

import (
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sealdisk/sealdisk/broker"
)

// TestConfigErrorsNameTheKey: every bad value in broker.yaml is refused naming its key.
func TestConfigErrorsNameTheKey(t *testing.T) {
	d := t.TempDir()
	for body, want := range map[string]string{
		"identity: x\n":                                                   "store: required",
		"store: s\n":                                                      "identity: required",
		"identity: i\nstore: s\nbogus: 1\n":                               "field bogus not found",
		"identity: i\nstore: s\nnonce_window: 2h\n":                       "nonce_window",
		"identity: i\nstore: s\nrequire_client_cert: true\n":              "require_client_cert: needs client_ca",
		"identity: i\nstore: s\nkeys:\n  k:\n    providers: [nope.pub]\n": "keys.k.vendor_roots",
		"identity: i\nstore: s\nkeys:\n  k:\n    lease: forever\n":        "keys.k.lease",
		"identity: i\nstore: s\nkeys:\n  k:\n    rate_limit: lots\n":      "keys.k.rate_limit",
		"identity: i\nstore: s\nkeys:\n  k:\n    chips: [abc]\n":          "keys.k.chips",
		"identity: i\nstore: s\nkeys:\n  k:\n    not_after: tomorrow\n":   "keys.k.not_after",
		"identity: i\nstore: s\nkeys:\n  k:\n    images: [not-a-uuid]\n":  "keys.k.images",
	} {
		p := filepath.Join(d, "b.yaml")
		must(t, os.WriteFile(p, []byte(body), 0o644))
		_, err := broker.LoadConfig(p)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: got %v, want an error naming %q", body, err, want)
		}
	}
}

// TestServeOnUnixSocket: listen unix:PATH serves HTTPS there (mode 0600).
func TestServeOnUnixSocket(t *testing.T) {
	h := newHarness(t, "")
	sock := filepath.Join(h.dir, "broker.sock")
	b, _ := os.ReadFile(h.cfgPath)
	cfg := strings.Replace(string(b), "listen: tcp:127.0.0.1:0", "listen: unix:"+sock, 1)
	p := filepath.Join(h.dir, "unix.yaml")
	must(t, os.WriteFile(p, []byte(cfg), 0o644))
	h.start(t, p)
	fi, err := os.Stat(sock)
	must(t, err)
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %o", fi.Mode().Perm())
	}
	c := h.client(t, false)
	c.Transport.(*http.Transport).DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}
	if n := h.challenge(t, c, "https://localhost", "k-ok"); len(n) != 57 {
		t.Fatalf("nonce of %d bytes", len(n))
	}
}

// TestTLS13Only: a client that offers at most TLS 1.2 gets no connection.
func TestTLS13Only(t *testing.T) {
	h := newHarness(t, "")
	url := h.start(t, h.cfgPath)
	c := h.client(t, false)
	c.Transport.(*http.Transport).TLSClientConfig.MinVersion = tls.VersionTLS12
	c.Transport.(*http.Transport).TLSClientConfig.MaxVersion = tls.VersionTLS12
	if _, err := c.Get(url + "/metrics"); err == nil || !strings.Contains(err.Error(), "protocol version") {
		t.Fatalf("TLS 1.2 client: %v, want a protocol version failure", err)
	}
}
