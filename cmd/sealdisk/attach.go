package main

import (
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/sealdisk/sealdisk/kernelnbd"
)

func attachCmd() *cobra.Command {
	var o kernelnbd.Options
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
			o.Device = args[0]
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return kernelnbd.Attach(ctx, o, slog.Default())
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Export, "export", "", "export name (the VM's export in sealdisk serve)")
	f.StringVar(&o.Socket, "socket", "", "server Unix socket")
	f.StringVar(&o.TCP, "tcp", "", "server TCP address HOST:PORT (needs TLS)")
	f.StringVar(&o.TLSCA, "tls-ca", "", "CA certificate (PEM) that signed the server's certificate; enables TLS")
	f.StringVar(&o.TLSCert, "tls-cert", "", "client certificate (PEM): the identity the export is bound to")
	f.StringVar(&o.TLSKey, "tls-key", "", "client private key (PEM file, mode 0600)")
	f.StringVar(&o.ServerName, "tls-server-name", "", "name to verify in the server certificate (default: the --tcp host, or localhost)")
	f.BoolVar(&o.InsecureTCP, "insecure-tcp", false, "allow --tcp without TLS")
	f.DurationVar(&o.Timeout, "timeout", 0, "kernel request timeout (0: none)")
	o.HandshakeWithin = 30 * time.Second
	return cmd
}
