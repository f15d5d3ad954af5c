package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/sealdisk/sealdisk/config"
	"github.com/sealdisk/sealdisk/engine"
	"github.com/sealdisk/sealdisk/fusefs"
	"github.com/sealdisk/sealdisk/image"
	"github.com/sealdisk/sealdisk/nbd"
	"github.com/sealdisk/sealdisk/psp"
)

func serveCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Attach sealed images to VMs and serve them over NBD and FUSE",
		Long: `Runs the PSP flow for every configured VM — firmware measured and checked, certificate
verified and opened, key bound to the VM's ASID in the engine — and serves each attached disk
as an NBD export (Unix socket by default; TCP only with TLS unless nbd.insecure_tcp) and, when
fuse.mountpoint is set, as MOUNTPOINT/NAME.raw. A VM whose checks fail is not attached (the
reason is logged) and the others still serve. SIGTERM/SIGINT: stop accepting, finish in-flight
requests, flush, unmount, zeroise keys, exit 0.

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
			return serve(cfg)
		},
	}
	f := cmd.Flags()
	f.String("psp-dir", "", "PSP directory (config psp.dir)")
	f.Int("psp-asids", psp.DefaultASIDs, "ASID pool size (config psp.asids)")
	f.Int("engine-shards", 0, "engine shards, 0 = one per core (config engine.shards)")
	f.String("engine-cache-size", "256M", "write-back cache per disk (config engine.cache_size)")
	f.String("engine-idle-flush", "5s", "write back sectors dirty this long (config engine.idle_flush)")
	f.StringSlice("nbd-listen", nil, "NBD listener: unix:PATH or tcp:HOST:PORT (config nbd.listen)")
	f.Bool("nbd-insecure-tcp", false, "allow TCP without TLS (config nbd.insecure_tcp)")
	f.String("nbd-tls-cert", "", "TLS server certificate (config nbd.tls_cert)")
	f.String("nbd-tls-key", "", "TLS server key, mode 0600 (config nbd.tls_key)")
	f.String("nbd-tls-client-ca", "", "CA of client certificates (config nbd.tls_client_ca)")
	f.String("fuse-mountpoint", "", "FUSE mount point (config fuse.mountpoint)")
	f.Bool("fuse-allow-other", false, "let other users open the files (config fuse.allow_other)")
	// quick start: one VM from flags
	f.String("psp", "", "PSP directory (same as --psp-dir)")
	f.String("image", "", "quick start: the sealed image of a single VM")
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

// attached is one VM being served.
type attached struct {
	vm   config.VMConfig
	asid psp.ASID
	disk *engine.Disk
}

func serve(cfg *config.Config) error {
	log := slog.Default()
	if cfg.PSP.Dir == "" {
		return errors.New("no PSP: set psp.dir (or --psp)")
	}
	if len(cfg.NBD.Listen) == 0 && cfg.FUSE.Mountpoint == "" {
		return errors.New("nothing to serve on: set nbd.listen (--nbd unix:PATH) and/or fuse.mountpoint")
	}
	cacheSize, _ := config.ParseSize(cfg.Engine.CacheSize)
	idle, _ := time.ParseDuration(cfg.Engine.IdleFlush)
	eng := engine.New(engine.Options{Shards: cfg.Engine.Shards, CacheBytes: int64(cacheSize), IdleFlush: idle, Logger: log})
	p, err := psp.Open(cfg.PSP.Dir, psp.Options{ASIDs: cfg.PSP.ASIDs, Binder: eng})
	if err != nil {
		eng.Close()
		return err
	}
	var vms []*attached
	for _, vm := range cfg.VMs {
		a, err := attach(p, eng, vm)
		if err != nil {
			log.Error("VM not attached", "vm", vm.Name, "image", vm.Image, "reason", err)
			continue
		}
		log.Info("VM attached", "vm", vm.Name, "asid", a.asid, "export", vm.ExportName(), "size", a.disk.Size(), "read_only", a.disk.Caps().ReadOnly)
		vms = append(vms, a)
	}
	if len(vms) == 0 && len(cfg.VMs) > 0 {
		eng.Close()
		return errors.New("no VM could be attached (see the log for each reason)")
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var srv *nbd.Server
	var wg sync.WaitGroup
	serveErr := make(chan error, len(cfg.NBD.Listen))
	if len(cfg.NBD.Listen) > 0 {
		opts := nbd.Options{Logger: log}
		if cfg.NBD.TLSCert != "" {
			tc, err := serverTLS(cfg.NBD)
			if err != nil {
				eng.Close()
				return err
			}
			opts.TLS, opts.RequireTLS = tc, true
		}
		srv = nbd.NewServer(opts)
		for _, a := range vms {
			if err := srv.AddExport(nbd.Export{Name: a.vm.ExportName(), Description: "sealdisk VM " + a.vm.Name, Device: a.disk, AllowedIdentity: a.vm.Identity}); err != nil {
				eng.Close()
				return err
			}
		}
		for _, l := range cfg.NBD.Listen {
			ln, err := listen(l, cfg.NBD)
			if err != nil {
				srv.Shutdown(context.Background())
				eng.Close()
				return err
			}
			log.Info("serving NBD", "listen", l)
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := srv.Serve(ctx, ln); err != nil && !errors.Is(err, nbd.ErrServerClosed) {
					serveErr <- fmt.Errorf("NBD listener %s: %w", l, err)
				}
			}()
		}
	}
	var mnt *fusefs.FS
	if cfg.FUSE.Mountpoint != "" {
		mnt, err = fusefs.Mount(fusefs.Options{Mountpoint: cfg.FUSE.Mountpoint, AllowOther: cfg.FUSE.AllowOther, Logger: log})
		if err != nil {
			log.Error("FUSE mount failed", "error", err)
		} else {
			for _, a := range vms {
				if err := mnt.Add(a.vm.Name, a.disk); err != nil {
					log.Error("FUSE add failed", "vm", a.vm.Name, "error", err)
				}
			}
			log.Info("serving FUSE", "mountpoint", cfg.FUSE.Mountpoint)
		}
	}
	fmt.Fprintln(os.Stderr, "sealdisk: serving; SIGTERM or Ctrl-C to stop")

	var runErr error
	select {
	case <-ctx.Done():
		log.Info("stopping: finishing in-flight requests, flushing, zeroising keys")
	case runErr = <-serveErr:
		log.Error("listener failed; stopping", "error", runErr)
	}
	var errs []error
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if srv != nil {
		errs = append(errs, srv.Shutdown(sctx))
	}
	wg.Wait()
	if mnt != nil {
		if err := mnt.Unmount(); err != nil {
			log.Error("FUSE unmount", "error", err)
			errs = append(errs, err)
		}
	}
	for _, a := range vms {
		if err := p.Detach(a.asid); err != nil {
			errs = append(errs, fmt.Errorf("detach %s: %w", a.vm.Name, err))
		}
	}
	errs = append(errs, eng.Close(), runErr)
	if err := errors.Join(errs...); err != nil {
		return err
	}
	log.Info("stopped cleanly")
	return nil
}

// attach runs the PSP launch for one VM and attaches its image.
func attach(p *psp.PSP, eng *engine.Engine, vm config.VMConfig) (*attached, error) {
	img, err := image.Open(vm.Image, vm.ReadOnly)
	if err != nil {
		return nil, err
	}
	l, err := p.Launch(psp.LaunchRequest{VM: vm.Name, Cert: img.Cert, Header: img.Header, FirmwarePath: vm.Firmware, ASID: psp.ASID(vm.ASID)})
	if err != nil {
		img.Close()
		return nil, err
	}
	d, err := eng.Attach(l.ASID, img.Store, vm.ReadOnly)
	if err != nil {
		p.Detach(l.ASID)
		img.Close()
		return nil, err
	}
	return &attached{vm: vm, asid: l.ASID, disk: d}, nil
}

func listen(l string, c config.NBDConfig) (net.Listener, error) {
	kind, addr, _ := strings.Cut(l, ":")
	if kind == "unix" {
		return nbd.ListenUnix(addr, 0o660)
	}
	return nbd.ListenTCP(addr, c.TLSCert != "", c.InsecureTCP)
}

func serverTLS(c config.NBDConfig) (*tls.Config, error) {
	if _, err := psp.ReadPrivateFile(c.TLSKey); err != nil {
		return nil, fmt.Errorf("nbd.tls_key: %w", err)
	}
	cert, err := tls.LoadX509KeyPair(c.TLSCert, c.TLSKey)
	if err != nil {
		return nil, fmt.Errorf("failed to load NBD TLS certificate: %w", err)
	}
	tc := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}
	if c.TLSClientCA != "" {
		pem, err := os.ReadFile(c.TLSClientCA)
		if err != nil {
			return nil, fmt.Errorf("nbd.tls_client_ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("nbd.tls_client_ca: no certificate in %s", c.TLSClientCA)
		}
		tc.ClientCAs, tc.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return tc, nil
}
