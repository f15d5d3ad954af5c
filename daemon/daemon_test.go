package daemon

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/sealdisk/sealdisk/config"
	"github.com/sealdisk/sealdisk/psp"
)

// TestListenUnix: a stale socket file is replaced, a live one or a regular file is refused,
// and the socket gets the requested mode.
func TestListenUnix(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "a.sock")
	ln, err := listenUnix(p, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v", fi.Mode())
	}
	if _, err := listenUnix(p, 0o600); err == nil || !strings.Contains(err.Error(), "another server") {
		t.Errorf("live socket: %v", err)
	}
	// Leave the file behind as a crashed server would.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	ln, err = listenUnix(p, 0o600)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	ln.Close()
	reg := filepath.Join(dir, "file")
	os.WriteFile(reg, nil, 0o644)
	if _, err := listenUnix(reg, 0o600); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("regular file: %v", err)
	}
}

// TestHTTPStatus: the admin API's one error mapper.
func TestHTTPStatus(t *testing.T) {
	for _, c := range []struct {
		err  error
		want int
	}{
		{fmt.Errorf("x: %w", ErrUnknownVM), http.StatusNotFound},
		{fmt.Errorf("x: %w", ErrConflict), http.StatusConflict},
		{fmt.Errorf("x: %w", psp.ErrASIDInUse), http.StatusConflict},
		{fmt.Errorf("x: %w", psp.ErrFirmwareMismatch), http.StatusUnprocessableEntity},
		{fmt.Errorf("x: %w", psp.ErrWrongChip), http.StatusUnprocessableEntity},
		{fmt.Errorf("x: %w", psp.ErrNonceLength), http.StatusBadRequest},
		{errors.Join(&config.KeyError{Key: "image", Reason: "is required"}), http.StatusBadRequest},
		{badRequest(errors.New("bad json")), http.StatusBadRequest},
		{ErrClosed, http.StatusServiceUnavailable},
		{ErrNoReload, http.StatusNotImplemented},
		{fmt.Errorf("x: %w", syscall.EIO), http.StatusInternalServerError},
	} {
		if got := httpStatus(c.err); got != c.want {
			t.Errorf("%v: %d, want %d", c.err, got, c.want)
		}
	}
}
