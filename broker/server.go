package broker

import (
	"context"
	"crypto/rand"
	"crypto/sha512"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/psp"
)

// Wire messages (docs/BROKER.md). Bytes are base64 in JSON.
type (
	// ChallengeRequest: POST /v1/challenge.
	ChallengeRequest struct {
		KeyID string `json:"key_id"`
	}
	// ChallengeResponse carries the nonce the report must be over.
	ChallengeResponse struct {
		Nonce   []byte `json:"nonce"`
		Expires string `json:"expires"`
	}
	// ReleaseRequest: POST /v1/release.
	ReleaseRequest struct {
		KeyID       string          `json:"key_id"`
		Nonce       []byte          `json:"nonce"`
		Report      json.RawMessage `json:"report"`      // the PSP's envelope, verbatim
		Certificate []byte          `json:"certificate"` // the image certificate's bytes
	}
	// ReleaseResponse is psp.Release on the wire.
	ReleaseResponse struct {
		Grant     []byte `json:"grant"`
		SealedKey []byte `json:"sealed_key"`
	}
	// ErrorResponse: every refusal says only "release refused" and a reference the broker's
	// log and audit line carry with the reason.
	ErrorResponse struct {
		Error string `json:"error"`
		Ref   string `json:"ref,omitempty"`
	}
)

const maxRequest = 256 << 10

// Server is one broker replica.
type Server struct {
	cfg    *Config
	store  *Store
	replay *replayStore
	audit  *auditLog
	log    *slog.Logger
	now    func() time.Time
	name   string // replica name in audit lines

	mu    sync.Mutex // guards rates
	rates map[string][]time.Time

	reg        *prometheus.Registry
	requests   *prometheus.CounterVec
	releases   *prometheus.CounterVec
	refusals   *prometheus.CounterVec
	releaseDur prometheus.Histogram
}

// ServerOptions: a nil Now is time.Now, a nil Logger slog.Default().
type ServerOptions struct {
	Now    func() time.Time
	Logger *slog.Logger
}

// NewServer opens the store and identity of cfg.
func NewServer(cfg *Config, opts ServerOptions) (*Server, error) {
	st, err := OpenStore(cfg.Store, cfg.Identity)
	if err != nil {
		return nil, err
	}
	host, _ := os.Hostname()
	s := &Server{
		cfg: cfg, store: st, log: opts.Logger, now: opts.Now,
		replay: &replayStore{dir: st.dir + "/replay", window: cfg.nonceWindow},
		audit:  &auditLog{path: cfg.AuditLog, key: st.id.auditKey},
		name:   fmt.Sprintf("%s:%d", host, os.Getpid()),
		rates:  map[string][]time.Time{},
		reg:    prometheus.NewRegistry(),
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	if s.now == nil {
		s.now = time.Now
	}
	s.requests = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sealdisk_broker_requests_total", Help: "Protocol requests by endpoint (challenge, release)."}, []string{"endpoint"})
	s.releases = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sealdisk_broker_releases_total", Help: "Keys released, by key id (only ids with a policy)."}, []string{"key_id"})
	s.refusals = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sealdisk_broker_refusals_total", Help: "Releases refused, by reason class."}, []string{"reason"})
	s.releaseDur = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sealdisk_broker_release_seconds", Help: "Time to answer a release.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)})
	s.reg.MustRegister(s.requests, s.releases, s.refusals, s.releaseDur)
	return s, nil
}

// Handler serves the protocol and GET /metrics.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/challenge", s.challenge)
	mux.HandleFunc("POST /v1/release", s.release)
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{}))
	return mux
}

// TLSConfig is the listener's: TLS 1.3 only; client certificates verified when given (and,
// with require_client_cert, a release without one is refused in the handler, so the refusal
// is audited).
func (s *Server) TLSConfig() (*tls.Config, error) {
	if _, err := psp.ReadPrivateFile(s.cfg.TLSKey); err != nil {
		return nil, fmt.Errorf("tls_key: %w", err)
	}
	cert, err := tls.LoadX509KeyPair(s.cfg.TLSCert, s.cfg.TLSKey)
	if err != nil {
		return nil, fmt.Errorf("failed to load the broker's TLS certificate: %w", err)
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}}
	if s.cfg.ClientCA != "" {
		b, err := os.ReadFile(s.cfg.ClientCA)
		if err != nil {
			return nil, fmt.Errorf("client_ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("client_ca: %s holds no PEM certificate", s.cfg.ClientCA)
		}
		tc.ClientCAs, tc.ClientAuth = pool, tls.VerifyClientCertIfGiven
	}
	return tc, nil
}

// Listen opens cfg.Listen (tcp: or unix:, the socket mode 0600) wrapped in TLS.
func (s *Server) Listen() (net.Listener, error) {
	tc, err := s.TLSConfig()
	if err != nil {
		return nil, err
	}
	kind, addr, _ := strings.Cut(s.cfg.Listen, ":")
	var ln net.Listener
	if kind == "unix" {
		os.Remove(addr)
		if ln, err = net.Listen("unix", addr); err == nil {
			err = os.Chmod(addr, 0o600)
		}
	} else {
		ln, err = net.Listen("tcp", addr)
	}
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", s.cfg.Listen, err)
	}
	return tls.NewListener(ln, tc), nil
}

// Serve runs the HTTPS server on ln until ctx ends.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	hs := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second,
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelWarn)}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		hs.Shutdown(sctx)
	}()
	if err := hs.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

func decode(w http.ResponseWriter, r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxRequest))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("trailing data after the JSON object")
	}
	return nil
}

func (s *Server) challenge(w http.ResponseWriter, r *http.Request) {
	s.requests.WithLabelValues("challenge").Inc()
	var req ChallengeRequest
	if err := decode(w, r, &req); err != nil {
		writeJSON(w, http.StatusBadRequest, ErrorResponse{Error: "bad challenge request: " + err.Error()})
		return
	}
	if !validKeyID(req.KeyID) {
		writeJSON(w, http.StatusBadRequest, ErrorResponse{Error: "bad challenge request: key_id must be 1..256 printable ASCII characters"})
		return
	}
	// Any key id gets a nonce, so a challenge does not tell which ids exist.
	now := s.now()
	writeJSON(w, http.StatusOK, ChallengeResponse{
		Nonce:   mintNonce(s.store.id.nonceKey, req.KeyID, now),
		Expires: now.Add(s.cfg.nonceWindow).UTC().Format(time.RFC3339Nano),
	})
}

// refusal is a reason the client is not told; class labels the metric.
type refusal struct {
	class, reason string
}

func (e *refusal) Error() string { return e.reason }

func refuse(class, format string, a ...any) *refusal {
	return &refusal{class: class, reason: fmt.Sprintf(format, a...)}
}

func (s *Server) release(w http.ResponseWriter, r *http.Request) {
	s.requests.WithLabelValues("release").Inc()
	start := time.Now()
	defer func() { s.releaseDur.Observe(time.Since(start).Seconds()) }()
	var rb [8]byte
	rand.Read(rb[:])
	e := &AuditEntry{Ref: hex.EncodeToString(rb[:]), Replica: s.name, Client: clientName(r)}
	var req ReleaseRequest
	if err := decode(w, r, &req); err != nil {
		// Malformed input is named (it reveals nothing about keys or policy), and audited.
		s.refuse(w, e, refuse("malformed", "malformed release request: %v", err), http.StatusBadRequest, "bad release request: "+err.Error())
		return
	}
	if !validKeyID(req.KeyID) {
		// Bounded before it goes into a log or audit line.
		s.refuse(w, e, refuse("malformed", "malformed release request: key_id is not 1..256 printable ASCII characters"), http.StatusBadRequest, "bad release request: key_id must be 1..256 printable ASCII characters")
		return
	}
	e.KeyID = req.KeyID
	rel, ref := s.decide(r, &req, e)
	if ref != nil {
		s.refuse(w, e, ref, http.StatusForbidden, "release refused")
		return
	}
	e.Verdict = "release"
	e.Time = s.now().UTC().Format(time.RFC3339Nano)
	if err := s.audit.append(e); err != nil {
		s.log.Error("release refused: the audit log cannot be written", "ref", e.Ref, "key_id", e.KeyID, "error", err)
		s.refusals.WithLabelValues("audit").Inc()
		writeJSON(w, http.StatusInternalServerError, ErrorResponse{Error: "release refused", Ref: e.Ref})
		return
	}
	s.releases.WithLabelValues(e.KeyID).Inc()
	s.log.Info("key released", "ref", e.Ref, "key_id", e.KeyID, "chip", e.Chip, "vm", e.VM, "image", e.Image, "lease_end", e.LeaseEnd, "client", e.Client)
	writeJSON(w, http.StatusOK, ReleaseResponse{Grant: rel.Grant, SealedKey: rel.SealedKey})
}

func (s *Server) refuse(w http.ResponseWriter, e *AuditEntry, ref *refusal, code int, msg string) {
	e.Verdict, e.Reason = "refuse", ref.reason
	e.Time = s.now().UTC().Format(time.RFC3339Nano)
	s.refusals.WithLabelValues(ref.class).Inc()
	s.log.Warn("release refused", "ref", e.Ref, "reason", ref.reason, "key_id", e.KeyID, "chip", e.Chip, "vm", e.VM, "client", e.Client)
	if err := s.audit.append(e); err != nil {
		s.log.Error("failed to audit a refusal", "ref", e.Ref, "error", err)
	}
	writeJSON(w, code, ErrorResponse{Error: msg, Ref: e.Ref})
}

// validKeyID is FORMAT.md's rule for a certificate's key_id.
func validKeyID(id string) bool {
	if id == "" || len(id) > 256 {
		return false
	}
	for i := 0; i < len(id); i++ {
		if id[i] < 0x20 || id[i] > 0x7e {
			return false
		}
	}
	return true
}

func clientName(r *http.Request) string {
	n := r.RemoteAddr
	if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		n += " cn=" + r.TLS.PeerCertificates[0].Subject.CommonName
	}
	return n
}

// decide runs every check of docs/BROKER.md "Release" in order and seals the key, or says
// why not. It fills e as it learns who is asking.
func (s *Server) decide(r *http.Request, req *ReleaseRequest, e *AuditEntry) (*psp.Release, *refusal) {
	now := s.now()
	if s.cfg.RequireClientCert && (r.TLS == nil || len(r.TLS.PeerCertificates) == 0) {
		return nil, refuse("client_cert", "client certificate missing")
	}
	issued, err := checkNonce(s.store.id.nonceKey, req.Nonce, req.KeyID, now, s.cfg.nonceWindow)
	switch {
	case errors.Is(err, ErrNonceExpired):
		return nil, refuse("nonce_expired", "%v", err)
	case err != nil:
		return nil, refuse("nonce_forged", "%v", err)
	}
	if err := s.replay.use(req.Nonce, issued, now); err != nil {
		if errors.Is(err, ErrNonceReplay) {
			return nil, refuse("nonce_replay", "nonce replayed (already used)")
		}
		return nil, refuse("store", "%v", err)
	}
	pol := s.cfg.Keys[req.KeyID]
	if pol == nil {
		return nil, refuse("unknown_key", "unknown key id %q (no policy)", req.KeyID)
	}
	body, err := psp.VerifyReport(req.Report, pol.roots, req.Nonce)
	switch {
	case errors.Is(err, psp.ErrReportChain):
		return nil, refuse("chip_not_endorsed", "chip not endorsed by an allowed vendor root: %v", err)
	case errors.Is(err, psp.ErrReportNonce):
		return nil, refuse("report_nonce", "report is over another nonce")
	case err != nil:
		return nil, refuse("report", "report does not verify: %v", err)
	}
	e.Chip, e.VM, e.Image, e.Measurement = body.ChipID, body.VM, body.ImageUUID, body.FirmwareMeasurement
	rt, err := time.Parse(time.RFC3339, body.Time)
	if err != nil || now.Sub(rt) > s.cfg.nonceWindow+clockSkew || rt.Sub(now) > clockSkew {
		return nil, refuse("report_stale", "report time %q is outside the window of %s", body.Time, s.cfg.nonceWindow)
	}
	c, ref := checkCert(req, body, pol)
	if ref != nil {
		return nil, ref
	}
	if ref := pol.allows(body, now); ref != nil {
		return nil, ref
	}
	if !s.rateOK(req.KeyID, pol, now) {
		return nil, refuse("rate_limit", "rate limit %s for key %q exceeded", pol.RateLimit, req.KeyID)
	}
	key, err := s.store.Key(req.KeyID)
	switch {
	case errors.Is(err, ErrUnknownKey):
		return nil, refuse("unknown_key", "unknown key id %q (not in the store)", req.KeyID)
	case errors.Is(err, ErrRevoked):
		return nil, refuse("revoked", "%v", err)
	case err != nil:
		return nil, refuse("store", "%v", err)
	}
	defer clear(key)
	chip, err := psp.ParseChipCert([]byte(chainHead(req.Report)))
	if err != nil {
		return nil, refuse("report", "chip certificate: %v", err)
	}
	end := now.Add(pol.lease)
	if !pol.notAfter.IsZero() && pol.notAfter.Before(end) {
		end = pol.notAfter
	}
	if c.NotAfter.Before(end) {
		end = c.NotAfter
	}
	// The lease end is carried in whole seconds (the HPKE info holds Unix seconds).
	end = end.Truncate(time.Second)
	rel, err := psp.SealRelease(chip, psp.Grant{
		KeyID: req.KeyID, ImageUUID: body.ImageUUID, ChipID: body.ChipID,
		Nonce: hex.EncodeToString(req.Nonce), LeaseEnd: end.UTC().Format(time.RFC3339),
		VMs: pol.VMs, Measurements: pol.Measurements,
	}, key)
	if err != nil {
		return nil, refuse("seal", "%v", err)
	}
	e.LeaseEnd = end.UTC().Format(time.RFC3339)
	return rel, nil
}

func chainHead(report []byte) string {
	var env psp.Envelope
	if json.Unmarshal(report, &env) != nil || len(env.Chain) == 0 {
		return ""
	}
	return env.Chain[0]
}

// checkCert: the certificate is the one the report attests (digest), signed by an allowed
// provider, remote, for this key id, chip and image.
func checkCert(req *ReleaseRequest, body *psp.ReportBody, pol *Policy) (*format.Certificate, *refusal) {
	d := sha512.Sum384(req.Certificate)
	if hex.EncodeToString(d[:]) != body.CertDigest {
		return nil, refuse("certificate", "certificate is not the one the report attests")
	}
	c, err := format.ParseCertificate(req.Certificate)
	if err != nil {
		return nil, refuse("certificate", "certificate: %v", err)
	}
	if err := pol.providers.VerifySignature(c); err != nil {
		return nil, refuse("provider", "provider not allowed: %v", err)
	}
	switch {
	case !c.Remote || c.KeyID != req.KeyID:
		return nil, refuse("certificate", "certificate does not reference key id %q", req.KeyID)
	case hex.EncodeToString(c.ChipID[:]) != body.ChipID:
		return nil, refuse("certificate", "certificate is for another chip than the report's")
	case formatUUID(c.UUID) != body.ImageUUID:
		return nil, refuse("certificate", "certificate is for another image than the report's")
	}
	return c, nil
}

func formatUUID(u [16]byte) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// allows applies the declarative policy to an attested launch.
func (p *Policy) allows(b *psp.ReportBody, now time.Time) *refusal {
	switch {
	case !p.notBefore.IsZero() && now.Before(p.notBefore):
		return refuse("policy_window", "policy window not yet open (not_before %s)", p.NotBefore)
	case !p.notAfter.IsZero() && !now.Before(p.notAfter):
		return refuse("policy_window", "policy window expired (not_after %s)", p.NotAfter)
	case len(p.Chips) > 0 && !slices.Contains(p.Chips, b.ChipID):
		return refuse("chip", "chip %s is not in the policy", b.ChipID)
	case len(p.Measurements) > 0 && !slices.Contains(p.Measurements, b.FirmwareMeasurement):
		return refuse("measurement", "firmware measurement %s is not allowed", b.FirmwareMeasurement)
	case b.FirmwareVerdict != "match" || b.SignatureVerdict != "valid":
		return refuse("measurement", "the PSP did not admit the launch (firmware %s, signature %s)", b.FirmwareVerdict, b.SignatureVerdict)
	case len(p.VMs) > 0 && !slices.Contains(p.VMs, b.VM):
		return refuse("vm", "VM %q is not in the policy", b.VM)
	case len(p.Images) > 0 && !slices.ContainsFunc(p.Images, func(u string) bool { return strings.EqualFold(u, b.ImageUUID) }):
		return refuse("image", "image %s is not in the policy", b.ImageUUID)
	}
	return nil
}

// rateOK is a sliding window of releases per key id, per replica.
func (s *Server) rateOK(keyID string, p *Policy, now time.Time) bool {
	if p.rateN == 0 {
		return true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	ts := slices.DeleteFunc(s.rates[keyID], func(t time.Time) bool { return now.Sub(t) >= p.rateEvery })
	if len(ts) >= p.rateN {
		s.rates[keyID] = ts
		return false
	}
	s.rates[keyID] = append(ts, now)
	return true
}
