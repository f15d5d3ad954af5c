package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/sealdisk/sealdisk/config"
	"github.com/sealdisk/sealdisk/daemon"
	"github.com/sealdisk/sealdisk/psp"
)

func serveCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Attach sealed images to VMs and serve them over NBD and FUSE",
		Long: `Runs the PSP flow for every configured VM — firmware measured and checked, certificate
verified and opened, key bound to the VM's ASID in the engine — and serves each attached disk
as an NBD export (Unix socket by default; TCP only with TLS unless nbd.insecure_tcp) and, when
fuse.mountpoint is set, as MOUNTPOINT/NAME.raw. A VM with vms[].disks[] has one export and
file per disk, each disk its own key slot under the VM's ASID, attached and detached together;
vms[].nvram is its UEFI variable store, the FUSE file NAME.nvram. A VM whose checks fail is not
attached (the reason is logged) and the others still serve. SIGTERM/SIGINT: stop accepting, finish in-flight
requests, flush, unmount, zeroise keys, exit 0. SIGHUP re-reads the config and the PSP's trust
store (psp trust add/remove): VMs no longer listed are detached, new ones attached (as are ones
whose attach failed before), under the trust store as it is now. An image attached read-write
is locked: a second attach of the same file, here or by another process, is refused.
With admin.socket set, 'sealdisk admin' attaches, detaches, attests and reports status.

Every config key is also a SEALDISK_* environment variable (SEALDISK_PSP_DIR) and, for the
keys below, a flag.`,
		Example: `  # quick start, no config file:
  sealdisk serve --psp psp --image vm1.img --firmware OVMF.fd --nbd-listen unix:/run/sealdisk/nbd.sock
  qemu-img info 'nbd+unix:///vm1?socket=/run/sealdisk/nbd.sock'

  # from a config file listing VMs:
  sealdisk serve --config /etc/sealdisk/sealdisk.yaml`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfgPath, _ := cmd.Flags().GetString("config")
			cfg, err := config.Load(cfgPath, cmd.Flags())
			if err != nil {
				return err
			}
			if err := quickStartVM(cmd, cfg); err != nil {
				return err
			}
			return serve(cmd, cfgPath, cfg)
		},
	}
	f := cmd.Flags()
	f.String("psp-dir", "", "PSP directory (config psp.dir)")
	f.Int("psp-asids", psp.DefaultASIDs, "ASID pool size (config psp.asids)")
	f.Int("engine-shards", 0, "engine shards, 0 = one per core (config engine.shards)")
	f.String("engine-cache-size", "256M", "write-back cache per disk (config engine.cache_size)")
	f.String("engine-idle-flush", "5s", "write back sectors dirty this long (config engine.idle_flush)")
	f.Bool("engine-mmap", true, "image reads through a shared read-only mapping; false: pread (config engine.mmap)")
	f.String("engine-placed-run", "64K", "shortest write (or pressured write-back run) written once in place; 0: off (config engine.placed_run)")
	f.StringSlice("nbd-listen", nil, "NBD listener: unix:PATH or tcp:HOST:PORT (config nbd.listen)")
	f.String("nbd-socket-mode", config.DefaultSocketMode, "mode of the NBD unix sockets, octal (config nbd.socket_mode)")
	f.String("nbd-socket-group", "", "group of the NBD unix sockets, a name or gid; default the service's (config nbd.socket_group)")
	f.Bool("nbd-insecure-tcp", false, "allow TCP without TLS (config nbd.insecure_tcp)")
	f.String("nbd-tls-cert", "", "TLS server certificate (config nbd.tls_cert)")
	f.String("nbd-tls-key", "", "TLS server key, mode 0600 (config nbd.tls_key)")
	f.String("nbd-tls-client-ca", "", "CA of client certificates (config nbd.tls_client_ca)")
	f.String("fuse-mountpoint", "", "FUSE mount point (config fuse.mountpoint)")
	f.Bool("fuse-allow-other", false, "let other users open the files (config fuse.allow_other)")
	f.String("admin-socket", "", "admin API Unix socket, mode 0600 (config admin.socket)")
	f.String("admin-metrics-listen", "", "Prometheus metrics: tcp:HOST:PORT or unix:PATH (config admin.metrics_listen)")
	// quick start: one VM from flags
	f.String("psp", "", "PSP directory (same as --psp-dir)")
	f.String("image", "", "quick start: the sealed image of a single VM (a file or rbd:POOL/IMAGE)")
	f.String("firmware", "", "quick start: that VM's firmware file")
	f.String("name", "", "quick start: VM and export name (default: the image file name without .img)")
	f.Bool("read-only", false, "quick start: attach read-only")
	f.String("nbd", "", "quick start: NBD listener (same as --nbd-listen)")
	return cmd
}

// quickStartVM turns --image/--firmware/--psp/--nbd into config.
func quickStartVM(cmd *cobra.Command, cfg *config.Config) error {
	fl := cmd.Flags()
	if p, _ := fl.GetString("psp"); p != "" {
		cfg.PSP.Dir = p
	}
	if l, _ := fl.GetString("nbd"); l != "" {
		cfg.NBD.Listen = append(cfg.NBD.Listen, l)
	}
	img, _ := fl.GetString("image")
	if img == "" {
		return nil
	}
	fw, _ := fl.GetString("firmware")
	name, _ := fl.GetString("name")
	ro, _ := fl.GetBool("read-only")
	if name == "" {
		base := img[strings.LastIndex(img, "/")+1:]
		name = strings.TrimSuffix(base, ".img")
	}
	cfg.VMs = append(cfg.VMs, config.VMConfig{Name: name, Image: img, Firmware: fw, ReadOnly: ro})
	return cfg.Validate()
}

func serve(cmd *cobra.Command, cfgPath string, cfg *config.Config) error {
	log := slog.Default()
	d, err := daemon.New(daemon.Options{
		Config: cfg, Logger: log, Version: version,
		Reload: func() (*config.Config, error) {
			c, err := config.Load(cfgPath, cmd.Flags())
			if err != nil {
				return nil, err
			}
			if err := quickStartVM(cmd, c); err != nil {
				return nil, err
			}
			return c, nil
		},
	})
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	fmt.Fprintln(os.Stderr, "sealdisk: serving; SIGHUP reloads the config, SIGTERM or Ctrl-C stops")

	var runErr error
loop:
	for {
		select {
		case <-ctx.Done():
			log.Info("stopping: finishing in-flight requests, flushing, zeroising keys")
			break loop
		case runErr = <-d.Errors():
			log.Error("listener failed; stopping", "error", runErr)
			break loop
		case <-hup:
			log.Info("SIGHUP: reloading config")
			rctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			if _, err := d.Reload(rctx); err != nil {
				log.Error("reload failed", "error", err)
			}
			cancel()
		}
	}
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := errors.Join(d.Close(sctx), runErr); err != nil {
		return err
	}
	log.Info("stopped cleanly")
	return nil
}
