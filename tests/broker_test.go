package tests

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/internal/fixture"
)

// brokerProc is a running `sealdisk broker serve`.
type brokerProc struct {
	cmd  *exec.Cmd
	log  *bytes.Buffer
	url  string
	addr string
}

// brokerEnv is a broker identity, store, TLS files and a broker.yaml for e's vendor and
// provider, with one key id per name in keys (lease as given).
type brokerEnv struct {
	e                    *env
	dir, identity, store string
	tls                  *fixture.TLSFiles
	keyFiles             map[string]string
}

func newBrokerEnv(t *testing.T, e *env) *brokerEnv {
	t.Helper()
	b := &brokerEnv{e: e, dir: filepath.Join(e.dir, "broker"), keyFiles: map[string]string{}}
	b.identity, b.store = filepath.Join(b.dir, "identity"), filepath.Join(b.dir, "store")
	b.tls = fixture.TLS(t, filepath.Join(b.dir, "tls"))
	run(t, "broker", "init", "--identity", b.identity)
	return b
}

// config writes broker-NAME.yaml listening on addr with the given key policies.
func (b *brokerEnv) config(t *testing.T, name, addr, lease string, keys ...string) string {
	t.Helper()
	var sb strings.Builder
	fmt.Fprintf(&sb, "listen: tcp:%s\ntls_cert: %s\ntls_key: %s\nidentity: %s\nstore: %s\nkeys:\n", addr, b.tls.ServerCert, b.tls.ServerKey, b.identity, b.store)
	for _, k := range keys {
		fmt.Fprintf(&sb, "  %s:\n    vendor_roots: [%s]\n    providers: [%s]\n    lease: %s\n", k,
			filepath.Join(b.e.vendor, "vendor.crt"), filepath.Join(b.e.prov, "provider.pub"), lease)
	}
	p := filepath.Join(b.dir, "broker-"+name+".yaml")
	if err := os.WriteFile(p, []byte(sb.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func (b *brokerEnv) start(t *testing.T, cfg, addr string) *brokerProc {
	t.Helper()
	p := &brokerProc{log: &bytes.Buffer{}, addr: addr, url: "https://" + addr}
	p.cmd = exec.Command(sealdisk, "broker", "serve", "--config", cfg)
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.stop(t) })
	c := b.client(t)
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if resp, err := c.Get(p.url + "/metrics"); err == nil {
			resp.Body.Close()
			return p
		}
	}
	t.Fatalf("broker did not come up:\n%s", p.log)
	return nil
}

func (p *brokerProc) stop(t *testing.T) {
	if p.cmd.ProcessState != nil {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	if err := p.cmd.Wait(); err != nil {
		t.Errorf("broker exited with %v:\n%s", err, p.log)
	}
}

func (b *brokerEnv) client(t *testing.T) *http.Client {
	t.Helper()
	pem, err := os.ReadFile(b.tls.CA)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}}}
}

// releases reads sealdisk_broker_releases_total{key_id} from a broker's metrics.
func (b *brokerEnv) releases(t *testing.T, p *brokerProc, keyID string) int {
	t.Helper()
	resp, err := b.client(t).Get(p.url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	prefix := `sealdisk_broker_releases_total{key_id="` + keyID + `"} `
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), prefix); ok {
			n, _ := strconv.Atoi(v)
			return n
		}
	}
	return 0
}

// put generates key id's key in the broker and keeps the --key-out file for create/seal.
func (b *brokerEnv) put(t *testing.T, cfg, id string) {
	t.Helper()
	f := filepath.Join(b.dir, id+".key")
	run(t, "broker", "put", "--config", cfg, id, "--generate", "--key-out", f)
	b.keyFiles[id] = f
}

func (b *brokerEnv) remoteArgs(url, id string) []string {
	return []string{"--broker-url", url, "--key-id", id, "--key-file", b.keyFiles[id]}
}

// TestBrokerEndToEnd: broker on loopback; serve fetches each image's key at attach; a second
// VM attaching an image whose key is cached makes no broker request (the broker's metrics);
// a lease later, one renewal for that key however many VMs use it; a guest boots over NBD
// from a remote-key image; with the broker stopped the attached VMs keep serving, a new
// attach fails naming the broker, and at the lease end the VMs lose the key. The audit log
// verifies, then a changed line is detected; no key bytes in any log.
func TestBrokerEndToEnd(t *testing.T) {
	requireTool(t, "qemu-io")
	e := newEnv(t)
	b := newBrokerEnv(t, e)
	addr := freePort(t)
	const lease = 6 * time.Second
	cfg := b.config(t, "a", addr, lease.String(), "root", "data", "spare", "rev")
	for _, id := range []string{"root", "data", "spare", "rev"} {
		b.put(t, cfg, id)
	}
	list := run(t, "broker", "list", "--config", cfg)
	if !strings.Contains(list, "data") || !strings.Contains(list, "active") {
		t.Fatalf("broker list:\n%s", list)
	}
	br := b.start(t, cfg, addr)

	// Images whose key lives only in the broker.
	data := filepath.Join(e.dir, "data.raw")
	fill(t, data, 0, 4<<20, 7)
	dataImg := data + ".img"
	e.seal(t, data, dataImg, b.remoteArgs(br.url, "data")...)
	spareImg := filepath.Join(e.dir, "spare.img")
	run(t, append([]string{"create", "--out", spareImg, "--size", "1M"}, e.certArgs(b.remoteArgs(br.url, "spare")...)...)...)
	revImg := filepath.Join(e.dir, "rev.img")
	run(t, append([]string{"create", "--out", revImg, "--size", "1M"}, e.certArgs(b.remoteArgs(br.url, "rev")...)...)...)
	insp := run(t, "inspect", dataImg, "--trust", filepath.Join(e.psp, "trust"))
	if !strings.Contains(insp, br.url) || !strings.Contains(insp, "data") {
		t.Fatalf("inspect does not show the broker:\n%s", insp)
	}
	var rootImg string
	guest := !testing.Short()
	if guest {
		raw := filepath.Join(e.dir, "root.raw")
		requireTool(t, "mkfs.ext4")
		if out, err := exec.Command("../scripts/guest/mkroot.sh", raw, "64M").CombinedOutput(); err != nil {
			t.Fatalf("mkroot: %v\n%s", err, out)
		}
		rootImg = raw + ".img"
		e.seal(t, raw, rootImg, b.remoteArgs(br.url, "root")...)
	}

	s := startBrokerServe(t, e, b, rootImg, dataImg)
	start := time.Now()
	if n := b.releases(t, br, "data"); n != 1 {
		t.Fatalf("data released %d times at attach, want 1", n)
	}
	s.adminRun(t, "attach", "--name", "data2", "--image", dataImg, "--firmware", e.fw, "--read-only")
	if n := b.releases(t, br, "data"); n != 1 {
		t.Fatalf("a second attach within the lease made a broker request (%d releases)", n)
	}
	for _, vm := range []string{"data", "data2"} {
		readPattern(t, s, vm, data)
	}
	// One lease on: the key was renewed once for both VMs (renewal at 2/3 of the lease).
	time.Sleep(time.Until(start.Add(lease - 500*time.Millisecond)))
	if n := b.releases(t, br, "data"); n != 2 {
		t.Fatalf("after one lease: %d releases of data, want 2 (one renewal shared by both VMs)", n)
	}

	// Revocation: refused at the next fetch (the renewal), so the VM goes at its lease end
	// (while the guest boots), and attaching it again is refused.
	s.adminRun(t, "attach", "--name", "rev", "--image", revImg, "--firmware", e.fw)
	run(t, "broker", "revoke", "--config", cfg, "rev")

	if guest {
		marker := fmt.Sprintf("broker-%d", time.Now().UnixNano())
		checkConsole(t, bootGuest(t, "file=nbd+unix:///root?socket="+s.sock+",format=raw,if=virtio", marker), marker)
	}
	waitFor(t, s.server, "VM rev detached after its key was revoked", func() bool { return !strings.Contains(s.vmNames(t), "rev") })
	if out, err := runErr("admin", "--socket", s.admin, "attach", "--name", "rev", "--image", revImg, "--firmware", e.fw); err == nil || !strings.Contains(out, "refused") || !strings.Contains(out, br.url) {
		t.Fatalf("attach of a revoked key: %v\n%s", err, out)
	}
	if !strings.Contains(br.log.String(), "key revoked") {
		t.Fatalf("the broker did not log the revocation as the reason:\n%s", br.log)
	}

	// A second broker process on the same store accepts the first one's challenge.
	addrB := freePort(t)
	brB := b.start(t, b.config(t, "b", addrB, lease.String(), "root", "data", "spare", "rev"), addrB)
	crossReplica(t, b, s, br, brB, dataImg)
	brB.stop(t)

	// Broker down: attached VMs keep serving; a new attach fails naming the broker.
	br.stop(t)
	readPattern(t, s, "data2", data)
	out, err := runErr("admin", "--socket", s.admin, "attach", "--name", "spare", "--image", spareImg, "--firmware", e.fw)
	if err == nil || !strings.Contains(out, br.url) || !strings.Contains(out, "unreachable") {
		t.Fatalf("attach with the broker stopped: %v\n%s", err, out)
	}
	// The lease runs out: the VMs lose the key (reads fail), and the service still answers.
	deadline := time.Now().Add(2 * lease)
	for ; time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		out, err := exec.Command("qemu-io", "-f", "raw", "-r", "-c", "read 0 4096", "nbd+unix:///data2?socket="+s.sock).CombinedOutput()
		if err != nil || strings.Contains(string(out), "failed") {
			break
		}
	}
	if !time.Now().Before(deadline) {
		t.Fatal("the VM still reads after its lease ended with the broker down")
	}
	waitFor(t, s.server, "data2 detached at its lease end", func() bool { return !strings.Contains(s.vmNames(t), "data2") })
	if st := s.status(t); !strings.Contains(st.NotAttached["data2"], "lease ended") {
		t.Fatalf("status does not say why data2 went: %+v", st.NotAttached)
	}
	s.stop(t)

	// The audit chain verifies; a changed line does not.
	auditPath := filepath.Join(b.store, "audit.log")
	if out := run(t, "broker", "audit", "verify", "--config", cfg); !strings.Contains(out, "chain intact") {
		t.Fatal(out)
	}
	lines, _ := os.ReadFile(auditPath)
	logs := [][]byte{br.log.Bytes(), brB.log.Bytes(), s.log.Bytes(), lines, []byte(out)}
	for id, f := range b.keyFiles {
		key, _ := os.ReadFile(f)
		for _, enc := range []string{string(key), hex.EncodeToString(key), base64.StdEncoding.EncodeToString(key)} {
			for i, l := range logs {
				if bytes.Contains(l, []byte(enc)) {
					t.Fatalf("key %s appears in log %d", id, i)
				}
			}
		}
	}
	changed := bytes.Replace(lines, []byte(`"vm":"data"`), []byte(`"vm":"datx"`), 1)
	if bytes.Equal(changed, lines) {
		t.Fatal("no audit line names vm data")
	}
	os.WriteFile(auditPath, changed, 0o600)
	if out, err := runErr("broker", "audit", "verify", "--config", cfg); err == nil || !strings.Contains(out, "was changed") {
		t.Fatalf("audit verify after a changed line: %v\n%s", err, out)
	}
}

// crossReplica: a nonce from replica a, a report over it from the serving PSP (admin
// attest), released by replica b; then a refuses the same nonce.
func crossReplica(t *testing.T, b *brokerEnv, s *configServer, a, bb *brokerProc, img string) {
	t.Helper()
	c := b.client(t)
	body, _ := json.Marshal(map[string]string{"key_id": "data"})
	resp, err := c.Post(a.url+"/v1/challenge", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	var ch struct{ Nonce []byte }
	json.NewDecoder(resp.Body).Decode(&ch)
	resp.Body.Close()
	nf := filepath.Join(b.dir, "nonce.bin")
	os.WriteFile(nf, ch.Nonce, 0o600)
	rep := filepath.Join(b.dir, "report.json")
	s.adminRun(t, "attest", "data", "--nonce-file", nf, "--out", rep)
	report, _ := os.ReadFile(rep)
	h, _, err := format.ReadHeader(mustOpen(t, img))
	if err != nil {
		t.Fatal(err)
	}
	req, _ := json.Marshal(map[string]any{"key_id": "data", "nonce": ch.Nonce, "report": json.RawMessage(report), "certificate": h.Cert})
	for i, target := range []*brokerProc{bb, a} {
		resp, err := c.Post(target.url+"/v1/release", "application/json", bytes.NewReader(req))
		if err != nil {
			t.Fatal(err)
		}
		out, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if want := []int{200, 403}[i]; resp.StatusCode != want {
			t.Fatalf("release at replica %d: %d %s, want %d", i, resp.StatusCode, out, want)
		}
	}
	if !strings.Contains(a.log.String(), "nonce replayed") {
		t.Fatalf("replica a did not log the replay:\n%s", a.log)
	}
}

// readPattern: the VM's export reads back the raw source's first MiB.
func readPattern(t *testing.T, s *configServer, vm, raw string) {
	t.Helper()
	out := filepath.Join(s.e.dir, vm+".read")
	qemuImg(t, "convert", "-f", "raw", "-O", "raw", "nbd+unix:///"+vm+"?socket="+s.sock, out)
	cmpFiles(t, raw, out, 4<<20)
}

// startBrokerServe runs serve from a config: root (when given) read-write, data read-only,
// the broker's CA, three attempts per fetch.
func startBrokerServe(t *testing.T, e *env, b *brokerEnv, rootImg, dataImg string) *configServer {
	t.Helper()
	s := &configServer{e: e, server: &server{log: &bytes.Buffer{}, sock: filepath.Join(e.dir, "nbd.sock")},
		cfg: filepath.Join(e.dir, "sealdisk.yaml"), admin: filepath.Join(e.dir, "admin.sock")}
	var sb strings.Builder
	fmt.Fprintf(&sb, "psp:\n  dir: %s\n  broker_ca: %s\n  broker_attempts: 3\nnbd:\n  listen: [\"unix:%s\"]\nadmin:\n  socket: %s\nengine:\n  cache_size: 16M\nvms:\n",
		e.psp, b.tls.CA, s.sock, s.admin)
	if rootImg != "" {
		fmt.Fprintf(&sb, "  - name: root\n    image: %s\n    firmware: %s\n", rootImg, e.fw)
	}
	fmt.Fprintf(&sb, "  - name: data\n    image: %s\n    firmware: %s\n    read_only: true\n", dataImg, e.fw)
	if err := os.WriteFile(s.cfg, []byte(sb.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	s.cmd = exec.Command(sealdisk, "serve", "--config", s.cfg)
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.stop(t) })
	waitFor(t, s.server, "admin socket", func() bool { _, err := os.Stat(s.admin); return err == nil })
	return s
}
