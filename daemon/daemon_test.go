package daemon

import (
	"errors"
	"fmt"
	"net/http"
	"syscall"
	"testing"

	"github.com/sealdisk/sealdisk/config"
	"github.com/sealdisk/sealdisk/psp"
)

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
