package nbd

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// testPKI is a throwaway CA issuing a server certificate and client certificates whose
// CommonName is the client identity.
type testPKI struct {
	ca    *x509.Certificate
	key   *ecdsa.PrivateKey
	caPEM []byte
	pool  *x509.CertPool
}

func newPKI(t testing.TB) *testPKI {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "sealdisk test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(der)
	p := &testPKI{ca: ca, key: key, caPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pool: x509.NewCertPool()}
	p.pool.AddCert(ca)
	return p
}

var serial int64 = 10

func (p *testPKI) issue(t testing.TB, cn string, server bool) (certPEM, keyPEM []byte, cert tls.Certificate) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial++
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.DNSNames = []string{"localhost"}
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, &key.PublicKey, p.key)
	if err != nil {
		t.Fatal(err)
	}
	k8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: k8})
	cert, err = tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return certPEM, keyPEM, cert
}

func (p *testPKI) serverConfig(t testing.TB) *tls.Config {
	_, _, cert := p.issue(t, "localhost", true)
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    p.pool,
	}
}

// clientDir lays out certificates as libnbd's set_tls_certificates expects; cn "" gives a
// directory with only the CA (no client certificate).
func (p *testPKI) clientDir(t testing.TB, cn string) string {
	t.Helper()
	dir := filepath.Join(shortDir(t), "pki")
	os.Mkdir(dir, 0o700)
	os.WriteFile(filepath.Join(dir, "ca-cert.pem"), p.caPEM, 0o600)
	if cn != "" {
		c, k, _ := p.issue(t, cn, false)
		os.WriteFile(filepath.Join(dir, "client-cert.pem"), c, 0o600)
		os.WriteFile(filepath.Join(dir, "client-key.pem"), k, 0o600)
	}
	return dir
}

const tlsScript = `
import os
sock, certs, export = os.environ["NBD_SOCK"], os.environ["NBD_CERTS"], os.environ["NBD_EXPORT"]
h = nbd.NBD()
if certs:
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(certs)
else:
    h.set_tls(nbd.TLS_DISABLE)
if export == "*":
    h.set_opt_mode(True)
    h.connect_unix(sock)
    names = []
    h.opt_list(lambda name, desc: names.append(name))
    print("list=" + ",".join(sorted(names)))
    h.opt_abort()
else:
    h.set_export_name(export)
    try:
        h.connect_unix(sock)
    except nbd.Error as e:
        print("refused:", e)
    else:
        assert h.get_tls_negotiated()
        h.pwrite(b"tls!", 0)
        assert h.pread(4, 0) == b"tls!"
        h.shutdown()
        print("served")
`

func TestClientTLS(t *testing.T) {
	env := nbdshEnv(t)
	pki := newPKI(t)
	ts := startServer(t, Options{TLS: pki.serverConfig(t), RequireTLS: true},
		Export{Name: "secret", Device: newTestDevice(1<<20, nil), AllowedIdentity: "vm1"},
		Export{Name: "public", Device: newTestDevice(1<<20, nil)},
	)
	vm1, vm2, nocert := pki.clientDir(t, "vm1"), pki.clientDir(t, "vm2"), pki.clientDir(t, "")
	for _, tc := range []struct {
		name, certs, export, want string
	}{
		{"right identity", vm1, "secret", "served"},
		{"right identity lists its export", vm1, "*", "list=public,secret"},
		{"other identity refused", vm2, "secret", "refused"},
		{"other identity does not see it", vm2, "*", "list=public"},
		{"other identity, public export", vm2, "public", "served"},
		{"no client certificate", nocert, "public", "refused"},
		{"no TLS", "", "public", "refused"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := append(env[:len(env):len(env)], "NBD_SOCK="+ts.sock, "NBD_CERTS="+tc.certs, "NBD_EXPORT="+tc.export)
			out := run(t, e, "nbdsh", "-c", tlsScript)
			t.Log(strings.TrimSpace(out))
			if !strings.HasPrefix(strings.TrimSpace(out), tc.want) {
				t.Fatalf("got %q, want %q", out, tc.want)
			}
		})
	}
}

// startTLS sends NBD_OPT_STARTTLS and upgrades the test client.
func (c *tclient) startTLS(cfg *tls.Config) {
	c.t.Helper()
	c.expectOpt(optStartTLS, nil, repAck)
	tc := tls.Client(c.c, cfg)
	if err := tc.Handshake(); err != nil {
		c.t.Fatalf("TLS handshake: %v", err)
	}
	c.c, c.br = tc, bufio.NewReader(tc)
}

// TestSelectiveTLS: TLS offered but not required. Exports with an identity need TLS and
// that identity; plain clients cannot enumerate names; negotiation state does not survive
// STARTTLS.
func TestSelectiveTLS(t *testing.T) {
	pki := newPKI(t)
	ts := startServer(t, Options{TLS: pki.serverConfig(t)},
		Export{Name: "secret", Device: newTestDevice(1<<20, nil), AllowedIdentity: "vm1"},
		Export{Name: "public", Device: newTestDevice(1<<20, nil)},
	)
	clientCfg := func(cn string) *tls.Config {
		_, _, cert := pki.issue(t, cn, false)
		return &tls.Config{RootCAs: pki.pool, ServerName: "localhost", Certificates: []tls.Certificate{cert}}
	}
	listNames := func(c *tclient) string {
		var names []string
		for _, r := range c.expectOpt(optList, nil, repAck) {
			names = append(names, string(r.data[4:]))
		}
		return strings.Join(names, ",")
	}

	c := dialT(t, ts.sock)
	c.greet(flagCFixedNewstyle)
	if got := listNames(c); got != "public" {
		t.Fatalf("plain LIST = %q", got)
	}
	c.expectOpt(optInfo, infoPayload("secret"), repErrTLSReqd)
	c.expectOpt(optInfo, infoPayload("nope"), repErrTLSReqd) // no enumeration without TLS
	c.expectOpt(optInfo, infoPayload("public"), repAck)
	c.expectOpt(optStructuredReply, nil, repAck)
	c.startTLS(clientCfg("vm1"))
	// Structured replies were negotiated before STARTTLS: forgotten.
	c.expectOpt(optSetMetaContext, metaPayload("secret", metaBaseAllocation), repErrInvalid)
	c.expectOpt(optStartTLS, nil, repErrInvalid)
	if got := listNames(c); got != "public,secret" {
		t.Fatalf("vm1 LIST = %q", got)
	}
	c.expectOpt(optInfo, infoPayload("nope"), repErrUnknown)
	c.expectOpt(optGo, infoPayload("secret"), repAck)
	if r := c.do(cmdRead, 0, 0, 16, nil); r.errno != 0 {
		t.Fatalf("read over TLS: %v", r.errno)
	}

	c = dialT(t, ts.sock)
	c.greet(flagCFixedNewstyle)
	c.startTLS(clientCfg("vm2"))
	c.expectOpt(optInfo, infoPayload("secret"), repErrUnknown)
	c.expectOpt(optGo, infoPayload("secret"), repErrUnknown)
	c.expectOpt(optGo, infoPayload("public"), repAck)

	// Plain export over plain NBD still works in this mode.
	c = openT(t, ts.sock, "public", false, false)
	if r := c.do(cmdRead, 0, 0, 16, nil); r.errno != 0 {
		t.Fatalf("plain read: %v", r.errno)
	}

	// Bytes pipelined behind STARTTLS (before the handshake) are an injection attempt.
	c = dialT(t, ts.sock)
	c.greet(flagCFixedNewstyle)
	b := append(optBytes(optStartTLS, nil), optBytes(optList, nil)...)
	c.write(b)
	c.optReply()
	c.expectClosed()
}

func optBytes(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, magicOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func TestForcedTLSRefusesOptions(t *testing.T) {
	pki := newPKI(t)
	ts := startServer(t, Options{TLS: pki.serverConfig(t), RequireTLS: true},
		Export{Name: "public", Device: newTestDevice(1<<20, nil)})
	c := dialT(t, ts.sock)
	c.greet(flagCFixedNewstyle)
	for _, opt := range []uint32{optList, optInfo, optGo, optStructuredReply, optListMetaContext, 99} {
		c.expectOpt(opt, infoPayload("public"), repErrTLSReqd)
	}
	c.sendOpt(optExportName, []byte("public"))
	c.expectClosed()

	c = dialT(t, ts.sock) // without fixed newstyle TLS is impossible: closed
	c.greet(0)
	c.expectClosed()
}

func TestIdentityFromCert(t *testing.T) {
	pki := newPKI(t)
	ts := startServer(t, Options{
		TLS: pki.serverConfig(t), RequireTLS: true,
		IdentityFromCert: func(c *x509.Certificate) string { return "custom-" + c.Subject.CommonName },
	}, Export{Name: "secret", Device: newTestDevice(1<<20, nil), AllowedIdentity: "custom-vm1"})
	_, _, cert := pki.issue(t, "vm1", false)
	c := dialT(t, ts.sock)
	c.greet(flagCFixedNewstyle)
	c.startTLS(&tls.Config{RootCAs: pki.pool, ServerName: "localhost", Certificates: []tls.Certificate{cert}})
	c.expectOpt(optGo, infoPayload("secret"), repAck)
}

// TestShutdownOverTLSWhileThrottled: a TLS connection whose reader is held by the
// in-flight bound still answers what it admitted, then closes, on Shutdown.
func TestShutdownOverTLSWhileThrottled(t *testing.T) {
	pki := newPKI(t)
	dev := newTestDevice(1<<20, nil)
	ts := startServer(t, Options{TLS: pki.serverConfig(t), RequireTLS: true, MaxInFlight: 1},
		Export{Name: "d", Device: dev})
	_, _, cert := pki.issue(t, "vm1", false)
	c := dialT(t, ts.sock)
	c.greet(flagCFixedNewstyle)
	c.startTLS(&tls.Config{RootCAs: pki.pool, ServerName: "localhost", Certificates: []tls.Certificate{cert}})
	c.expectOpt(optGo, infoPayload("d"), repAck)
	c.do(cmdWrite, 0, 0, 5, []byte("hello"))

	release := dev.gate(0)
	c.send(cmdRead, 0, 1, 0, 5, nil)
	<-dev.enterc
	c.send(cmdWrite, 0, 2, 4096, 5, []byte("world")) // held: the bound is one request
	done := make(chan error, 1)
	go func() { done <- ts.Shutdown(context.Background()) }()
	release()
	if r := c.recv(); r.handle != 1 || string(r.data) != "hello" {
		t.Fatalf("admitted read: %+v", r)
	}
	c.expectClosed()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
