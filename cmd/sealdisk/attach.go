package main

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
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	nbdclient "github.com/pojntfx/go-nbd/pkg/client"
	nbdioctl "github.com/pojntfx/go-nbd/pkg/ioctl"
	"github.com/spf13/cobra"
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

type attachOptions struct {
	device, export           string
	socket, tcp              string
	tlsCert, tlsKey, tlsCA   string
	serverName               string
	insecureTCP              bool
	timeout, handshakeWithin time.Duration
}

func attachCmd() *cobra.Command {
	var o attachOptions
	cmd := &cobra.Command{
		Use:   "attach --export NAME (--socket PATH | --tcp HOST:PORT --tls-ca FILE [--tls-cert FILE --tls-key FILE]) /dev/nbdX",
		Short: "Attach an export of a running sealdisk serve to a kernel NBD device",
		Long: `Negotiates the export with the server (over TLS when --tls-ca is given; TCP needs TLS), hands
the connection to the kernel's nbd driver through go-nbd's ioctls, and waits until the server
disconnects or SIGTERM/SIGINT arrives; then it flushes the device, detaches it (the kernel sends
NBD_CMD_DISC, and the server answers what is in flight before closing) and exits 0. Unmount
anything on the device first. Needs root (CAP_SYS_ADMIN) and the nbd kernel module (modprobe nbd).
With TLS the kernel talks to a local socket pair and this process relays it over TLS.`,
		Example: `  sealdisk attach --export vm1 --socket /run/sealdisk/nbd.sock /dev/nbd0
  sealdisk attach --export vm1 --tcp host.example:10809 --tls-ca ca.pem \
      --tls-cert vm1.pem --tls-key vm1.key /dev/nbd1`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			o.device = args[0]
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return runAttach(ctx, o, slog.Default())
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.export, "export", "", "export name (the VM's export in sealdisk serve)")
	f.StringVar(&o.socket, "socket", "", "server Unix socket")
	f.StringVar(&o.tcp, "tcp", "", "server TCP address HOST:PORT (needs TLS)")
	f.StringVar(&o.tlsCA, "tls-ca", "", "CA certificate (PEM) that signed the server's certificate; enables TLS")
	f.StringVar(&o.tlsCert, "tls-cert", "", "client certificate (PEM): the identity the export is bound to")
	f.StringVar(&o.tlsKey, "tls-key", "", "client private key (PEM file, mode 0600)")
	f.StringVar(&o.serverName, "tls-server-name", "", "name to verify in the server certificate (default: the --tcp host, or localhost)")
	f.BoolVar(&o.insecureTCP, "insecure-tcp", false, "allow --tcp without TLS")
	f.DurationVar(&o.timeout, "timeout", 0, "kernel request timeout (0: none)")
	o.handshakeWithin = 30 * time.Second
	return cmd
}

// check validates the flags, before anything is opened.
func (o *attachOptions) check() error {
	switch {
	case o.export == "":
		return errors.New("missing required flag --export")
	case (o.socket == "") == (o.tcp == ""):
		return errors.New("give exactly one of --socket PATH and --tcp HOST:PORT")
	case (o.tlsCert == "") != (o.tlsKey == ""):
		return errors.New("--tls-cert and --tls-key go together")
	case o.tlsCert != "" && o.tlsCA == "":
		return errors.New("--tls-cert needs --tls-ca (the CA of the server's certificate)")
	case o.tcp != "" && o.tlsCA == "" && !o.insecureTCP:
		return errors.New("--tcp needs TLS (--tls-ca, and --tls-cert/--tls-key for an export bound to a client identity), or --insecure-tcp")
	case o.timeout < 0:
		return errors.New("--timeout must not be negative")
	}
	if o.tcp != "" {
		if _, _, err := net.SplitHostPort(o.tcp); err != nil {
			return fmt.Errorf("--tcp %q: %w", o.tcp, err)
		}
	}
	return nil
}

// tlsConfig builds the client TLS configuration from files; nil without --tls-ca.
func (o *attachOptions) tlsConfig() (*tls.Config, error) {
	if o.tlsCA == "" {
		return nil, nil
	}
	caPEM, err := os.ReadFile(o.tlsCA)
	if err != nil {
		return nil, fmt.Errorf("--tls-ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("--tls-ca: no PEM certificate in %s", o.tlsCA)
	}
	name := o.serverName
	if name == "" {
		name = "localhost"
		if o.tcp != "" {
			name, _, _ = net.SplitHostPort(o.tcp)
		}
	}
	tc := &tls.Config{RootCAs: pool, ServerName: name, MinVersion: tls.VersionTLS12}
	if o.tlsCert != "" {
		keyPEM, err := psp.ReadPrivateFile(o.tlsKey)
		if err != nil {
			return nil, fmt.Errorf("--tls-key: %w", err)
		}
		certPEM, err := os.ReadFile(o.tlsCert)
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

// runAttach negotiates, attaches, waits for the end (server gone or ctx done) and detaches.
func runAttach(ctx context.Context, o attachOptions, log *slog.Logger) error {
	if err := o.check(); err != nil {
		return err
	}
	tc, err := o.tlsConfig()
	if err != nil {
		return err
	}
	network, addr := "unix", o.socket
	if o.tcp != "" {
		network, addr = "tcp", o.tcp
	}
	hctx, cancel := context.WithTimeout(ctx, o.handshakeWithin)
	defer cancel()
	raw, err := (&net.Dialer{}).DialContext(hctx, network, addr)
	if err != nil {
		return fmt.Errorf("failed to connect to the NBD server: %w", err)
	}
	defer raw.Close()
	conn, info, err := nbd.ClientNegotiate(hctx, raw, o.export, tc)
	switch {
	case errors.Is(err, nbd.ErrExportUnknown):
		return fmt.Errorf("export %q unknown on %s (or not allowed for this client certificate): %w", o.export, addr, err)
	case errors.Is(err, nbd.ErrTLSRequired):
		return fmt.Errorf("%s requires TLS: give --tls-ca, --tls-cert and --tls-key: %w", addr, err)
	case err != nil:
		return fmt.Errorf("failed to open export %q on %s: %w", o.export, addr, err)
	}
	bs, err := kernelBlockSize(info)
	if err != nil {
		return err
	}

	if err := checkNBDDevice(o.device); err != nil {
		return err
	}
	dev, err := os.OpenFile(o.device, os.O_RDWR, 0)
	if err != nil {
		if errors.Is(err, fs.ErrPermission) {
			return fmt.Errorf("failed to open %s: %w (attach needs root)", o.device, err)
		}
		return fmt.Errorf("failed to open %s: %w", o.device, err)
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
		{"NBD_SET_TIMEOUT", nbdioctl.NEGOTIATION_IOCTL_SET_TIMEOUT, uintptr(o.timeout / time.Second)},
		{"NBD_SET_SOCK", nbdioctl.NEGOTIATION_IOCTL_SET_SOCK, sock.Fd()},
	} {
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, fd, step.req, step.arg); e != 0 {
			if e == unix.EBUSY {
				return fmt.Errorf("%s is already in use by another NBD connection", o.device)
			}
			return fmt.Errorf("failed to configure %s (%s): %w", o.device, step.name, e)
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
	log.Info("attached", "device", o.device, "export", o.export, "server", addr, "size", info.Size,
		"block_size", bs, "read_only", info.ReadOnly(), "tls", relay != nil)

	var runErr error
	select {
	case <-ctx.Done():
		log.Info("detaching", "device", o.device)
		if err := dev.Sync(); err != nil { // page cache out, then an NBD FLUSH
			log.Warn("failed to flush before detaching", "device", o.device, "err", err)
		}
		// go-nbd's Disconnect: clear the queue, send NBD_CMD_DISC, clear the socket.
		if err := nbdclient.Disconnect(dev); err != nil {
			runErr = fmt.Errorf("failed to detach %s: %w", o.device, err)
		}
		<-doIt
	case err := <-doIt:
		runErr = fmt.Errorf("the connection to the server ended; %s detached", o.device)
		if err != nil {
			runErr = fmt.Errorf("%s: %w; detached", o.device, err)
		}
		unix.Syscall(unix.SYS_IOCTL, fd, nbdioctl.TRANSMISSION_IOCTL_CLEAR_SOCK, 0)
	case err := <-relayErr:
		runErr = fmt.Errorf("TLS relay ended: %v; detaching %s", err, o.device)
		nbdclient.Disconnect(dev)
		<-doIt
	}
	sock.Close()
	conn.Close()
	wg.Wait()
	if runErr == nil {
		log.Info("detached", "device", o.device)
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
