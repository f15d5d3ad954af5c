package broker

import (
	"bytes"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/sealdisk/sealdisk/psp"
)

// Config is broker.yaml (docs/BROKER.md "Configuration"). Unknown keys are refused.
type Config struct {
	// Listen is tcp:HOST:PORT or unix:PATH. HTTPS (TLS 1.3) either way.
	Listen  string `yaml:"listen"`
	TLSCert string `yaml:"tls_cert"`
	TLSKey  string `yaml:"tls_key"` // mode 0600
	// ClientCA verifies client certificates when a client presents one; with
	// RequireClientCert a release without one is refused (and audited).
	ClientCA          string `yaml:"client_ca"`
	RequireClientCert bool   `yaml:"require_client_cert"`
	// Identity holds the broker's own secrets (broker.key, nonce.key), shared by replicas.
	Identity string `yaml:"identity"`
	// Store holds keys/, replay/ and (by default) audit.log, shared by replicas.
	Store    string `yaml:"store"`
	AuditLog string `yaml:"audit_log"`
	// NonceWindow is how long a challenge nonce may be answered, and how far a report's time
	// may be from the broker's clock. Default 60s.
	NonceWindow string `yaml:"nonce_window"`
	// Keys is the release policy per key id. A key id without a policy is never released.
	Keys map[string]*Policy `yaml:"keys"`

	path        string // of the file, for relative paths and errors
	nonceWindow time.Duration
}

// Policy says to whom one key id is released.
type Policy struct {
	VendorRoots  []string `yaml:"vendor_roots"` // PEM root certificates; at least one
	Chips        []string `yaml:"chips"`        // hex chip ids; empty: any chip of those roots
	Providers    []string `yaml:"providers"`    // provider public keys (PEM); at least one
	Measurements []string `yaml:"measurements"` // hex firmware measurements; empty: any the certificate allows
	VMs          []string `yaml:"vms"`          // VM names; empty: any
	Images       []string `yaml:"images"`       // image UUIDs; empty: any
	NotBefore    string   `yaml:"not_before"`   // RFC 3339; empty: no start
	NotAfter     string   `yaml:"not_after"`    // RFC 3339; empty: no end
	Lease        string   `yaml:"lease"`        // default 10m
	RateLimit    string   `yaml:"rate_limit"`   // N/DURATION releases per replica, e.g. 60/1m; empty: none

	roots     *x509.CertPool
	providers psp.TrustStore
	notBefore time.Time
	notAfter  time.Time
	lease     time.Duration
	rateN     int
	rateEvery time.Duration
}

// LoadConfig reads and validates broker.yaml; every error names the key.
func LoadConfig(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("failed to read broker config: %w", err)
	}
	c := &Config{}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(c); err != nil {
		return nil, fmt.Errorf("failed to parse broker config %s: %w", path, err)
	}
	c.path = path
	if err := c.validate(); err != nil {
		return nil, fmt.Errorf("broker config %s: %w", path, err)
	}
	return c, nil
}

func (c *Config) rel(p string) string {
	if p == "" || filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(filepath.Dir(c.path), p)
}

func (c *Config) validate() error {
	var errs []error
	bad := func(key, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{key}, a...)...))
	}
	c.Identity, c.Store, c.AuditLog = c.rel(c.Identity), c.rel(c.Store), c.rel(c.AuditLog)
	c.TLSCert, c.TLSKey, c.ClientCA = c.rel(c.TLSCert), c.rel(c.TLSKey), c.rel(c.ClientCA)
	if c.Identity == "" {
		bad("identity", "required (the directory `sealdisk broker init` made)")
	}
	if c.Store == "" {
		bad("store", "required")
	}
	if c.AuditLog == "" && c.Store != "" {
		c.AuditLog = filepath.Join(c.Store, "audit.log")
	}
	c.nonceWindow = time.Minute
	if c.NonceWindow != "" {
		d, err := time.ParseDuration(c.NonceWindow)
		if err != nil || d <= 0 || d > time.Hour {
			bad("nonce_window", "%q: want a duration in (0, 1h]", c.NonceWindow)
		}
		c.nonceWindow = d
	}
	if c.RequireClientCert && c.ClientCA == "" {
		bad("require_client_cert", "needs client_ca")
	}
	for id, p := range c.Keys {
		if p == nil {
			bad("keys."+id, "empty policy")
			continue
		}
		if err := c.checkPolicy("keys."+id+".", p); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// CheckServe is what serve needs beyond what the key commands need.
func (c *Config) CheckServe() error {
	var errs []error
	kind, addr, _ := strings.Cut(c.Listen, ":")
	if (kind != "tcp" && kind != "unix") || addr == "" {
		errs = append(errs, fmt.Errorf("listen: %q: want tcp:HOST:PORT or unix:PATH", c.Listen))
	}
	if c.TLSCert == "" || c.TLSKey == "" {
		errs = append(errs, errors.New("tls_cert, tls_key: required (the broker serves HTTPS only)"))
	}
	return errors.Join(errs...)
}

func (c *Config) checkPolicy(prefix string, p *Policy) error {
	var errs []error
	bad := func(key, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s%s: "+format, append([]any{prefix, key}, a...)...))
	}
	if len(p.VendorRoots) == 0 {
		bad("vendor_roots", "at least one vendor root certificate is required")
	}
	p.roots = x509.NewCertPool()
	for _, f := range p.VendorRoots {
		cert, err := psp.ReadCertificate(c.rel(f))
		if err != nil {
			bad("vendor_roots", "%v", err)
			continue
		}
		p.roots.AddCert(cert)
	}
	if len(p.Providers) == 0 {
		bad("providers", "at least one provider public key is required")
	}
	p.providers = psp.TrustStore{}
	for _, f := range p.Providers {
		ts, err := psp.LoadTrustStore(c.rel(f))
		if err != nil {
			bad("providers", "%v", err)
			continue
		}
		for k, v := range ts {
			p.providers[k] = v
		}
	}
	// Reports carry lower-case hex; compare like with like.
	for i, h := range p.Chips {
		if b, err := hex.DecodeString(h); err != nil || len(b) != 32 {
			bad("chips", "%q is not a 64-digit hex chip id", h)
		}
		p.Chips[i] = strings.ToLower(h)
	}
	for i, h := range p.Measurements {
		if b, err := hex.DecodeString(h); err != nil || (len(b) != 48 && len(b) != 32) {
			bad("measurements", "%q is not a hex SHA-384 or SM3 digest", h)
		}
		p.Measurements[i] = strings.ToLower(h)
	}
	for i, u := range p.Images {
		uu, err := parseUUID(u)
		if err != nil {
			bad("images", "[%d] %q: %v", i, u, err)
		}
		p.Images[i] = formatUUID(uu)
	}
	var err error
	if p.NotBefore != "" {
		if p.notBefore, err = time.Parse(time.RFC3339, p.NotBefore); err != nil {
			bad("not_before", "%v", err)
		}
	}
	if p.NotAfter != "" {
		if p.notAfter, err = time.Parse(time.RFC3339, p.NotAfter); err != nil {
			bad("not_after", "%v", err)
		}
	}
	p.lease = 10 * time.Minute
	if p.Lease != "" {
		if p.lease, err = time.ParseDuration(p.Lease); err != nil || p.lease < time.Second || p.lease > 24*time.Hour {
			bad("lease", "%q: want a duration in [1s, 24h]", p.Lease)
		}
	}
	if p.RateLimit != "" {
		n, per, ok := strings.Cut(p.RateLimit, "/")
		p.rateN, err = strconv.Atoi(n)
		d, derr := time.ParseDuration(per)
		if !ok || err != nil || derr != nil || p.rateN < 1 || d <= 0 {
			bad("rate_limit", "%q: want N/DURATION, e.g. 60/1m", p.RateLimit)
		}
		p.rateEvery = d
	}
	return errors.Join(errs...)
}

func parseUUID(s string) ([16]byte, error) {
	var u [16]byte
	b, err := hex.DecodeString(strings.ReplaceAll(s, "-", ""))
	if err != nil || len(b) != 16 {
		return u, fmt.Errorf("not a UUID")
	}
	copy(u[:], b)
	return u, nil
}
