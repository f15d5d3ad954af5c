package broker_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/broker"
	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/internal/fixture"
	"github.com/sealdisk/sealdisk/psp"
)

func TestMain(m *testing.M) { fixture.Main(m) }

// syncBuffer is a log sink the server writes to and the test searches.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// harness is a broker (real HTTPS on loopback) with a store, the fixture world's chip and
// provider, and one remote-key image per key id.
type harness struct {
	w        *fixture.World
	dir      string
	tls      *fixture.TLSFiles
	identity string
	store    string
	fw       string // firmware file every certificate allows
	log      *syncBuffer
	offset   atomic.Int64 // the broker's clock runs this many ns ahead
	images   map[string]*fixture.Image
	cfgPath  string
}

// policies are the key ids' policies, by name; %[1]s is the vendor root, %[2]s the provider
// key, %[3]s another vendor's root.
const policies = `
  k-ok:
    vendor_roots: [%[1]s]
    providers: [%[2]s]
    lease: 10m
  k-meas:
    vendor_roots: [%[1]s]
    providers: [%[2]s]
    measurements: ["%[4]s"]
  k-vendor:
    vendor_roots: [%[3]s]
    providers: [%[2]s]
  k-window:
    vendor_roots: [%[1]s]
    providers: [%[2]s]
    not_after: "2020-01-01T00:00:00Z"
  k-revoked:
    vendor_roots: [%[1]s]
    providers: [%[2]s]
  k-nostore:
    vendor_roots: [%[1]s]
    providers: [%[2]s]
  k-vm:
    vendor_roots: [%[1]s]
    providers: [%[2]s]
    vms: [vm-allowed]
  k-rate:
    vendor_roots: [%[1]s]
    providers: [%[2]s]
    rate_limit: 1/1h
`

var keyIDs = []string{"k-ok", "k-meas", "k-vendor", "k-window", "k-revoked", "k-nostore", "k-nopolicy", "k-vm", "k-rate"}

func newHarness(t testing.TB, extra string) *harness {
	t.Helper()
	return newHarnessIn(t, extra, fixture.Shared(t))
}

func newHarnessIn(t testing.TB, extra string, w *fixture.World) *harness {
	t.Helper()
	d := t.TempDir()
	h := &harness{w: w, dir: d, identity: filepath.Join(d, "identity"), store: filepath.Join(d, "store"),
		fw: filepath.Join(d, "OVMF.fd"), log: &syncBuffer{}, images: map[string]*fixture.Image{}}
	h.tls = fixture.TLS(t, filepath.Join(d, "tls"))
	must(t, broker.InitIdentity(h.identity))
	must(t, os.WriteFile(h.fw, []byte("broker test firmware"), 0o644))
	m, err := psp.Measure(h.fw, format.MeasureSHA384)
	must(t, err)
	other := filepath.Join(d, "vendor2")
	must(t, psp.InitVendor(other, "another vendor"))
	h.cfgPath = h.writeConfig(t, "broker.yaml", extra, m)
	return h
}

func (h *harness) writeConfig(t testing.TB, name, extra string, m []byte) string {
	t.Helper()
	pol := fmt.Sprintf(policies, filepath.Join(h.w.VendorDir, "vendor.crt"), filepath.Join(h.w.ProviderDir, "provider.pub"),
		filepath.Join(h.dir, "vendor2", "vendor.crt"), strings.Repeat("11", 48))
	cfg := fmt.Sprintf("listen: tcp:127.0.0.1:0\ntls_cert: %s\ntls_key: %s\nclient_ca: %s\nidentity: %s\nstore: %s\nnonce_window: 60s\n%skeys:%s",
		h.tls.ServerCert, h.tls.ServerKey, h.tls.CA, h.identity, h.store, extra, pol)
	p := filepath.Join(h.dir, name)
	must(t, os.WriteFile(p, []byte(cfg), 0o644))
	_ = m
	return p
}

// start runs a server for the config at path and returns its base URL.
func (h *harness) start(t testing.TB, path string) string {
	t.Helper()
	cfg, err := broker.LoadConfig(path)
	must(t, err)
	s, err := broker.NewServer(cfg, broker.ServerOptions{
		Now:    func() time.Time { return time.Now().Add(time.Duration(h.offset.Load())) },
		Logger: slog.New(slog.NewTextHandler(h.log, nil)),
	})
	must(t, err)
	ln, err := s.Listen()
	must(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Serve(ctx, ln); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return "https://" + ln.Addr().String()
}

// putKeys makes one image per key id referencing url and stores its key (except k-nostore),
// then revokes k-revoked.
func (h *harness) putKeys(t testing.TB, url string) {
	t.Helper()
	st, err := broker.OpenStore(h.store, h.identity)
	must(t, err)
	m, err := psp.Measure(h.fw, format.MeasureSHA384)
	must(t, err)
	for _, id := range keyIDs {
		im := h.w.Image(t, fixture.Spec{Size: 1 << 20, Measurements: [][]byte{m}, BrokerURL: url, KeyID: id})
		h.images[id] = im
		if id != "k-nostore" {
			must(t, st.Put(id, im.Key))
		}
	}
	must(t, st.Revoke("k-revoked"))
}

// capture is a KeyFetcher that fetches nothing: it keeps the PSP's request so the test can
// have the PSP sign reports over nonces of its choosing and send them itself.
type capture struct{ req psp.KeyRequest }

var errCaptured = errors.New("captured")

func (c *capture) FetchKey(_ context.Context, req psp.KeyRequest) (*psp.Release, error) {
	c.req = req
	return nil, errCaptured
}

// attester launches image id's VM under vm and returns the PSP's attest function and the
// certificate bytes.
func (h *harness) attester(t testing.TB, id, vm string) (func([]byte) ([]byte, error), []byte) {
	t.Helper()
	c := &capture{}
	p, err := psp.Open(h.w.ChipDir, psp.Options{Binder: &binder{}, Fetcher: c})
	must(t, err)
	im := h.images[id]
	_, err = p.Launch(psp.LaunchRequest{VM: vm, Cert: im.Cert, Header: im.Header, FirmwarePath: h.fw})
	if !errors.Is(err, errCaptured) {
		t.Fatalf("launch: %v, want the captured fetch", err)
	}
	return c.req.Attest, c.req.Cert
}

func (h *harness) client(t testing.TB, withCert bool) *http.Client {
	t.Helper()
	b, err := os.ReadFile(h.tls.CA)
	must(t, err)
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(b)
	tc := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}
	if withCert {
		c, err := tls.LoadX509KeyPair(h.tls.ClientCert, h.tls.ClientKey)
		must(t, err)
		tc.Certificates = []tls.Certificate{c}
	}
	return &http.Client{Transport: &http.Transport{TLSClientConfig: tc}}
}

func post(t testing.TB, c *http.Client, url string, in any) (int, []byte) {
	t.Helper()
	b, _ := json.Marshal(in)
	resp, err := c.Post(url, "application/json", bytes.NewReader(b))
	must(t, err)
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, out
}

func (h *harness) challenge(t testing.TB, c *http.Client, url, keyID string) []byte {
	t.Helper()
	code, body := post(t, c, url+"/v1/challenge", broker.ChallengeRequest{KeyID: keyID})
	if code != 200 {
		t.Fatalf("challenge: %d %s", code, body)
	}
	var ch broker.ChallengeResponse
	must(t, json.Unmarshal(body, &ch))
	return ch.Nonce
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// binder is an engine stand-in that keeps copies of the keys the PSP loads.
type binder struct {
	mu     sync.Mutex // guards loaded
	loaded map[psp.ASID][]byte
}

func (b *binder) LoadKey(a psp.ASID, bd psp.Binding) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.loaded == nil {
		b.loaded = map[psp.ASID][]byte{}
	}
	b.loaded[a] = bytes.Clone(bd.Key)
	return nil
}

func (b *binder) ClearKey(a psp.ASID) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.loaded, a)
	return nil
}

func (b *binder) key(a psp.ASID) []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.loaded[a]
}
