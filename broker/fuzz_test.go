package broker

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// FuzzCheckNonce: no input but a minted nonce, for its key id, inside its window, passes.
func FuzzCheckNonce(f *testing.F) {
	key := make([]byte, 32)
	now := time.Unix(1_800_000_000, 0)
	// Deterministic (mintNonce's random part would differ in each fuzz worker process).
	head := append([]byte{nonceVersion}, make([]byte, 24)...)
	binary.BigEndian.PutUint64(head[1:], uint64(now.UnixMilli()))
	good := append(head, nonceMAC(key, head, "k1")...)
	f.Add(good, "k1")
	f.Add(good[:10], "k1")
	f.Add([]byte{}, "")
	f.Fuzz(func(t *testing.T, nonce []byte, keyID string) {
		_, err := checkNonce(key, nonce, keyID, now, time.Minute)
		if err == nil && (string(nonce) != string(good) || keyID != "k1") {
			t.Fatalf("accepted a nonce the broker did not mint for %q", keyID)
		}
	})
}

// FuzzVerifyAudit: any audit file content is verified or refused, never a panic, and a file
// that verifies extends only from a valid first line.
func FuzzVerifyAudit(f *testing.F) {
	dir := f.TempDir()
	id := filepath.Join(dir, "id")
	if err := InitIdentity(id); err != nil {
		f.Fatal(err)
	}
	ident, err := loadIdentity(id)
	if err != nil {
		f.Fatal(err)
	}
	path := filepath.Join(dir, "audit.log")
	a := &auditLog{path: path, key: ident.auditKey}
	a.append(&AuditEntry{Verdict: "release", KeyID: "k1"})
	a.append(&AuditEntry{Verdict: "refuse", Reason: "nonce replayed"})
	good, _ := os.ReadFile(path)
	f.Add(good)
	f.Add([]byte("{}\n"))
	f.Add([]byte(`{"entry":{"seq":1},"mac":"00"}` + "\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		n, _, err := a.verify(bytes.NewReader(b))
		if err == nil && n > 0 && !bytes.HasPrefix(b, good[:bytes.IndexByte(good, '\n')+1]) {
			t.Fatalf("a chain of %d lines verified that does not start with the only valid first line", n)
		}
	})
}
