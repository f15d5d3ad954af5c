package broker_test

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/broker"
	"github.com/sealdisk/sealdisk/psp"
)

// TestReleaseToAttestedChip: the PSP, through the broker client over real HTTPS, gets the key
// the broker holds, bound into the engine; the audit log records it.
func TestReleaseToAttestedChip(t *testing.T) {
	h := newHarness(t, "")
	url := h.start(t, h.cfgPath)
	h.putKeys(t, url)
	b, p := h.pspWithClient(t, broker.ClientOptions{CAFile: h.tls.CA})
	im := h.images["k-ok"]
	l, err := p.Launch(psp.LaunchRequest{VM: "vm1", Cert: im.Cert, Header: im.Header, FirmwarePath: h.fw})
	must(t, err)
	if !bytes.Equal(b.key(l.ASID), im.Key) {
		t.Fatal("the engine was not given the broker's key")
	}
	n, _, err := broker.VerifyAudit(filepath.Join(h.store, "audit.log"), h.identity)
	must(t, err)
	if n != 1 {
		t.Fatalf("audit has %d entries, want 1", n)
	}
}

func (h *harness) pspWithClient(t *testing.T, o broker.ClientOptions) (*binder, *psp.PSP) {
	t.Helper()
	c, err := broker.NewClient(o)
	must(t, err)
	b := &binder{}
	p, err := psp.Open(h.w.ChipDir, psp.Options{Binder: b, Fetcher: c})
	must(t, err)
	return b, p
}

// TestRefusals: each refusal of the list is a 403 saying only "release refused",
// with its reason in the broker's log and in the audit log, whose chain verifies after; a
// changed audit line is then detected. No key bytes appear in any log, answer or error.
func TestRefusals(t *testing.T) {
	h := newHarness(t, "")
	url := h.start(t, h.cfgPath)
	h.putKeys(t, url)
	c := h.client(t, false)

	release := func(keyID string, nonce, report, cert []byte) (int, broker.ErrorResponse, []byte) {
		t.Helper()
		code, body := post(t, c, url+"/v1/release", broker.ReleaseRequest{KeyID: keyID, Nonce: nonce, Report: report, Certificate: cert})
		var er broker.ErrorResponse
		json.Unmarshal(body, &er)
		return code, er, body
	}
	// attempt challenges for keyID, has VM vm's launch attest over the nonce, and releases.
	attempt := func(keyID, vm string) (int, broker.ErrorResponse, []byte) {
		t.Helper()
		attest, cert := h.attester(t, keyID, vm)
		n := h.challenge(t, c, url, keyID)
		rep, err := attest(n)
		must(t, err)
		return release(keyID, n, rep, cert)
	}
	var bodies [][]byte
	wantRefused := func(name string, code int, er broker.ErrorResponse, body []byte, reason string) {
		t.Helper()
		bodies = append(bodies, body)
		if code != 403 || er.Error != "release refused" || er.Ref == "" {
			t.Fatalf("%s: got %d %s, want 403 release refused with a reference", name, code, body)
		}
		if strings.Contains(string(body), reason) {
			t.Fatalf("%s: the answer reveals the reason: %s", name, body)
		}
		if !strings.Contains(h.log.String(), "ref="+er.Ref) || !strings.Contains(h.auditLine(t, er.Ref), reason) {
			t.Fatalf("%s: reason %q not logged and audited under ref %s:\n%s", name, reason, er.Ref, h.log.String())
		}
	}

	// Released first, so the audit has both verdicts.
	if code, _, body := attempt("k-ok", "vm1"); code != 200 {
		t.Fatalf("k-ok: %d %s", code, body)
	}

	code, er, body := attempt("k-meas", "vm1")
	wantRefused("wrong firmware measurement", code, er, body, "firmware measurement")

	code, er, body = attempt("k-vendor", "vm1")
	wantRefused("chip of another vendor", code, er, body, "chip not endorsed by an allowed vendor root")

	code, er, body = attempt("k-window", "vm1")
	wantRefused("policy window expired", code, er, body, "policy window expired")

	code, er, body = attempt("k-revoked", "vm1")
	wantRefused("revoked key", code, er, body, "key revoked")

	code, er, body = attempt("k-nostore", "vm1")
	wantRefused("key id not in the store", code, er, body, "unknown key id")

	code, er, body = attempt("k-nopolicy", "vm1")
	wantRefused("key id without a policy", code, er, body, "unknown key id")

	code, er, body = attempt("k-vm", "vm-other")
	wantRefused("VM not in the policy", code, er, body, "not in the policy")

	if code, _, body := attempt("k-rate", "vm1"); code != 200 {
		t.Fatalf("k-rate first: %d %s", code, body)
	}
	code, er, body = attempt("k-rate", "vm1")
	wantRefused("rate limit", code, er, body, "rate limit")

	// Replay: the same nonce and report twice.
	attest, cert := h.attester(t, "k-ok", "vm1")
	n := h.challenge(t, c, url, "k-ok")
	rep, err := attest(n)
	must(t, err)
	if code, _, body := release("k-ok", n, rep, cert); code != 200 {
		t.Fatalf("first use: %d %s", code, body)
	}
	code, er, body = release("k-ok", n, rep, cert)
	wantRefused("replayed nonce", code, er, body, "nonce replayed")

	// A report over another nonce than the one released against.
	n1, n2 := h.challenge(t, c, url, "k-ok"), h.challenge(t, c, url, "k-ok")
	rep2, err := attest(n2)
	must(t, err)
	code, er, body = release("k-ok", n1, rep2, cert)
	wantRefused("report over another nonce", code, er, body, "report is over another nonce")

	// A nonce the broker did not mint, and one minted for another key id.
	forged := append([]byte(nil), n1...)
	forged[len(forged)-1] ^= 1
	code, er, body = release("k-ok", forged, rep2, cert)
	wantRefused("forged nonce", code, er, body, "not issued by this broker")
	other := h.challenge(t, c, url, "k-meas")
	repO, _ := attest(other)
	code, er, body = release("k-ok", other, repO, cert)
	wantRefused("nonce for another key id", code, er, body, "not issued by this broker")

	// Expired: the broker's clock moves past the window.
	n3 := h.challenge(t, c, url, "k-ok")
	rep3, err := attest(n3)
	must(t, err)
	h.offset.Store(int64(2 * time.Minute))
	code, er, body = release("k-ok", n3, rep3, cert)
	wantRefused("expired nonce", code, er, body, "nonce expired")
	h.offset.Store(0)

	// Malformed input is named (and audited), the service keeps serving.
	code, body = post(t, c, url+"/v1/release", map[string]any{"key_id": "k-ok", "bogus": 1})
	if code != 400 || !strings.Contains(string(body), "bogus") {
		t.Fatalf("malformed release: %d %s", code, body)
	}
	// A huge key id is refused before it reaches a log line (a line too long for the audit
	// tail reader would stop every later release).
	code, body = post(t, c, url+"/v1/release", broker.ReleaseRequest{KeyID: strings.Repeat("k", 200<<10)})
	if code != 400 || !strings.Contains(string(body), "key_id must be") || strings.Contains(h.log.String(), strings.Repeat("k", 300)) {
		t.Fatalf("huge key id: %d %.200s", code, body)
	}
	if code, _, body := attempt("k-ok", "vm1"); code != 200 {
		t.Fatalf("after the refusals: %d %s", code, body)
	}

	auditPath := filepath.Join(h.store, "audit.log")
	n4, _, err := broker.VerifyAudit(auditPath, h.identity)
	must(t, err)
	if n4 < 15 {
		t.Fatalf("audit has %d entries, want every release and refusal", n4)
	}
	h.noKeyBytes(t, append(bodies, []byte(h.log.String()), readFile(t, auditPath)))

	// A changed line: the verdict of a refusal turned into a release.
	b := readFile(t, auditPath)
	changed := bytes.Replace(b, []byte(`"verdict":"refuse"`), []byte(`"verdict":"release"`), 1)
	must(t, os.WriteFile(auditPath, changed, 0o600))
	if _, _, err := broker.VerifyAudit(auditPath, h.identity); !errors.Is(err, broker.ErrAuditChain) || !strings.Contains(err.Error(), "line 2") {
		t.Fatalf("changed line: %v, want ErrAuditChain at line 2", err)
	}
	// A removed line.
	lines := bytes.SplitAfter(b, []byte("\n"))
	must(t, os.WriteFile(auditPath, bytes.Join(append(lines[:3:3], lines[4:]...), nil), 0o600))
	if _, _, err := broker.VerifyAudit(auditPath, h.identity); !errors.Is(err, broker.ErrAuditChain) {
		t.Fatalf("removed line: %v, want ErrAuditChain", err)
	}
}

// TestClientCertRequired: with require_client_cert, a PSP without a client certificate is
// refused (and audited); with one it is served.
func TestClientCertRequired(t *testing.T) {
	h := newHarness(t, "require_client_cert: true\n")
	url := h.start(t, h.cfgPath)
	h.putKeys(t, url)
	im := h.images["k-ok"]
	_, p := h.pspWithClient(t, broker.ClientOptions{CAFile: h.tls.CA})
	_, err := p.Launch(psp.LaunchRequest{VM: "vm1", Cert: im.Cert, Header: im.Header, FirmwarePath: h.fw})
	if !errors.Is(err, broker.ErrRefused) || !strings.Contains(err.Error(), url) {
		t.Fatalf("without a client certificate: %v, want a refusal naming the broker", err)
	}
	if !strings.Contains(h.log.String(), "client certificate missing") {
		t.Fatalf("refusal reason not logged:\n%s", h.log)
	}
	b, p := h.pspWithClient(t, broker.ClientOptions{CAFile: h.tls.CA, CertFile: h.tls.ClientCert, KeyFile: h.tls.ClientKey})
	l, err := p.Launch(psp.LaunchRequest{VM: "vm1", Cert: im.Cert, Header: im.Header, FirmwarePath: h.fw})
	must(t, err)
	if !bytes.Equal(b.key(l.ASID), im.Key) {
		t.Fatal("wrong key")
	}
	if !strings.Contains(h.auditLine(t, ""), "cn=sealdisk test host") {
		t.Fatal("the audit does not name the client certificate")
	}
}

// TestTwoReplicas: two servers on one store and identity: a challenge from one is accepted by
// the other, and the nonce is then spent for both.
func TestTwoReplicas(t *testing.T) {
	h := newHarness(t, "")
	urlA := h.start(t, h.cfgPath)
	urlB := h.start(t, h.cfgPath)
	h.putKeys(t, urlA)
	c := h.client(t, false)
	attest, cert := h.attester(t, "k-ok", "vm1")
	n := h.challenge(t, c, urlA, "k-ok")
	rep, err := attest(n)
	must(t, err)
	req := broker.ReleaseRequest{KeyID: "k-ok", Nonce: n, Report: rep, Certificate: cert}
	if code, body := post(t, c, urlB+"/v1/release", req); code != 200 {
		t.Fatalf("B refused A's challenge: %d %s", code, body)
	}
	if code, body := post(t, c, urlA+"/v1/release", req); code != 403 {
		t.Fatalf("A accepted a nonce B had used: %d %s", code, body)
	}
	if !strings.Contains(h.log.String(), "nonce replayed") {
		t.Fatal("replay across replicas not logged")
	}
	if _, _, err := broker.VerifyAudit(filepath.Join(h.store, "audit.log"), h.identity); err != nil {
		t.Fatalf("two replicas' lines do not form one chain: %v", err)
	}
}

// TestUnwritableAuditRefuses: a release whose audit line cannot be written is refused.
func TestUnwritableAuditRefuses(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Log("running as root: the log is made unwritable by replacing it with a directory")
	}
	h := newHarness(t, "")
	url := h.start(t, h.cfgPath)
	h.putKeys(t, url)
	auditPath := filepath.Join(h.store, "audit.log")
	os.Remove(auditPath)
	must(t, os.Mkdir(auditPath, 0o700))
	c := h.client(t, false)
	attest, cert := h.attester(t, "k-ok", "vm1")
	n := h.challenge(t, c, url, "k-ok")
	rep, _ := attest(n)
	code, body := post(t, c, url+"/v1/release", broker.ReleaseRequest{KeyID: "k-ok", Nonce: n, Report: rep, Certificate: cert})
	if code == 200 || !strings.Contains(string(body), "release refused") || strings.Contains(string(body), "sealed_key") {
		t.Fatalf("release with an unwritable audit log: %d %s", code, body)
	}
	if !strings.Contains(h.log.String(), "audit log cannot be written") {
		t.Fatalf("not logged:\n%s", h.log)
	}
}

// TestStoreAtRest: key files are mode 0600 and hold no key bytes; a file copied to another
// key id does not open; rotate reseals every key and they still release.
func TestStoreAtRest(t *testing.T) {
	h := newHarness(t, "")
	url := h.start(t, h.cfgPath)
	h.putKeys(t, url)
	files, _ := filepath.Glob(filepath.Join(h.store, "keys", "*.json"))
	if len(files) != len(keyIDs)-1 {
		t.Fatalf("%d key files", len(files))
	}
	var all [][]byte
	for _, f := range files {
		fi, _ := os.Stat(f)
		if fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s has mode %o", f, fi.Mode().Perm())
		}
		all = append(all, readFile(t, f))
	}
	h.noKeyBytes(t, all)
	st, err := broker.OpenStore(h.store, h.identity)
	must(t, err)
	if err := st.Put("k-ok", h.images["k-ok"].Key); !errors.Is(err, broker.ErrKeyExists) {
		t.Fatalf("put over an existing id: %v", err)
	}
	n, err := st.Rotate()
	must(t, err)
	if n != len(keyIDs)-1 {
		t.Fatalf("rotate resealed %d", n)
	}
	// The running server picks the new at-rest key up by itself.
	b, p := h.pspWithClient(t, broker.ClientOptions{CAFile: h.tls.CA})
	im := h.images["k-ok"]
	l, err := p.Launch(psp.LaunchRequest{VM: "vm1", Cert: im.Cert, Header: im.Header, FirmwarePath: h.fw})
	must(t, err)
	if !bytes.Equal(b.key(l.ASID), im.Key) {
		t.Fatal("wrong key after rotate")
	}
	list, err := st.List()
	must(t, err)
	for _, k := range list {
		if k.KeyID == "k-revoked" && k.Revoked == "" {
			t.Fatal("rotate lost a revocation")
		}
	}
}

// auditLine returns the audit line with reference ref ("" = the last).
func (h *harness) auditLine(t *testing.T, ref string) string {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(string(readFile(t, filepath.Join(h.store, "audit.log")))), "\n")
	if ref == "" {
		return lines[len(lines)-1]
	}
	for _, l := range lines {
		if strings.Contains(l, `\"ref\":\"`+ref) || strings.Contains(l, `"ref":"`+ref) {
			return l
		}
	}
	return ""
}

// noKeyBytes fails if any image key appears in blobs, raw, hex or base64.
func (h *harness) noKeyBytes(t *testing.T, blobs [][]byte) {
	t.Helper()
	for id, im := range h.images {
		for _, enc := range [][]byte{im.Key, []byte(hex.EncodeToString(im.Key)), []byte(strings.ToUpper(hex.EncodeToString(im.Key))),
			[]byte(base64.StdEncoding.EncodeToString(im.Key)), []byte(base64.RawURLEncoding.EncodeToString(im.Key)), im.Key[:12]} {
			for i, b := range blobs {
				if bytes.Contains(b, enc) {
					t.Fatalf("key %s appears in blob %d", id, i)
				}
			}
		}
	}
}

func readFile(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	must(t, err)
	return b
}
