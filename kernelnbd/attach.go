// Package kernelnbd attaches an export of a running sealdisk serve to the kernel's NBD
// driver (/dev/nbdX): it negotiates the export (over TLS when asked), hands the connection to the
// kernel through go-nbd's ioctls — relaying it over TLS from a local socket pair when the
// connection is TLS — and detaches cleanly. `sealdisk attach` parses its flags into Options.
package kernelnbd

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	nbdclient "github.com/pojntfx/go-nbd/pkg/client"
	nbdioctl "github.com/pojntfx/go-nbd/pkg/ioctl"
	"golang.org/x/sys/unix"

	"github.com/sealdisk/sealdisk/nbd"
	"github.com/sealdisk/sealdisk/psp"
)

// nbdSetFlags is NBD_SET_FLAGS from linux/nbd.h, which go-nbd v0.3.2 does not define: it
// tells the kernel the transmission flags, without which it never sends FLUSH or FUA.
const nbdSetFlags = 0xab<<8 | 10

// nbdMajor is the block major number of /dev/nbdX.
const nbdMajor = 43

// Kernel nbd block sizes that work in practice (go-nbd's client.MinimumBlockSize and
// MaximumBlockSize).
const (
	kernelMinBlock = nbdclient.MinimumBlockSize
	kernelMaxBlock = nbdclient.MaximumBlockSize
)

// Options are what to attach; each field is the `sealdisk attach` flag of the same name, and
// Check's messages name those flags.
type Options struct {
	Device, Export           string // the /dev/nbdX device; the export name
	Socket, TCP              string // the server: exactly one of a Unix socket path and HOST:PORT
	TLSCert, TLSKey, TLSCA   string // PEM files; TLSCA enables TLS
	ServerName               string // name to verify in the server certificate
	InsecureTCP              bool   // allow TCP without TLS
	Timeout, HandshakeWithin time.Duration
}

// Check validates the options, before anything is opened.
func (o *Options) Check() error {
	switch {
	case o.Export == "":
		return errors.New("missing required flag --export")
	case (o.Socket == "") == (o.TCP == ""):
		return errors.New("give exactly one of --socket PATH and --tcp HOST:PORT")
	case (o.TLSCert == "") != (o.TLSKey == ""):
		return errors.New("--tls-cert and --tls-key go together")
	case o.TLSCert != "" && o.TLSCA == "":
		return errors.New("--tls-cert needs --tls-ca (the CA of the server's certificate)")
	case o.TCP != "" && o.TLSCA == "" && !o.InsecureTCP:
		return errors.New("--tcp needs TLS (--tls-ca, and --tls-cert/--tls-key for an export bound to a client identity), or --insecure-tcp")
	case o.Timeout < 0:
		return errors.New("--timeout must not be negative")
	}
	if o.TCP != "" {
		if _, _, err := net.SplitHostPort(o.TCP); err != nil {
			return fmt.Errorf("--tcp %q: %w", o.TCP, err)
		}
	}
	return nil
}

// tlsConfig builds the client TLS configuration from files; nil without --tls-ca.
func (o *Options) tlsConfig() (*tls.Config, error) {
	if o.TLSCA == "" {
		return nil, nil
	}
	caPEM, err := os.ReadFile(o.TLSCA)
	if err != nil {
		return nil, fmt.Errorf("--tls-ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("--tls-ca: no PEM certificate in %s", o.TLSCA)
	}
	name := o.ServerName
	if name == "" {
		name = "localhost"
		if o.TCP != "" {
			name, _, _ = net.SplitHostPort(o.TCP)
		}
	}
	tc := &tls.Config{RootCAs: pool, ServerName: name, MinVersion: tls.VersionTLS12}
	if o.TLSCert != "" {
		keyPEM, err := psp.ReadPrivateFile(o.TLSKey)
		if err != nil {
			return nil, fmt.Errorf("--tls-key: %w", err)
		}
		certPEM, err := os.ReadFile(o.TLSCert)
		if err != nil {
			return nil, fmt.Errorf("--tls-cert: %w", err)
		}
		cert, err := tls.X509KeyPair(certPEM, keyPEM)
		clear(keyPEM)
		if err != nil {
			return nil, fmt.Errorf("failed to load the client certificate: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}

// Attach negotiates, attaches, waits for the end (the server gone or ctx done) and detaches.
func Attach(ctx context.Context, o Options, log *slog.Logger) error {
	if err := o.Check(); err != nil {
		return err
	}
	tc, err := o.tlsConfig()
	if err != nil {
		return err
	}
	network, addr := "unix", o.Socket
	if o.TCP != "" {
		network, addr = "tcp", o.TCP
	}
	hctx, cancel := context.WithTimeout(ctx, o.HandshakeWithin)
	defer cancel()
	raw, err := (&net.Dialer{}).DialContext(hctx, network, addr)
	if err != nil {
		return fmt.Errorf("failed to connect to the NBD server: %w", err)
	}
	defer raw.Close()
	conn, info, err := nbd.ClientNegotiate(hctx, raw, o.Export, tc)
	switch {
	case errors.Is(err, nbd.ErrExportUnknown):
		return fmt.Errorf("export %q unknown on %s (or not allowed for this client certificate): %w", o.Export, addr, err)
	case errors.Is(err, nbd.ErrTLSRequired):
		return fmt.Errorf("%s requires TLS: give --tls-ca, --tls-cert and --tls-key: %w", addr, err)
	case err != nil:
		return fmt.Errorf("failed to open export %q on %s: %w", o.Export, addr, err)
	}
	bs, err := kernelBlockSize(info)
	if err != nil {
		return err
	}

	if err := checkNBDDevice(o.Device); err != nil {
		return err
	}
	dev, err := os.OpenFile(o.Device, os.O_RDWR, 0)
	if err != nil {
		if errors.Is(err, fs.ErrPermission) {
			return fmt.Errorf("failed to open %s: %w (attach needs root)", o.Device, err)
		}
		return fmt.Errorf("failed to open %s: %w", o.Device, err)
	}
	defer dev.Close()

	// The kernel gets a socket: the server connection itself, or with TLS one end of a
	// socket pair whose other end this process relays over TLS.
	var sock *os.File
	var relay func() error
	if _, isTLS := conn.(*tls.Conn); isTLS {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("failed to create the TLS relay socket pair: %w", err)
		}
		sock = os.NewFile(uintptr(fds[0]), "nbd-kernel")
		local, err := net.FileConn(os.NewFile(uintptr(fds[1]), "nbd-relay"))
		if err != nil {
			sock.Close()
			return fmt.Errorf("failed to set up the TLS relay: %w", err)
		}
		relay = func() error { return relayConns(local, conn) }
	} else {
		fc, ok := raw.(interface{ File() (*os.File, error) })
		if !ok {
			return fmt.Errorf("BUG: connection %T has no file", raw)
		}
		if sock, err = fc.File(); err != nil {
			return fmt.Errorf("failed to hand the socket to the kernel: %w", err)
		}
	}
	defer sock.Close()

	fd := dev.Fd()
	for _, step := range []struct {
		name string
		req  uintptr
		arg  uintptr
	}{
		{"NBD_SET_BLKSIZE", nbdioctl.NEGOTIATION_IOCTL_SET_BLOCKSIZE, uintptr(bs)},
		{"NBD_SET_SIZE_BLOCKS", nbdioctl.NEGOTIATION_IOCTL_SET_SIZE_BLOCKS, uintptr(info.Size / uint64(bs))},
		{"NBD_SET_FLAGS", nbdSetFlags, uintptr(info.Flags)},
		{"NBD_SET_TIMEOUT", nbdioctl.NEGOTIATION_IOCTL_SET_TIMEOUT, uintptr(o.Timeout / time.Second)},
		{"NBD_SET_SOCK", nbdioctl.NEGOTIATION_IOCTL_SET_SOCK, sock.Fd()},
	} {
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, fd, step.req, step.arg); e != 0 {
			if e == unix.EBUSY {
				return fmt.Errorf("%s is already in use by another NBD connection", o.Device)
			}
			return fmt.Errorf("failed to configure %s (%s): %w", o.Device, step.name, e)
		}
	}

	var wg sync.WaitGroup
	relayErr := make(chan error, 1)
	if relay != nil {
		wg.Go(func() { relayErr <- relay() })
	}
	doIt := make(chan error, 1)
	go func() {
		// NBD_DO_IT serves the device until it is disconnected.
		_, _, e := unix.Syscall(unix.SYS_IOCTL, fd, nbdioctl.NEGOTIATION_IOCTL_DO_IT, 0)
		if e != 0 {
			doIt <- e
			return
		}
		doIt <- nil
	}()
	log.Info("attached", "device", o.Device, "export", o.Export, "server", addr, "size", info.Size,
		"block_size", bs, "read_only", info.ReadOnly(), "tls", relay != nil)

	var runErr error
	select {
	case <-ctx.Done():
		log.Info("detaching", "device", o.Device)
		if err := dev.Sync(); err != nil { // page cache out, then an NBD FLUSH
			log.Warn("failed to flush before detaching", "device", o.Device, "err", err)
		}
		// go-nbd's Disconnect: clear the queue, send NBD_CMD_DISC, clear the socket.
		if err := nbdclient.Disconnect(dev); err != nil {
			runErr = fmt.Errorf("failed to detach %s: %w", o.Device, err)
		}
		<-doIt
	case err := <-doIt:
		runErr = fmt.Errorf("the connection to the server ended; %s detached", o.Device)
		if err != nil {
			runErr = fmt.Errorf("%s: %w; detached", o.Device, err)
		}
		unix.Syscall(unix.SYS_IOCTL, fd, nbdioctl.TRANSMISSION_IOCTL_CLEAR_SOCK, 0)
	case err := <-relayErr:
		runErr = fmt.Errorf("TLS relay ended: %v; detaching %s", err, o.Device)
		nbdclient.Disconnect(dev)
		<-doIt
	}
	sock.Close()
	conn.Close()
	wg.Wait()
	if runErr == nil {
		log.Info("detached", "device", o.Device)
	}
	return runErr
}

// kernelBlockSize picks the block size the kernel uses: the server's preferred size within
// what the kernel driver takes, no smaller than the server's minimum, and dividing the
// export size so no tail is lost.
func kernelBlockSize(info nbd.ExportInfo) (uint32, error) {
	bs := uint32(kernelMaxBlock)
	if info.PreferredBlock != 0 {
		bs = min(max(info.PreferredBlock, kernelMinBlock), kernelMaxBlock)
	}
	for bs > kernelMinBlock && info.Size%uint64(bs) != 0 {
		bs /= 2
	}
	if info.MinBlock > bs || info.Size%uint64(bs) != 0 {
		return 0, fmt.Errorf("export of %d bytes with minimum block %d cannot be mapped to kernel blocks of %d-%d bytes",
			info.Size, info.MinBlock, kernelMinBlock, kernelMaxBlock)
	}
	return bs, nil
}

// checkNBDDevice says clearly what is wrong with path as a kernel NBD device: missing module,
// no such device, not an NBD block device, already connected.
func checkNBDDevice(path string) error {
	fi, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		if _, merr := os.Stat("/sys/module/nbd"); merr != nil {
			return fmt.Errorf("no such device %s: the nbd kernel module is not loaded (modprobe nbd)", path)
		}
		return fmt.Errorf("no such device %s (the nbd module is loaded; its devices are /dev/nbd0 up to nbds_max-1)", path)
	}
	if err != nil {
		return fmt.Errorf("failed to check %s: %w", path, err)
	}
	if fi.Mode()&fs.ModeDevice == 0 || fi.Mode()&fs.ModeCharDevice != 0 {
		return fmt.Errorf("%s is not a block device", path)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok || unix.Major(st.Rdev) != nbdMajor {
		return fmt.Errorf("%s is not an NBD device (block major %d, want %d)", path, unix.Major(st.Rdev), nbdMajor)
	}
	if pid, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(path), "pid")); err == nil {
		return fmt.Errorf("%s is already connected (by pid %s)", path, strings.TrimSpace(string(pid)))
	}
	return nil
}

// relayConns copies both ways between the kernel's end of the socket pair and the TLS
// connection until either side ends.
func relayConns(local, remote net.Conn) error {
	errc := make(chan error, 2)
	go func() { _, err := io.Copy(remote, local); errc <- err }()
	go func() { _, err := io.Copy(local, remote); errc <- err }()
	err := <-errc
	local.Close()
	remote.Close()
	<-errc
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}
