package nbd

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/sealdisk/sealdisk/engine"
)

var (
	// ErrServerClosed is returned by Serve after Shutdown.
	ErrServerClosed = errors.New("nbd: server closed")
	// ErrExportExists: AddExport with a name already served.
	ErrExportExists = errors.New("nbd: export already exists")
	// ErrUnknownExport: RemoveExport of a name not served.
	ErrUnknownExport = errors.New("nbd: unknown export")
	// ErrInsecureTCP: plain TCP without TLS and without an explicit insecure opt-in.
	ErrInsecureTCP = errors.New("nbd: TCP without TLS refused (use TLS or mark the listener insecure)")
)

// Defaults for Options left zero.
const (
	DefaultMaxInFlight      = 64
	DefaultMaxInFlightBytes = 64 << 20
	DefaultHandshakeTimeout = 30 * time.Second
	// maxAdvertisedBlock caps the maximum block size advertised whatever the device says:
	// it is the largest buffer one request can make the server allocate.
	maxAdvertisedBlock = 64 << 20
)

// Export is one named block device the server offers.
type Export struct {
	Name        string
	Description string
	Device      engine.BlockDevice
	// AllowedIdentity: "" lets any client open the export; otherwise only a TLS client whose
	// certificate identity (Options.IdentityFromCert) equals it can list, query or open it.
	AllowedIdentity string
}

// Metrics receives the server's counters; the caller adapts them to Prometheus or anything
// else. Methods are called concurrently from request goroutines and must not block.
type Metrics interface {
	// Connections reports a change in the number of connections in transmission on export.
	Connections(export string, delta int)
	// Request reports one finished request: op is the command ("read", "write", "flush",
	// "trim", "cache", "write_zeroes", "block_status"), bytes its length, errno 0 on success.
	Request(export, op string, bytes int64, d time.Duration, errno Errno)
}

// Options configure a Server. The zero value serves plain NBD with the defaults above.
type Options struct {
	// TLS enables NBD_OPT_STARTTLS. For client-certificate identities set ClientAuth to
	// tls.RequireAndVerifyClientCert (or VerifyClientCertIfGiven) and ClientCAs; an identity
	// is only taken from a verified chain.
	TLS *tls.Config
	// RequireTLS refuses every option but STARTTLS and ABORT until TLS is up (FORCEDTLS).
	// Without it, TLS is optional except on exports with an AllowedIdentity (SELECTIVETLS).
	RequireTLS bool
	// IdentityFromCert maps the verified client leaf certificate to an identity;
	// default: Subject CommonName.
	IdentityFromCert func(*x509.Certificate) string
	// DefaultExport is the export a client gets when it asks for the empty name; when unset
	// the empty name means an export literally named "".
	DefaultExport string
	// MaxInFlight bounds the requests one connection has in progress; MaxInFlightBytes bounds
	// their buffers (raised to the export's maximum block size if lower). When either is
	// reached the server stops reading from that connection until a request completes.
	MaxInFlight      int
	MaxInFlightBytes int64
	// HandshakeTimeout bounds the whole option negotiation of one connection.
	HandshakeTimeout time.Duration
	Logger           *slog.Logger
	Metrics          Metrics
}

// export is an Export with the limits derived from its Caps once, at AddExport.
type export struct {
	Export
	caps                          engine.Caps
	minBlock, prefBlock, maxBlock uint32
}

// Server serves exports over NBD (fixed newstyle). Safe for concurrent use.
type Server struct {
	opts     Options
	log      *slog.Logger
	metrics  Metrics
	identity func(*x509.Certificate) string

	// forceCtx is the base of every device call; cancelled when a Shutdown deadline passes.
	forceCtx    context.Context
	forceCancel context.CancelFunc

	rescue *rescuer // watches readers running a request inline

	mu           sync.Mutex // guards the fields below
	exports      map[string]*export
	listeners    map[net.Listener]struct{}
	conns        map[*conn]struct{}
	shuttingDown bool
	connWG       sync.WaitGroup // one per conn in s.conns
}

// NewServer returns a server with no exports.
func NewServer(opts Options) *Server {
	if opts.MaxInFlight <= 0 {
		opts.MaxInFlight = DefaultMaxInFlight
	}
	if opts.MaxInFlightBytes <= 0 {
		opts.MaxInFlightBytes = DefaultMaxInFlightBytes
	}
	if opts.HandshakeTimeout <= 0 {
		opts.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if opts.TLS != nil {
		opts.TLS = opts.TLS.Clone()
		if opts.TLS.MinVersion < tls.VersionTLS12 {
			opts.TLS.MinVersion = tls.VersionTLS12 // the spec's floor
		}
	}
	s := &Server{
		opts:      opts,
		log:       opts.Logger,
		metrics:   opts.Metrics,
		identity:  opts.IdentityFromCert,
		exports:   make(map[string]*export),
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[*conn]struct{}),
		rescue:    newRescuer(),
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	if s.metrics == nil {
		s.metrics = nopMetrics{}
	}
	if s.identity == nil {
		s.identity = func(c *x509.Certificate) string { return c.Subject.CommonName }
	}
	s.forceCtx, s.forceCancel = context.WithCancel(context.Background())
	return s
}

type nopMetrics struct{}

func (nopMetrics) Connections(string, int)                             {}
func (nopMetrics) Request(string, string, int64, time.Duration, Errno) {}

func validString(what, s string) error {
	if len(s) > maxString {
		return fmt.Errorf("%s is %d bytes, above the %d-byte limit", what, len(s), maxString)
	}
	if !utf8.ValidString(s) {
		return fmt.Errorf("%s is not valid UTF-8", what)
	}
	for i := 0; i < len(s); i++ {
		if s[i] == 0 {
			return fmt.Errorf("%s contains NUL", what)
		}
	}
	return nil
}

func isPow2(v uint32) bool { return v != 0 && v&(v-1) == 0 }

// AddExport starts serving e. Its device's Caps are read once, here.
func (s *Server) AddExport(e Export) error {
	if e.Device == nil {
		return fmt.Errorf("failed to add export %q: no device", e.Name)
	}
	for what, v := range map[string]string{"name": e.Name, "description": e.Description, "allowed identity": e.AllowedIdentity} {
		if err := validString(what, v); err != nil {
			return fmt.Errorf("failed to add export %q: %w", e.Name, err)
		}
	}
	if e.AllowedIdentity != "" && s.opts.TLS == nil {
		return fmt.Errorf("failed to add export %q: an allowed identity needs TLS configured", e.Name)
	}
	x := &export{Export: e, caps: e.Device.Caps()}
	if err := x.deriveLimits(); err != nil {
		return fmt.Errorf("failed to add export %q: %w", e.Name, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.exports[e.Name]; ok {
		return fmt.Errorf("failed to add export %q: %w", e.Name, ErrExportExists)
	}
	s.exports[e.Name] = x
	return nil
}

// deriveLimits turns Caps into the block-size constraints the spec allows: minimum a power
// of two up to 64 KiB, preferred a power of two >= max(minimum, 512), maximum a multiple of
// the minimum.
func (x *export) deriveLimits() error {
	c := x.caps
	x.minBlock = max(c.MinBlock, 1)
	if !isPow2(x.minBlock) || x.minBlock > 64<<10 {
		return fmt.Errorf("minimum block size %d is not a power of two up to 64 KiB", c.MinBlock)
	}
	x.prefBlock = c.PreferredBlock
	if x.prefBlock == 0 {
		x.prefBlock = max(4096, x.minBlock)
	}
	if !isPow2(x.prefBlock) || x.prefBlock < max(x.minBlock, 512) {
		return fmt.Errorf("preferred block size %d is not a power of two >= max(minimum, 512)", c.PreferredBlock)
	}
	x.maxBlock = c.MaxBlock
	if x.maxBlock == 0 || x.maxBlock > maxAdvertisedBlock {
		x.maxBlock = maxAdvertisedBlock
	}
	x.maxBlock -= x.maxBlock % x.minBlock
	if x.maxBlock < x.prefBlock {
		return fmt.Errorf("maximum block size %d is below the preferred %d", c.MaxBlock, x.prefBlock)
	}
	return nil
}

// RemoveExport stops offering name. Connections using it stop reading requests, finish the
// ones in flight and close; the device is flushed. When RemoveExport returns nothing calls
// the device any more, unless ctx expired first (then in-flight calls are cancelled).
func (s *Server) RemoveExport(ctx context.Context, name string) error {
	s.mu.Lock()
	x, ok := s.exports[name]
	if !ok {
		s.mu.Unlock()
		return fmt.Errorf("failed to remove export %q: %w", name, ErrUnknownExport)
	}
	delete(s.exports, name)
	var users []*conn
	for c := range s.conns {
		if c.export() == x {
			users = append(users, c)
		}
	}
	s.mu.Unlock()
	if err := drainConns(ctx, users); err != nil {
		return fmt.Errorf("failed to remove export %q: %w", name, err)
	}
	if err := x.Device.Flush(ctx); err != nil {
		return fmt.Errorf("failed to flush export %q: %w", name, err)
	}
	return nil
}

// drainConns asks conns to stop and waits for them; on ctx expiry it closes them hard.
func drainConns(ctx context.Context, conns []*conn) error {
	for _, c := range conns {
		c.drain()
	}
	for _, c := range conns {
		select {
		case <-c.done:
		case <-ctx.Done():
			for _, c := range conns {
				c.kill()
			}
			for _, c := range conns {
				<-c.done
			}
			return ctx.Err()
		}
	}
	return nil
}

// lookupLocked resolves a client's export name; s.mu must be held.
func (s *Server) lookupLocked(name string) *export {
	if name == "" && s.opts.DefaultExport != "" {
		name = s.opts.DefaultExport
	}
	return s.exports[name]
}

// Serve accepts connections on ln until Shutdown (returns ErrServerClosed), ctx is done
// (closes ln, hard-closes the connections it accepted, returns ctx.Err()) or ln fails.
// A TCP listener is refused unless RequireTLS is set or it came from ListenTCP marked
// insecure.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	s.mu.Lock()
	if s.shuttingDown {
		s.mu.Unlock()
		return ErrServerClosed
	}
	if s.opts.RequireTLS && s.opts.TLS == nil {
		s.mu.Unlock()
		return errors.New("nbd: RequireTLS set without a TLS config")
	}
	if _, insecure := ln.(insecureListener); !insecure && !s.opts.RequireTLS && isTCP(ln.Addr()) {
		s.mu.Unlock()
		return ErrInsecureTCP
	}
	s.listeners[ln] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
	}()

	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()

	var tempDelay time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			s.mu.Lock()
			down := s.shuttingDown
			s.mu.Unlock()
			switch {
			case down:
				return ErrServerClosed
			case ctx.Err() != nil:
				return ctx.Err()
			}
			if transientAcceptError(err) {
				// Out of descriptors or an aborted handshake: back off and keep serving.
				tempDelay = min(max(2*tempDelay, 5*time.Millisecond), time.Second)
				s.log.Warn("nbd accept failed; retrying", "err", err, "delay", tempDelay)
				time.Sleep(tempDelay)
				continue
			}
			return fmt.Errorf("failed to accept NBD connection: %w", err)
		}
		tempDelay = 0
		s.startConn(ctx, nc)
	}
}

// startConn registers and runs one connection; refused while shutting down.
func (s *Server) startConn(ctx context.Context, nc net.Conn) *conn {
	c := newConn(s, nc)
	s.mu.Lock()
	if s.shuttingDown {
		s.mu.Unlock()
		nc.Close()
		close(c.done)
		return c
	}
	s.conns[c] = struct{}{}
	s.connWG.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.connWG.Done()
		c.serve(ctx)
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
	}()
	return c
}

// Shutdown stops accepting, lets every connection finish the requests it has in flight
// (no new ones are read), closes the connections and flushes every export's device. If ctx
// expires first, in-flight device calls are cancelled, connections are closed hard and
// ctx.Err() is returned.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.shuttingDown = true
	for ln := range s.listeners {
		ln.Close()
	}
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	devices := make(map[engine.BlockDevice]string)
	for _, x := range s.exports {
		devices[x.Device] = x.Name
	}
	s.mu.Unlock()

	if err := drainConns(ctx, conns); err != nil {
		s.forceCancel()
		return fmt.Errorf("failed to shut down NBD server: %w", err)
	}
	s.connWG.Wait() // conns registered concurrently with the snapshot were refused or drained
	var errs []error
	for dev, name := range devices {
		if err := dev.Flush(ctx); err != nil {
			errs = append(errs, fmt.Errorf("failed to flush export %q: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

func transientAcceptError(err error) bool {
	for _, e := range []error{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

func isTCP(a net.Addr) bool {
	switch a.Network() {
	case "tcp", "tcp4", "tcp6":
		return true
	}
	return false
}
