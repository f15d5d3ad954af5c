package broker

import (
	"bufio"
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// The audit log is append-only JSON lines, one per release or refusal, hash-chained:
//
//	{"entry": {"seq": n, "prev": hex mac of line n-1 (64 zeros for the first), "time": ...,
//	           "replica": ..., "verdict": "release"|"refuse", "reason": ..., "key_id": ...,
//	           "chip": ..., "vm": ..., "image": ..., "measurement": ..., "client": ...,
//	           "lease_end": ...},
//	 "mac": hex HMAC-SHA256(audit MAC key, prev || entry bytes)}
//
// The entry's bytes are kept verbatim (json.RawMessage), so verify checks exactly what was
// written. The MAC key comes from nonce.key: someone who can write the store but not read
// the identity cannot forge or re-chain lines. Replicas append under an exclusive OFD lock on
// the file and read the tail for the previous MAC, so their lines form one chain. A line is
// synced before the release it records is answered; if it cannot be, the release is refused.
// No key material is ever in an entry.

// AuditEntry is one line's entry.
type AuditEntry struct {
	Seq         uint64 `json:"seq"`
	Prev        string `json:"prev"`
	Time        string `json:"time"`
	Replica     string `json:"replica"`
	Verdict     string `json:"verdict"`
	Reason      string `json:"reason,omitempty"`
	Ref         string `json:"ref"` // the id the client was told
	KeyID       string `json:"key_id,omitempty"`
	Chip        string `json:"chip,omitempty"`
	VM          string `json:"vm,omitempty"`
	Image       string `json:"image,omitempty"`
	Measurement string `json:"measurement,omitempty"`
	Client      string `json:"client,omitempty"`
	LeaseEnd    string `json:"lease_end,omitempty"`
}

type auditLine struct {
	Entry json.RawMessage `json:"entry"`
	MAC   string          `json:"mac"`
}

// ErrAuditChain: a line does not verify (changed, removed, reordered or inserted).
var ErrAuditChain = errors.New("audit chain broken")

type auditLog struct {
	path string
	key  []byte
}

var zeroMAC = hex.EncodeToString(make([]byte, 32))

func (a *auditLog) mac(prev string, entry []byte) string {
	m := hmac.New(sha256.New, a.key)
	m.Write([]byte(prev))
	m.Write(entry)
	return hex.EncodeToString(m.Sum(nil))
}

// append writes e as the next line and syncs it.
func (a *auditLog) append(e *AuditEntry) error {
	f, err := os.OpenFile(a.path, os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("failed to open audit log: %w", err)
	}
	defer f.Close()
	lk := unix.Flock_t{Type: unix.F_WRLCK}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLKW, &lk); err != nil {
		return fmt.Errorf("failed to lock audit log: %w", err)
	}
	seq, prev, err := lastLine(f)
	if err != nil {
		return err
	}
	e.Seq, e.Prev = seq+1, prev
	eb, err := json.Marshal(e)
	if err != nil {
		return err
	}
	lb, err := json.Marshal(auditLine{Entry: eb, MAC: a.mac(prev, eb)})
	if err != nil {
		return err
	}
	if _, err := f.Write(append(lb, '\n')); err != nil {
		return fmt.Errorf("failed to write audit log: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("failed to sync audit log: %w", err)
	}
	return nil
}

// lastLine reads the file's last line: its seq and MAC (0 and zeros when empty).
func lastLine(f *os.File) (uint64, string, error) {
	fi, err := f.Stat()
	if err != nil {
		return 0, "", err
	}
	size := fi.Size()
	if size == 0 {
		return 0, zeroMAC, nil
	}
	n := min(size, 64<<10)
	buf := make([]byte, n)
	if _, err := f.ReadAt(buf, size-n); err != nil && err != io.EOF {
		return 0, "", fmt.Errorf("failed to read audit log: %w", err)
	}
	buf = bytes.TrimRight(buf, "\n")
	if i := bytes.LastIndexByte(buf, '\n'); i >= 0 {
		buf = buf[i+1:]
	}
	var l auditLine
	var e AuditEntry
	if err := json.Unmarshal(buf, &l); err != nil || json.Unmarshal(l.Entry, &e) != nil {
		return 0, "", fmt.Errorf("%w: the last line of the audit log does not parse; refusing to extend it", ErrAuditChain)
	}
	return e.Seq, l.MAC, nil
}

// VerifyAudit checks every line of the audit log at path under the identity's MAC key. It
// returns the number of lines and the last MAC (pin it: truncating the tail is only
// detectable against a head seen before).
func VerifyAudit(path, identityDir string) (n uint64, head string, err error) {
	id, err := loadIdentity(identityDir)
	if err != nil {
		return 0, "", err
	}
	f, err := os.Open(path)
	if err != nil {
		return 0, "", fmt.Errorf("failed to open audit log: %w", err)
	}
	defer f.Close()
	return (&auditLog{path: path, key: id.auditKey}).verify(f)
}

func (a *auditLog) verify(r io.Reader) (n uint64, head string, err error) {
	prev := zeroMAC
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var l auditLine
		var e AuditEntry
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil || json.Unmarshal(l.Entry, &e) != nil {
			return n, prev, fmt.Errorf("%w: line %d does not parse", ErrAuditChain, n+1)
		}
		if e.Seq != n+1 || e.Prev != prev {
			return n, prev, fmt.Errorf("%w: line %d has seq %d and prev %.16s…, want seq %d after %.16s…", ErrAuditChain, n+1, e.Seq, e.Prev, n+1, prev)
		}
		if !hmac.Equal([]byte(a.mac(prev, l.Entry)), []byte(l.MAC)) {
			return n, prev, fmt.Errorf("%w: line %d (seq %d) was changed: its MAC does not verify", ErrAuditChain, n+1, e.Seq)
		}
		prev = l.MAC
		n++
	}
	if err := sc.Err(); err != nil {
		return n, prev, fmt.Errorf("failed to read audit log: %w", err)
	}
	return n, prev, nil
}
