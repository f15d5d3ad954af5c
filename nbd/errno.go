package nbd

import (
	"context"
	"errors"
	"syscall"

	"github.com/sealdisk/sealdisk/engine"
)

// errnoFor is the one place device errors become NBD errors. The command and its flags
// matter because the spec asks for ENOSPC on writes past the end but EINVAL on reads, and
// allows ENOTSUP only for a FAST_ZERO write-zeroes. Documented in docs/NBD.md.
func errnoFor(cmd, flags uint16, err error) Errno {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, engine.ErrOutOfRange):
		if cmd == cmdWrite || cmd == cmdWriteZeroes {
			return ENOSPC
		}
		return EINVAL
	case errors.Is(err, engine.ErrTooLarge):
		// EOVERFLOW is reserved for DF reads, which this server never refuses.
		return EINVAL
	case errors.Is(err, engine.ErrReadOnly), errors.Is(err, engine.ErrPermission):
		return EPERM
	case errors.Is(err, engine.ErrIntegrity):
		return EIO
	case errors.Is(err, engine.ErrNotFast):
		if cmd == cmdWriteZeroes && flags&cflagFastZero != 0 {
			return ENOTSUP
		}
		return EIO
	case errors.Is(err, engine.ErrDetached),
		errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		// The export is going away; ESHUTDOWN tells the client to disconnect cleanly.
		return ESHUTDOWN
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT),
		errors.Is(err, syscall.EFBIG):
		return ENOSPC
	}
	return EIO
}

// errnoMessage is the human-readable text sent in structured error chunks: the category,
// never the wrapped error (which may name host paths).
func errnoMessage(errno Errno) string {
	switch errno {
	case EPERM:
		return "operation not permitted"
	case EIO:
		return "input/output error"
	case EINVAL:
		return "invalid argument"
	case ENOSPC:
		return "request reaches past the end of the export"
	case ENOTSUP:
		return "fast zero not possible"
	case ESHUTDOWN:
		return "export is shutting down"
	}
	return errno.String()
}
