// Package daemon is the running service behind `sealdisk serve`: it owns the engine, the PSP,
// the NBD server and the FUSE mount, and attaches and detaches VMs — at start, on a config
// reload (SIGHUP) and through the admin API on a Unix socket. cmd/sealdisk only parses flags
// and signals; everything a running server does to a VM is here, in one place.
package daemon

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/sealdisk/sealdisk/broker"
	"github.com/sealdisk/sealdisk/config"
	"github.com/sealdisk/sealdisk/engine"
	"github.com/sealdisk/sealdisk/fusefs"
	"github.com/sealdisk/sealdisk/image"
	"github.com/sealdisk/sealdisk/nbd"
	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/store"
	"github.com/sealdisk/sealdisk/store/locate"
)

// Errors the admin API maps to HTTP status codes.
var (
	// ErrUnknownVM: no VM of that name is attached.
	ErrUnknownVM = errors.New("no such VM is attached")
	// ErrConflict: the name, export or ASID is already in use by an attached VM.
	ErrConflict = errors.New("already in use")
	// ErrNoReload: the daemon was started without a way to re-read its configuration.
	ErrNoReload = errors.New("configuration reload is not available")
	// ErrClosed: the daemon is shutting down.
	ErrClosed = errors.New("daemon is shutting down")
)

// Options configure New.
type Options struct {
	Config *config.Config
	Logger *slog.Logger
	// Reload re-reads the configuration (file, environment, flags) for SIGHUP and the admin
	// reload call. Nil: reload is refused with ErrNoReload.
	Reload  func() (*config.Config, error)
	Version string
}

// Source says who attached a VM: the config file's VMs follow reloads; VMs attached through
// the admin API stay until detached through it (or a reload lists a VM of the same name).
type Source string

const (
	FromConfig Source = "config"
	FromAdmin  Source = "admin"
)

// VM is one attached VM: its disks, each with its own key slot under the VM's ASID, attached
// and detached together.
type VM struct {
	Config   config.VMConfig
	Source   Source
	Launch   *psp.Launch // the first disk's launch: the VM's ASID, measurement, attestation
	Disks    []*Disk     // config.VMConfig.AllDisks order: disks[] (or image), then nvram
	Attached time.Time
}

// Disk is one attached disk of a VM.
type Disk struct {
	Config config.DiskConfig // with defaults filled in (AllDisks)
	Index  int
	Launch *psp.Launch // Launch.Slot is its engine key slot
	Dev    *engine.Disk
	// File is the image file's (dev, inode): the key of Daemon.images.
	File string // the image store's Identity
	// provider is the key that signed the image's certificate (PKIX DER), so a reload can
	// say which attached VMs' providers are no longer trusted.
	provider []byte
}

// name is how errors and logs call disk i of vm: "disk 1 (/var/lib/sealdisk/data.img)".
func diskName(i int, dc config.DiskConfig) string {
	if dc.NVRAM {
		return fmt.Sprintf("nvram (%s)", dc.Image)
	}
	return fmt.Sprintf("disk %d (%s)", i, dc.Image)
}

// owner is one attached disk holding an image file (Daemon.images).
type owner struct {
	vm       string
	disk     int
	multi    bool // the VM has more than one disk: name the disk in refusals
	readOnly bool
	image    string
}

// Daemon is a running sealdisk service. Its methods are safe for concurrent use.
type Daemon struct {
	opts    Options
	log     *slog.Logger
	eng     *engine.Engine
	psp     *psp.PSP
	srv     *nbd.Server // nil without NBD listeners
	mnt     *fusefs.FS  // nil without a FUSE mount point
	metrics *metrics
	started time.Time

	// mu guards cfg, vms, images and closed, and serialises attach, detach and reload, so two
	// admin calls (or a call and a SIGHUP) never race on one VM. Held across the slow PSP and
	// engine work on purpose: these are rare operator actions.
	mu     sync.Mutex
	cfg    *config.Config
	vms    map[string]*VM
	closed bool
	// images lists the VMs attached to each image file, by (dev, inode) whatever path each
	// was configured with: one VM read-write, or any number read-only. The file lock
	// (store.File.Lock) enforces the same rule against other processes; this map is what
	// lets a refusal inside the daemon name the VM that holds the image.
	images map[string][]owner

	wg       sync.WaitGroup // listener goroutines (NBD, admin, metrics)
	errc     chan error     // a listener that failed for good
	httpSrvs []*http.Server
	cancel   context.CancelFunc
	failures map[string]string // VM name -> why its last attach failed (for status)
}

// New starts the service: engine, PSP, the configured VMs (a VM whose checks fail is logged
// and skipped), NBD listeners, the FUSE mount and the admin socket. It fails if the
// configuration lists VMs and none of them could be attached, or a listener cannot start.
func New(opts Options) (_ *Daemon, err error) {
	cfg := opts.Config
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	log := opts.Logger
	if cfg.PSP.Dir == "" {
		return nil, errors.New("no PSP: set psp.dir (or --psp)")
	}
	if len(cfg.NBD.Listen) == 0 && cfg.FUSE.Mountpoint == "" {
		return nil, errors.New("nothing to serve on: set nbd.listen (--nbd unix:PATH) and/or fuse.mountpoint")
	}
	cacheSize, _ := config.ParseSize(cfg.Engine.CacheSize) // validated by config
	idle, _ := time.ParseDuration(cfg.Engine.IdleFlush)
	placed, _ := cfg.Engine.PlacedBytes()
	d := &Daemon{
		opts: opts, log: log, cfg: cfg, vms: map[string]*VM{}, images: map[string][]owner{}, started: time.Now(),
		errc: make(chan error, 8), failures: map[string]string{},
	}
	d.eng = engine.New(engine.Options{Shards: cfg.Engine.Shards, CacheBytes: int64(cacheSize), IdleFlush: idle, NoMap: !cfg.Engine.Mmap, PlacedBytes: placed, Logger: log})
	d.metrics = newMetrics(d)
	defer func() {
		if err != nil {
			d.Close(context.Background())
		}
	}()
	fetcher, err := broker.NewClient(broker.ClientOptions{
		CAFile: cfg.PSP.BrokerCA, CertFile: cfg.PSP.BrokerClientCert, KeyFile: cfg.PSP.BrokerClientKey, Attempts: cfg.PSP.BrokerAttempts,
	})
	if err != nil {
		return nil, fmt.Errorf("psp.broker_*: %w", err)
	}
	if d.psp, err = psp.Open(cfg.PSP.Dir, psp.Options{ASIDs: cfg.PSP.ASIDs, Binder: d.eng, Fetcher: fetcher, Logger: log,
		OnLeaseEnd: func(a psp.ASID, vm string) { go d.leaseEnded(a, vm) }}); err != nil {
		return nil, err
	}
	if len(cfg.NBD.Listen) > 0 {
		nopts := nbd.Options{Logger: log, Metrics: d.metrics.nbd}
		if cfg.NBD.TLSCert != "" {
			if nopts.TLS, err = serverTLS(cfg.NBD); err != nil {
				return nil, err
			}
			nopts.RequireTLS = true
		}
		d.srv = nbd.NewServer(nopts)
	}
	if cfg.FUSE.Mountpoint != "" {
		d.mnt, err = fusefs.Mount(fusefs.Options{Mountpoint: cfg.FUSE.Mountpoint, AllowOther: cfg.FUSE.AllowOther, Logger: log})
		if err != nil {
			return nil, err
		}
		log.Info("serving FUSE", "mountpoint", cfg.FUSE.Mountpoint)
	}
	for _, vm := range cfg.VMs {
		if err := d.attach(vm, FromConfig); err != nil {
			log.Error("VM not attached", "vm", vm.Name, "reason", err)
		}
	}
	if len(d.vms) == 0 && len(cfg.VMs) > 0 {
		return nil, errors.New("no VM could be attached (see the log for each reason)")
	}
	ctx, cancel := context.WithCancel(context.Background())
	d.cancel = cancel
	for _, l := range cfg.NBD.Listen {
		ln, err := listenNBD(l, cfg.NBD)
		if err != nil {
			return nil, err
		}
		log.Info("serving NBD", "listen", l)
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			if err := d.srv.Serve(ctx, ln); err != nil && !errors.Is(err, nbd.ErrServerClosed) {
				d.errc <- fmt.Errorf("NBD listener %s: %w", l, err)
			}
		}()
	}
	if cfg.Admin.Socket != "" {
		ln, err := nbd.ListenUnix(cfg.Admin.Socket, 0o600)
		if err != nil {
			return nil, fmt.Errorf("admin.socket: %w", err)
		}
		d.serveHTTP(ln, d.adminHandler(), "admin API")
		log.Info("serving admin API", "socket", cfg.Admin.Socket)
	}
	if m := cfg.Admin.MetricsListen; m != "" {
		kind, addr, _ := strings.Cut(m, ":")
		var ln net.Listener
		if kind == "unix" {
			ln, err = nbd.ListenUnix(addr, 0o660)
		} else {
			ln, err = net.Listen("tcp", addr)
		}
		if err != nil {
			return nil, fmt.Errorf("admin.metrics_listen: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", d.metrics.handler())
		d.serveHTTP(ln, mux, "metrics")
		log.Info("serving metrics", "listen", m)
	}
	return d, nil
}

// Errors reports a listener that failed for good; the caller should shut down.
func (d *Daemon) Errors() <-chan error { return d.errc }

func (d *Daemon) serveHTTP(ln net.Listener, h http.Handler, what string) {
	hs := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, ErrorLog: slog.NewLogLogger(d.log.Handler(), slog.LevelWarn)}
	d.httpSrvs = append(d.httpSrvs, hs)
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		if err := hs.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.errc <- fmt.Errorf("%s listener: %w", what, err)
		}
	}()
}

// Attach runs the PSP flow for vm and serves its disk (NBD export and FUSE file). It is the
// admin API's attach: the VM stays until detached through the API.
func (d *Daemon) Attach(vm config.VMConfig) error {
	if err := vm.Check(d.psp.MaxASIDs()); err != nil {
		d.metrics.attachFailures.Inc()
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	return d.attach(vm, FromAdmin)
}

// attach does the work of Attach; the caller holds mu (or is New, before any caller). The
// VM's disks attach in order, disk 0 first (it allocates the VM's ASID); a disk that fails
// detaches the ones before it, and the error names the disk.
func (d *Daemon) attach(vm config.VMConfig, src Source) (err error) {
	defer func() {
		if err != nil {
			d.failures[vm.Name] = err.Error()
			d.metrics.attachFailures.Inc()
		} else {
			delete(d.failures, vm.Name)
		}
	}()
	disks := vm.AllDisks()
	for _, o := range d.vms {
		if o.Config.Name == vm.Name {
			return fmt.Errorf("failed to attach VM %q: %w: a VM of that name is attached", vm.Name, ErrConflict)
		}
		if vm.ASID != 0 && o.Launch.ASID == psp.ASID(vm.ASID) {
			return fmt.Errorf("failed to attach VM %q: %w: ASID %d is VM %q's", vm.Name, ErrConflict, vm.ASID, o.Config.Name)
		}
		for _, od := range o.Disks {
			for _, nd := range disks {
				switch {
				case !nd.NVRAM && !od.Config.NVRAM && nd.Export == od.Config.Export:
					return fmt.Errorf("failed to attach VM %q: %w: export %q is VM %q's", vm.Name, ErrConflict, nd.Export, o.Config.Name)
				case nd.File == od.Config.File && d.mnt != nil:
					return fmt.Errorf("failed to attach VM %q: %w: FUSE file %q is VM %q's", vm.Name, ErrConflict, nd.File, o.Config.Name)
				}
			}
		}
	}
	a := &VM{Config: vm, Source: src, Attached: time.Now()}
	for i, dc := range disks {
		ad, err := d.attachDisk(a, i, dc, len(disks) > 1)
		if err != nil {
			undo := d.detachDisks(context.Background(), a)
			if len(disks) > 1 {
				err = fmt.Errorf("failed to attach VM %q: %s: %w", vm.Name, diskName(i, dc), err)
				if len(a.Disks) > 0 {
					d.log.Warn("VM not attached: the disks before the one that failed were detached again", "vm", vm.Name, "failed", diskName(i, dc), "detached", len(a.Disks))
				}
			}
			return errors.Join(err, undo)
		}
		a.Disks = append(a.Disks, ad)
		if i == 0 {
			a.Launch = ad.Launch
		}
	}
	d.vms[vm.Name] = a
	for _, ad := range a.Disks {
		d.log.Info("VM disk attached", "vm", vm.Name, "source", src, "asid", ad.Launch.ASID, "disk", ad.Index,
			"export", exportOf(ad), "file", ad.Config.File, "size", ad.Dev.Size(), "read_only", ad.Dev.Caps().ReadOnly)
	}
	return nil
}

// exportOf is the NBD export name of a disk, "" for an NVRAM (FUSE only).
func exportOf(ad *Disk) string {
	if ad.Config.NVRAM {
		return ""
	}
	return ad.Config.Export
}

// attachDisk opens, locks, launches and serves disk i of a (a.Launch is disk 0's once it is
// attached). On an error nothing of this disk is left: the caller detaches a.Disks.
func (d *Daemon) attachDisk(a *VM, i int, dc config.DiskConfig, multi bool) (*Disk, error) {
	vm := a.Config
	st, err := locate.Open(dc.Image, dc.ReadOnly, d.cfg.Ceph.RBD())
	if err != nil {
		return nil, err
	}
	img, err := image.OpenStore(st)
	if err != nil {
		return nil, err
	}
	file, err := d.claimImage(vm.Name, i, dc, multi, img.Store)
	if err != nil {
		img.Close()
		return nil, err
	}
	req := psp.LaunchRequest{VM: vm.Name, Cert: img.Cert, Header: img.Header, FirmwarePath: vm.Firmware, ASID: psp.ASID(vm.ASID), Disk: i}
	if i > 0 {
		req.ASID = a.Launch.ASID
	}
	l, err := d.psp.Launch(req)
	if err != nil {
		d.release(vm.Name, i, file)
		img.Close()
		return nil, err
	}
	dev, err := d.eng.Attach(l.Slot, img.Store, dc.ReadOnly)
	if err != nil {
		d.release(vm.Name, i, file)
		img.Close()
		return nil, errors.Join(err, d.psp.Detach(l.Slot))
	}
	ad := &Disk{Config: dc, Index: i, Launch: l, Dev: dev, File: file, provider: img.Cert.ProviderKey}
	if d.srv != nil && !dc.NVRAM {
		err = d.srv.AddExport(nbd.Export{Name: dc.Export, Description: fmt.Sprintf("sealdisk VM %s disk %d", vm.Name, i), Device: dev, AllowedIdentity: vm.Identity})
		if err != nil {
			d.release(vm.Name, i, file)
			return nil, errors.Join(err, d.psp.Detach(l.Slot))
		}
	}
	if d.mnt != nil {
		if err = d.mnt.AddFile(dc.File, dev); err != nil {
			if d.srv != nil && !dc.NVRAM {
				err = errors.Join(err, d.srv.RemoveExport(context.Background(), dc.Export))
			}
			d.release(vm.Name, i, file)
			return nil, errors.Join(err, d.psp.Detach(l.Slot))
		}
	}
	return ad, nil
}

// claimImage locks the image file f for disk i of VM vm: exclusive for a read-write disk,
// shared for a read-only one. An image another attached disk (of any VM, this one included)
// holds in a way that excludes this one's (either of them writes) is refused naming that VM;
// one held by another process is refused by the lock. It records the claim in d.images and
// returns the file's identity; the lock goes when the engine closes f at detach. The caller
// holds mu.
func (d *Daemon) claimImage(vm string, i int, dc config.DiskConfig, multi bool, f store.Image) (string, error) {
	id, err := f.Identity()
	if err != nil {
		return id, fmt.Errorf("failed to attach VM %q: %w", vm, err)
	}
	for _, o := range d.images[id] {
		if dc.ReadOnly && o.readOnly {
			continue
		}
		how := "read-write"
		if o.readOnly {
			how = "read-only"
		}
		same := ""
		if o.image != dc.Image {
			same = fmt.Sprintf(" as %s, the same file", o.image)
		}
		if o.multi {
			same += fmt.Sprintf(" (its disk %d)", o.disk)
		}
		return id, fmt.Errorf("failed to attach VM %q: image %s: %w: VM %q has it attached %s%s",
			vm, dc.Image, store.ErrLocked, o.vm, how, same)
	}
	if err := f.Lock(!dc.ReadOnly); err != nil {
		return id, fmt.Errorf("failed to attach VM %q: %w", vm, err)
	}
	d.images[id] = append(d.images[id], owner{vm: vm, disk: i, multi: multi, readOnly: dc.ReadOnly, image: dc.Image})
	return id, nil
}

// release forgets that disk i of VM vm holds image file id (its store is closed, or about
// to be).
func (d *Daemon) release(vm string, i int, id string) {
	owners := slices.DeleteFunc(d.images[id], func(o owner) bool { return o.vm == vm && o.disk == i })
	if len(owners) == 0 {
		delete(d.images, id)
	} else {
		d.images[id] = owners
	}
}

// detachDisks stops serving a's disks, the last first (disk 0 holds the ASID the others' key
// slots are under), and forgets them; it returns every error on the way.
func (d *Daemon) detachDisks(ctx context.Context, a *VM) error {
	var errs []error
	for j := len(a.Disks) - 1; j >= 0; j-- {
		ad := a.Disks[j]
		if d.mnt != nil {
			if err := d.mnt.RemoveFile(ad.Config.File); err != nil {
				errs = append(errs, err)
			}
		}
		if d.srv != nil && !ad.Config.NVRAM {
			if err := d.srv.RemoveExport(ctx, ad.Config.Export); err != nil {
				errs = append(errs, err)
			}
		}
		if err := d.psp.Detach(ad.Launch.Slot); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", diskName(ad.Index, ad.Config), err))
		}
		d.release(a.Config.Name, ad.Index, ad.File)
	}
	a.Disks = nil
	return errors.Join(errs...)
}

// Detach stops serving the VM: its FUSE file disappears (open handles then fail), its NBD
// connections finish what is in flight and close, the disk is written back and its cache
// zeroised, and the PSP clears the key slot and frees the ASID. ctx bounds the wait for NBD
// clients; after it expires they are cut off.
func (d *Daemon) Detach(ctx context.Context, name string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	return d.detach(ctx, name)
}

func (d *Daemon) detach(ctx context.Context, name string) error {
	a := d.vms[name]
	if a == nil {
		return fmt.Errorf("failed to detach %q: %w", name, ErrUnknownVM)
	}
	asid := a.Launch.ASID
	err := d.detachDisks(ctx, a)
	delete(d.vms, name)
	if err != nil {
		d.log.Error("VM detached with errors", "vm", name, "error", err)
		return fmt.Errorf("failed to detach %q cleanly: %w", name, err)
	}
	d.log.Info("VM detached", "vm", name, "asid", asid)
	return nil
}

// leaseEnded detaches a VM whose remote key's lease ran out unrenewed (the broker was
// unreachable or refused: a revoked key): the PSP has cleared its key already, so its export
// and FUSE file go and its image is unlocked. Status lists the reason under not_attached; a
// reload or an admin attach attaches it again once the broker releases the key.
func (d *Daemon) leaseEnded(a psp.ASID, vm string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	v := d.vms[vm]
	if d.closed || v == nil || !slices.ContainsFunc(v.Disks, func(ad *Disk) bool { return ad.Launch.Slot == a }) {
		return
	}
	d.log.Warn("VM detached: its remote key's lease ended without renewal", "vm", vm, "asid", a)
	d.detach(context.Background(), vm)
	d.failures[vm] = "remote key lease ended without renewal (broker unreachable or key revoked)"
}

// ReloadResult says what a reload changed.
type ReloadResult struct {
	Attached []string          `json:"attached"`
	Detached []string          `json:"detached"`
	Failed   map[string]string `json:"failed,omitempty"` // VM name -> reason
	// Restart lists changed config sections, and changed chip identity files of the PSP
	// directory ("psp.dir/chip.crt"), that take effect only at the next start.
	Restart []string `json:"restart,omitempty"`
	// Untrusted lists attached VMs whose provider the reloaded trust store no longer holds:
	// they keep running (their keys are bound) until detached; a new attach of them fails.
	Untrusted []string `json:"untrusted,omitempty"`
}

// Reload re-reads the configuration and the PSP directory's trust store, and brings the
// config's VMs in line with them: VMs no longer listed (or listed with other settings) are
// detached, newly listed ones and ones whose earlier attach failed are attached, under the
// trust store as it is now (a provider added is accepted, one removed refused). VMs attached
// through the admin API are left alone unless the config now names one. A configuration or
// trust store that does not load changes nothing.
func (d *Daemon) Reload(ctx context.Context) (*ReloadResult, error) {
	if d.opts.Reload == nil {
		return nil, ErrNoReload
	}
	cfg, err := d.opts.Reload()
	if err != nil {
		return nil, fmt.Errorf("failed to reload config (nothing changed): %w", err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, ErrClosed
	}
	changedIdentity, err := d.psp.Reload()
	if err != nil {
		return nil, fmt.Errorf("failed to reload (nothing changed): %w", err)
	}
	res := &ReloadResult{Failed: map[string]string{}}
	for _, f := range changedIdentity {
		res.Restart = append(res.Restart, "psp.dir/"+f)
		d.log.Warn("PSP identity file changed; it takes effect at the next start", "file", f)
	}
	want := map[string]config.VMConfig{}
	for _, vm := range cfg.VMs {
		want[vm.Name] = vm
	}
	var gone []string
	for name, a := range d.vms {
		w, listed := want[name]
		if (a.Source == FromConfig && !listed) || (listed && !reflect.DeepEqual(w, a.Config)) {
			gone = append(gone, name)
		} else if listed && a.Source == FromAdmin {
			a.Source = FromConfig // the config now owns it
		}
	}
	slices.Sort(gone)
	for _, name := range gone {
		if err := d.detach(ctx, name); err != nil {
			res.Failed[name] = err.Error()
		}
		res.Detached = append(res.Detached, name)
	}
	for _, vm := range cfg.VMs {
		if d.vms[vm.Name] != nil {
			continue
		}
		if err := d.attach(vm, FromConfig); err != nil {
			d.log.Error("VM not attached", "vm", vm.Name, "reason", err)
			res.Failed[vm.Name] = err.Error()
			continue
		}
		res.Attached = append(res.Attached, vm.Name)
	}
	old := *d.cfg
	for _, s := range []struct {
		key      string
		old, new any
	}{
		{"log", old.Log, cfg.Log}, {"psp", old.PSP, cfg.PSP}, {"engine", old.Engine, cfg.Engine},
		{"nbd", old.NBD, cfg.NBD}, {"fuse", old.FUSE, cfg.FUSE}, {"admin", old.Admin, cfg.Admin},
	} {
		if !reflect.DeepEqual(s.old, s.new) {
			res.Restart = append(res.Restart, s.key)
			d.log.Warn("config section changed; it takes effect at the next start", "key", s.key)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(d.vms)) {
		if slices.ContainsFunc(d.vms[name].Disks, func(ad *Disk) bool { return !d.psp.Trusts(ad.provider) }) {
			res.Untrusted = append(res.Untrusted, name)
			d.log.Warn("attached VM's provider is no longer trusted; it keeps running until detached", "vm", name)
		}
	}
	d.cfg = cfg
	d.log.Info("config reloaded", "attached", res.Attached, "detached", res.Detached, "failed", len(res.Failed))
	return res, nil
}

// Attest signs an attestation report of the launch of the named VM's disk (0: its first), for
// the caller's nonce.
func (d *Daemon) Attest(name string, disk int, nonce []byte) ([]byte, error) {
	d.mu.Lock()
	a := d.vms[name]
	d.mu.Unlock()
	if a == nil {
		return nil, fmt.Errorf("failed to attest %q: %w", name, ErrUnknownVM)
	}
	if disk < 0 || disk >= len(a.Disks) {
		return nil, badRequest(fmt.Errorf("failed to attest %q: it has disks 0..%d, not %d", name, len(a.Disks)-1, disk))
	}
	return d.psp.AttestLaunch(a.Disks[disk].Launch, nonce)
}

// Close stops accepting, lets NBD requests in flight finish (ctx bounds the wait), unmounts
// FUSE, detaches every VM (writing back, zeroising caches and key slots) and stops the
// engine. A busy FUSE mount is reported, not waited on.
func (d *Daemon) Close(ctx context.Context) error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	d.mu.Unlock()
	var errs []error
	for _, hs := range d.httpSrvs {
		if err := hs.Shutdown(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	if d.srv != nil {
		errs = append(errs, d.srv.Shutdown(ctx))
	}
	if d.cancel != nil {
		d.cancel()
	}
	d.wg.Wait()
	if d.mnt != nil {
		if err := d.mnt.Unmount(); err != nil {
			d.log.Error("FUSE unmount", "error", err)
			errs = append(errs, err)
		}
	}
	d.mu.Lock()
	names := make([]string, 0, len(d.vms))
	for name := range d.vms {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		a := d.vms[name]
		for j := len(a.Disks) - 1; j >= 0; j-- {
			ad := a.Disks[j]
			if err := d.psp.Detach(ad.Launch.Slot); err != nil {
				errs = append(errs, fmt.Errorf("detach %s %s: %w", name, diskName(ad.Index, ad.Config), err))
			}
			d.release(name, ad.Index, ad.File)
		}
		delete(d.vms, name)
	}
	d.mu.Unlock()
	errs = append(errs, d.eng.Close())
	return errors.Join(errs...)
}

// serverTLS builds the NBD server's TLS config from nbd.tls_cert/tls_key/tls_client_ca.
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
