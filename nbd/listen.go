package nbd

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"time"
)

// DefaultSocketMode lets the owner and group (libvirt's QEMU user, typically) connect.
const DefaultSocketMode os.FileMode = 0o660

// ListenUnix listens on a Unix socket at path with the given mode (0 = DefaultSocketMode).
// A stale socket left by a dead server is removed; a live one (something accepts on it) or
// a non-socket file at path is an error.
func ListenUnix(path string, mode os.FileMode) (net.Listener, error) {
	if mode == 0 {
		mode = DefaultSocketMode
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("failed to listen on %s: exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("failed to listen on %s: another server is using it", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("failed to remove stale socket %s: %w", path, err)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("failed to listen on %s: %w", path, err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("failed to listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, mode.Perm()); err != nil {
		ln.Close()
		return nil, fmt.Errorf("failed to set mode of %s: %w", path, err)
	}
	return ln, nil
}

// ListenTCP listens on a TCP address. NBD over TCP must be protected by TLS: unless
// tlsRequired (the server will run with Options.RequireTLS) or insecure is set it returns
// ErrInsecureTCP. A listener returned with insecure set is marked so that Serve accepts it
// without RequireTLS; Serve refuses any other TCP listener in that case.
func ListenTCP(addr string, tlsRequired, insecure bool) (net.Listener, error) {
	if !tlsRequired && !insecure {
		return nil, ErrInsecureTCP
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("failed to listen on %s: %w", addr, err)
	}
	if insecure && !tlsRequired {
		return insecureListener{ln}, nil
	}
	return ln, nil
}

// insecureListener marks a TCP listener the operator explicitly allowed without TLS.
type insecureListener struct{ net.Listener }
