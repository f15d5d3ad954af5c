package broker

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/sealdisk/sealdisk/psp"
)

// ClientOptions configure the PSP's broker client.
type ClientOptions struct {
	CAFile             string // roots for the broker's TLS certificate; empty: the system's
	CertFile, KeyFile  string // client certificate (key mode 0600); optional
	Attempts           int    // tries per fetch while the broker is unreachable or failing; 0 = 4
	Backoff            time.Duration
	PerAttemptDeadline time.Duration // 0 = 5 s
}

// Client fetches keys for a PSP (psp.KeyFetcher). Unreachable brokers and 5xx answers are
// retried with exponential backoff, each attempt with a fresh challenge; a refusal (4xx) is
// final.
type Client struct {
	http     *http.Client
	attempts int
	backoff  time.Duration
	per      time.Duration
}

var _ psp.KeyFetcher = (*Client)(nil)

// ErrRefused: the broker refused the release (its log says why).
var ErrRefused = errors.New("broker refused to release the key")

// NewClient builds a client: TLS 1.3 only.
func NewClient(o ClientOptions) (*Client, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS13}
	if o.CAFile != "" {
		b, err := os.ReadFile(o.CAFile)
		if err != nil {
			return nil, fmt.Errorf("failed to read the broker CA: %w", err)
		}
		tc.RootCAs = x509.NewCertPool()
		if !tc.RootCAs.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("broker CA %s holds no PEM certificate", o.CAFile)
		}
	}
	if o.CertFile != "" || o.KeyFile != "" {
		if _, err := psp.ReadPrivateFile(o.KeyFile); err != nil {
			return nil, fmt.Errorf("broker client key: %w", err)
		}
		cert, err := tls.LoadX509KeyPair(o.CertFile, o.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("failed to load the broker client certificate: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	c := &Client{
		http:     &http.Client{Transport: &http.Transport{TLSClientConfig: tc, ForceAttemptHTTP2: true, MaxIdleConnsPerHost: 4}},
		attempts: o.Attempts, backoff: o.Backoff, per: o.PerAttemptDeadline,
	}
	if c.attempts <= 0 {
		c.attempts = 4
	}
	if c.backoff <= 0 {
		c.backoff = 250 * time.Millisecond
	}
	if c.per <= 0 {
		c.per = 5 * time.Second
	}
	return c, nil
}

// FetchKey runs challenge → release against req.BrokerURL.
func (c *Client) FetchKey(ctx context.Context, req psp.KeyRequest) (*psp.Release, error) {
	base := strings.TrimRight(req.BrokerURL, "/")
	wait := c.backoff
	var last error
	for i := 1; i <= c.attempts; i++ {
		rel, err, retry := c.once(ctx, base, req)
		if err == nil {
			return rel, nil
		}
		last = err
		if !retry {
			return nil, fmt.Errorf("broker %s: %w", base, err)
		}
		if i == c.attempts {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("broker %s unreachable (gave up after %d attempts): %w", base, i, last)
		case <-time.After(wait):
		}
		wait *= 2
	}
	return nil, fmt.Errorf("broker %s unreachable after %d attempts: %w", base, c.attempts, last)
}

// once is one challenge and release; retry says whether another attempt may succeed.
func (c *Client) once(ctx context.Context, base string, req psp.KeyRequest) (*psp.Release, error, bool) {
	ctx, cancel := context.WithTimeout(ctx, c.per)
	defer cancel()
	var ch ChallengeResponse
	if err, retry := c.post(ctx, base+"/v1/challenge", ChallengeRequest{KeyID: req.KeyID}, &ch, req.KeyID); err != nil {
		return nil, err, retry
	}
	report, err := req.Attest(ch.Nonce)
	if err != nil {
		return nil, err, false
	}
	var rr ReleaseResponse
	if err, retry := c.post(ctx, base+"/v1/release", ReleaseRequest{KeyID: req.KeyID, Nonce: ch.Nonce, Report: report, Certificate: req.Cert}, &rr, req.KeyID); err != nil {
		return nil, err, retry
	}
	return &psp.Release{Grant: rr.Grant, SealedKey: rr.SealedKey}, nil, false
}

func (c *Client) post(ctx context.Context, url string, in, out any, keyID string) (error, bool) {
	b, err := json.Marshal(in)
	if err != nil {
		return err, false
	}
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(b))
	if err != nil {
		return fmt.Errorf("bad broker URL: %w", err), false
	}
	hr.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(hr)
	if err != nil {
		return err, true
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxRequest))
	if err != nil {
		return fmt.Errorf("failed to read the broker's answer: %w", err), true
	}
	if resp.StatusCode != http.StatusOK {
		var er ErrorResponse
		json.Unmarshal(body, &er)
		if resp.StatusCode >= 500 {
			return fmt.Errorf("broker answered %s (ref %s)", resp.Status, er.Ref), true
		}
		return fmt.Errorf("%w %q: %s (ref %s; the broker's log says why)", ErrRefused, keyID, er.Error, er.Ref), false
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fmt.Errorf("malformed answer from the broker: %w", err), false
	}
	return nil, false
}
