package tests

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// pki is a throwaway X.509 CA for NBD TLS: a server certificate and client certificates
// whose CommonName is the identity a VM's export is bound to.
type pki struct {
	dir   string
	name  string
	ca    *x509.Certificate
	key   *ecdsa.PrivateKey
	caPEM []byte
	n     int64
}

func newPKI(t *testing.T, dir, name string) *pki {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(der)
	p := &pki{dir: dir, name: name, ca: ca, key: key, caPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), n: 1}
	writeFile(t, filepath.Join(dir, name+"-ca.pem"), p.caPEM, 0o644)
	return p
}

// issue writes certPath and keyPath (mode 0600) for cn: a server certificate for
// localhost/127.0.0.1, or a client one.
func (p *pki) issue(t *testing.T, cn string, server bool, certPath, keyPath string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p.n++
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(p.n), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
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
	writeFile(t, certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	writeFile(t, keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: k8}), 0o600)
}

// clientDir is a certificate directory as libnbd (tls-certificates=DIR) and QEMU
// (tls-creds-x509,dir=DIR) read it: ca-cert.pem, and for cn != "" client-cert.pem and
// client-key.pem.
func (p *pki) clientDir(t *testing.T, serverCA []byte, cn string) string {
	t.Helper()
	dir := filepath.Join(p.dir, p.name+"-client-"+cn)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "ca-cert.pem"), serverCA, 0o644)
	if cn != "" {
		p.issue(t, cn, false, filepath.Join(dir, "client-cert.pem"), filepath.Join(dir, "client-key.pem"))
	}
	return dir
}

func writeFile(t *testing.T, path string, b []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, b, mode); err != nil {
		t.Fatal(err)
	}
}

// TestServeTLSIdentities: serve two VMs on TCP with TLS from a config file, each export bound
// to its VM's client identity. With qemu-img and nbdinfo: no TLS, TLS without a client
// certificate, a certificate from another CA, and VM2's certificate on VM1's export are all
// refused; each VM's own certificate reads its own disk, byte for byte.
func TestServeTLSIdentities(t *testing.T) {
	requireTool(t, "qemu-img")
	requireTool(t, "nbdinfo")
	e := newEnv(t)
	vms := []testVM{newTestVM(t, e, "vm1", 11, 8<<20), newTestVM(t, e, "vm2", 12, 8<<20)}

	ca := newPKI(t, e.dir, "nbd")
	srvCert, srvKey := filepath.Join(e.dir, "server.pem"), filepath.Join(e.dir, "server.key")
	ca.issue(t, "localhost", true, srvCert, srvKey)
	addr := freePort(t)
	_, port, _ := net.SplitHostPort(addr)
	cfg := filepath.Join(e.dir, "sealdisk.yaml")
	var b strings.Builder
	fmt.Fprintf(&b, "psp:\n  dir: %s\nnbd:\n  listen: [\"tcp:%s\"]\n  tls_cert: %s\n  tls_key: %s\n  tls_client_ca: %s\nengine:\n  cache_size: 16M\nvms:\n",
		e.psp, addr, srvCert, srvKey, filepath.Join(e.dir, "nbd-ca.pem"))
	for _, vm := range vms {
		fmt.Fprintf(&b, "  - name: %s\n    image: %s\n    firmware: %s\n    identity: %s-host\n", vm.name, vm.img, e.fw, vm.name)
	}
	writeFile(t, cfg, []byte(b.String()), 0o644)

	s := &server{log: &bytes.Buffer{}}
	s.cmd = exec.Command(sealdisk, "serve", "--config", cfg)
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.stop(t) })
	waitFor(t, s, "the TLS listener", func() bool {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err == nil
	})

	// The foreign client trusts both CAs, so QEMU (which checks its own certificate against
	// ca-cert.pem) gets as far as the server, which must refuse it.
	other := newPKI(t, e.dir, "other")
	dirs := map[string]string{
		"vm1":        ca.clientDir(t, ca.caPEM, "vm1-host"),
		"vm2":        ca.clientDir(t, ca.caPEM, "vm2-host"),
		"no cert":    ca.clientDir(t, ca.caPEM, ""),
		"foreign CA": other.clientDir(t, append(append([]byte(nil), ca.caPEM...), other.caPEM...), "vm1-host"),
	}
	nbdsURI := func(export, dir string) string {
		return fmt.Sprintf("nbds://localhost:%s/%s?tls-certificates=%s", port, export, dir)
	}
	qemuRead := func(export, dir, out string) (string, error) {
		o, err := exec.Command("qemu-img", "convert", "-O", "raw",
			"--object", "tls-creds-x509,id=tls0,dir="+dir+",endpoint=client",
			"--image-opts", fmt.Sprintf("driver=nbd,server.type=inet,server.host=localhost,server.port=%s,export=%s,tls-creds=tls0", port, export),
			out).CombinedOutput()
		return string(o), err
	}
	refused := func(what string, cmd string, args ...string) {
		t.Helper()
		out, err := exec.Command(cmd, args...).CombinedOutput()
		if err == nil {
			t.Errorf("%s: %s succeeded, want refusal:\n%s", what, cmd, out)
		}
		t.Logf("%s: %s refused: %s", what, cmd, strings.TrimSpace(string(out)))
	}

	// No TLS at all: the server requires it.
	refused("plaintext", "nbdinfo", fmt.Sprintf("nbd://localhost:%s/vm1", port))
	refused("plaintext", "qemu-img", "info", fmt.Sprintf("nbd://localhost:%s/vm1", port))
	// TLS, but no client certificate, or one from a CA the server does not trust.
	for _, who := range []string{"no cert", "foreign CA"} {
		refused(who, "nbdinfo", "--size", nbdsURI("vm1", dirs[who]))
		if out, err := qemuRead("vm1", dirs[who], filepath.Join(e.dir, "x.raw")); err == nil {
			t.Errorf("%s: qemu-img read vm1:\n%s", who, out)
		} else {
			t.Logf("%s: qemu-img refused: %s", who, strings.TrimSpace(out))
		}
	}
	// VM2's certificate does not open VM1's export, nor see it in the list.
	refused("vm2 on vm1", "nbdinfo", "--size", nbdsURI("vm1", dirs["vm2"]))
	if out, err := qemuRead("vm1", dirs["vm2"], filepath.Join(e.dir, "x.raw")); err == nil {
		t.Errorf("qemu-img with vm2's certificate read vm1:\n%s", out)
	} else {
		t.Logf("vm2 on vm1: qemu-img refused: %s", strings.TrimSpace(out))
	}
	list, err := exec.Command("nbdinfo", "--list", "--json", nbdsURI("", dirs["vm2"])).CombinedOutput()
	if err != nil || !strings.Contains(string(list), `"vm2"`) || strings.Contains(string(list), `"vm1"`) {
		t.Errorf("export list for vm2's certificate (%v):\n%s", err, list)
	}

	// Each VM's own certificate reads its own disk.
	for _, vm := range vms {
		if out, err := exec.Command("nbdinfo", "--size", nbdsURI(vm.name, dirs[vm.name])).CombinedOutput(); err != nil || strings.TrimSpace(string(out)) != "8388608" {
			t.Errorf("nbdinfo %s with its certificate: %v\n%s", vm.name, err, out)
		}
		got := filepath.Join(e.dir, vm.name+".read")
		if out, err := qemuRead(vm.name, dirs[vm.name], got); err != nil {
			t.Fatalf("qemu-img read %s with its certificate: %v\n%s\nserve log:\n%s", vm.name, err, out, s.log)
		}
		cmpFiles(t, vm.raw, got, 8<<20)
	}
}
