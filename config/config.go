// Package config loads sealdisk's configuration with viper: a YAML file, then SEALDISK_*
// environment variables, then flags, in rising precedence. Unknown keys and bad values fail
// at load time with an error naming the key.
package config

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"

	"github.com/sealdisk/sealdisk/store/rbd"
)

// Config is the whole configuration.
type Config struct {
	Log    LogConfig    `mapstructure:"log"`
	PSP    PSPConfig    `mapstructure:"psp"`
	Engine EngineConfig `mapstructure:"engine"`
	NBD    NBDConfig    `mapstructure:"nbd"`
	FUSE   FUSEConfig   `mapstructure:"fuse"`
	Admin  AdminConfig  `mapstructure:"admin"`
	Ceph   CephConfig   `mapstructure:"ceph"`
	VMs    []VMConfig   `mapstructure:"vms"`
}

// CephConfig says how to reach the Ceph cluster holding rbd:POOL/IMAGE images. Paths only: the
// cephx key stays in the keyring file (docs/OPERATOR.md, "Images on Ceph RBD").
type CephConfig struct {
	Conf    string `mapstructure:"conf"`    // ceph.conf; "" = librados's default search
	ID      string `mapstructure:"id"`      // cephx user without "client."; "" = admin
	Keyring string `mapstructure:"keyring"` // keyring file; "" = the one ceph.conf names
}

// RBD is the store's view of c.
func (c CephConfig) RBD() rbd.Config { return rbd.Config{Conf: c.Conf, ID: c.ID, Keyring: c.Keyring} }

// AdminConfig configures the admin API and the metrics endpoint (both off when empty).
type AdminConfig struct {
	// Socket is the admin API's Unix socket (mode 0600: whoever can open it can attach any
	// image the service can read, so only the service's own user).
	Socket string `mapstructure:"socket"`
	// MetricsListen serves Prometheus metrics only (no admin calls): tcp:HOST:PORT or
	// unix:PATH.
	MetricsListen string `mapstructure:"metrics_listen"`
}

// FUSEConfig configures the FUSE frontend (off when mountpoint is empty).
type FUSEConfig struct {
	Mountpoint string `mapstructure:"mountpoint"`
	AllowOther bool   `mapstructure:"allow_other"` // needs user_allow_other in /etc/fuse.conf unless root
}

// EngineConfig sizes the disk-controller engine.
type EngineConfig struct {
	Shards    int    `mapstructure:"shards"`     // 0 = one per core
	CacheSize string `mapstructure:"cache_size"` // plaintext write-back cache, e.g. 256M
	IdleFlush string `mapstructure:"idle_flush"` // write back dirty sectors idle this long, e.g. 5s
	Mmap      bool   `mapstructure:"mmap"`       // image reads through a shared read-only mapping (else pread)
	// PlacedRun is the shortest guest write of whole sectors (without FUA), or run of
	// consecutive sectors written back under the cache's pressure, that is written once, in
	// place, journalling only their entries (default 64K; "0": off, every sector journalled
	// before it goes in place).
	PlacedRun string `mapstructure:"placed_run"`
}

// PlacedBytes is engine.placed_run in bytes, 0 when off (validated by Load).
func (c EngineConfig) PlacedBytes() (int64, error) {
	if t := strings.TrimSpace(c.PlacedRun); t == "" || t == "0" {
		return 0, nil
	}
	n, err := ParseSize(c.PlacedRun)
	if err != nil || n < 4096 || n > 1<<30 {
		return 0, &KeyError{"engine.placed_run", fmt.Sprintf("%q: want 0 (off) or a size from 4K to 1G, e.g. 64K", c.PlacedRun)}
	}
	return int64(n), nil
}

// NBDConfig configures the NBD listeners.
type NBDConfig struct {
	Listen      []string `mapstructure:"listen"`        // unix:PATH or tcp:HOST:PORT
	TLSCert     string   `mapstructure:"tls_cert"`      // server certificate (PEM)
	TLSKey      string   `mapstructure:"tls_key"`       // server key (PEM, mode 0600)
	TLSClientCA string   `mapstructure:"tls_client_ca"` // CA for client certificates
	InsecureTCP bool     `mapstructure:"insecure_tcp"`  // allow TCP without TLS
	// SocketMode and SocketGroup are the permissions of the unix: listeners' sockets: an
	// octal mode ("0660") and a group name or numeric gid ("" keeps the service's group), so
	// that another user's QEMU (libvirt's libvirt-qemu, group kvm) may connect.
	SocketMode  string `mapstructure:"socket_mode"`
	SocketGroup string `mapstructure:"socket_group"`
}

// DefaultSocketMode is nbd.socket_mode when unset: the service's user and group.
const DefaultSocketMode = "0660"

// SocketPerm is nbd.socket_mode as a file mode (validated by Load).
func (c NBDConfig) SocketPerm() (os.FileMode, error) {
	m, err := strconv.ParseUint(strings.TrimPrefix(c.SocketMode, "0o"), 8, 32)
	if err != nil || c.SocketMode == "" {
		return 0, &KeyError{"nbd.socket_mode", fmt.Sprintf("%q is not an octal mode, e.g. \"0660\"", c.SocketMode)}
	}
	if m > 0o777 {
		return 0, &KeyError{"nbd.socket_mode", fmt.Sprintf("%q: a socket's permission bits are at most 0777", c.SocketMode)}
	}
	return os.FileMode(m), nil
}

// SocketGID is the gid of nbd.socket_group, -1 when it is empty (the socket keeps the
// service's group). A name is looked up in the group database; a number must name an
// existing group too, so a typo does not hand the socket to an unused gid.
func (c NBDConfig) SocketGID() (int, error) {
	g := c.SocketGroup
	if g == "" {
		return -1, nil
	}
	var grp *user.Group
	var err error
	if _, nerr := strconv.ParseUint(g, 10, 32); nerr == nil {
		grp, err = user.LookupGroupId(g)
	} else {
		grp, err = user.LookupGroup(g)
	}
	if err != nil {
		return 0, &KeyError{"nbd.socket_group", fmt.Sprintf("%q: no such group (%v)", g, err)}
	}
	gid, err := strconv.Atoi(grp.Gid)
	if err != nil {
		return 0, &KeyError{"nbd.socket_group", fmt.Sprintf("%q: group has gid %q, not a number", g, grp.Gid)}
	}
	return gid, nil
}

// VMConfig is one VM whose disks are attached at start. A VM has either image (with export
// and read_only: one disk, the quick-start form) or disks[] (several), and optionally nvram.
type VMConfig struct {
	Name     string `mapstructure:"name"`
	Image    string `mapstructure:"image"`
	Firmware string `mapstructure:"firmware"`
	ASID     int    `mapstructure:"asid"` // 0 = allocate
	ReadOnly bool   `mapstructure:"read_only"`
	Export   string `mapstructure:"export"`   // NBD export name; default the VM name
	Identity string `mapstructure:"identity"` // TLS client identity allowed to open the exports
	// Disks are the VM's disks, each its own key slot under the VM's ASID (instead of image).
	Disks []DiskConfig `mapstructure:"disks"`
	// NVRAM is a sealed image served as the FUSE file NVRAMFile (default NAME.nvram) and not
	// over NBD: the UEFI variable store (libvirt's <nvram>, QEMU's pflash unit 1).
	NVRAM     string `mapstructure:"nvram"`
	NVRAMFile string `mapstructure:"nvram_file"`
}

// DiskConfig is one disk of a VM (vms[].disks[]).
type DiskConfig struct {
	Image    string `mapstructure:"image" json:"image"`
	Export   string `mapstructure:"export" json:"export,omitempty"` // default: VM name (first disk), NAME-N
	ReadOnly bool   `mapstructure:"read_only" json:"read_only,omitempty"`
	File     string `mapstructure:"file" json:"file,omitempty"` // FUSE file name; default EXPORT.raw
	// NVRAM marks the VM's variable store (from vms[].nvram): a FUSE file only, no export.
	NVRAM bool `mapstructure:"-" json:"-"`
}

// MaxDisks bounds a VM's disks, its NVRAM included (psp.MaxDisks key slots per ASID).
const MaxDisks = 16

// AllDisks is the VM's disks with defaults filled in: disks[] (or the one disk image names),
// then the NVRAM if any. The first disk's export is ExportName; disk N's is NAME-N. A disk's
// FUSE file is EXPORT.raw; the NVRAM's is NAME.nvram.
func (vm VMConfig) AllDisks() []DiskConfig {
	var out []DiskConfig
	if len(vm.Disks) == 0 {
		if vm.Image != "" || vm.NVRAM == "" {
			out = append(out, DiskConfig{Image: vm.Image, Export: vm.ExportName(), ReadOnly: vm.ReadOnly})
		}
	} else {
		out = append(out, vm.Disks...)
	}
	for i := range out {
		if out[i].Export == "" {
			out[i].Export = vm.Name
			if i > 0 {
				out[i].Export = fmt.Sprintf("%s-%d", vm.Name, i)
			}
		}
		if out[i].File == "" {
			out[i].File = out[i].Export + ".raw"
		}
	}
	if vm.NVRAM != "" {
		f := vm.NVRAMFile
		if f == "" {
			f = vm.Name + ".nvram"
		}
		out = append(out, DiskConfig{Image: vm.NVRAM, File: f, NVRAM: true})
	}
	return out
}

// diskKey is the config key of field f of vm.AllDisks()[i].
func (vm VMConfig) diskKey(prefix string, i int, f string) string {
	switch {
	case i < len(vm.Disks):
		return fmt.Sprintf("%sdisks[%d].%s", prefix, i, f)
	case i == len(vm.AllDisks())-1 && vm.NVRAM != "":
		if f == "file" {
			return prefix + "nvram_file"
		}
		return prefix + "nvram"
	}
	return prefix + f
}

// LogConfig controls structured logging.
type LogConfig struct {
	Level  string `mapstructure:"level"`  // debug, info, warn, error
	Format string `mapstructure:"format"` // text or json
}

// PSPConfig locates the chip identity.
type PSPConfig struct {
	Dir   string `mapstructure:"dir"`
	ASIDs int    `mapstructure:"asids"`
	// Remote keys (docs/BROKER.md): the CA of key brokers' TLS certificates (empty: the
	// system roots) and an optional client certificate for brokers that require one.
	BrokerCA         string `mapstructure:"broker_ca"`
	BrokerClientCert string `mapstructure:"broker_client_cert"`
	BrokerClientKey  string `mapstructure:"broker_client_key"` // mode 0600
	// BrokerAttempts bounds the tries of one key fetch while a broker is unreachable (backoff
	// 250 ms, doubling); 0 = 4.
	BrokerAttempts int `mapstructure:"broker_attempts"`
}

// Defaults are applied before the file, environment and flags.
func defaults(v *viper.Viper) {
	v.SetDefault("log.level", "info")
	v.SetDefault("log.format", "text")
	v.SetDefault("psp.dir", "")
	v.SetDefault("psp.asids", 509)
	v.SetDefault("psp.broker_ca", "")
	v.SetDefault("psp.broker_client_cert", "")
	v.SetDefault("psp.broker_client_key", "")
	v.SetDefault("psp.broker_attempts", 0)
	v.SetDefault("engine.shards", 0)
	v.SetDefault("engine.cache_size", "256M")
	v.SetDefault("engine.idle_flush", "5s")
	v.SetDefault("engine.mmap", true)
	v.SetDefault("engine.placed_run", "64K")
	v.SetDefault("nbd.listen", []string{})
	v.SetDefault("nbd.tls_cert", "")
	v.SetDefault("nbd.tls_key", "")
	v.SetDefault("nbd.tls_client_ca", "")
	v.SetDefault("nbd.insecure_tcp", false)
	v.SetDefault("nbd.socket_mode", DefaultSocketMode)
	v.SetDefault("nbd.socket_group", "")
	v.SetDefault("fuse.mountpoint", "")
	v.SetDefault("fuse.allow_other", false)
	v.SetDefault("admin.socket", "")
	v.SetDefault("admin.metrics_listen", "")
	v.SetDefault("ceph.conf", "")
	v.SetDefault("ceph.id", "")
	v.SetDefault("ceph.keyring", "")
}

// Load reads path (optional: "" skips the file), SEALDISK_* environment variables
// (SEALDISK_PSP_DIR for psp.dir) and any flags in fs whose names are config keys with dots
// replaced by dashes (psp-dir).
func Load(path string, fs *pflag.FlagSet) (*Config, error) {
	v := viper.New()
	defaults(v)
	v.SetEnvPrefix("SEALDISK")
	v.SetEnvKeyReplacer(strings.NewReplacer(".", "_"))
	v.AutomaticEnv()
	if path != "" {
		if _, err := os.Stat(path); err != nil {
			return nil, fmt.Errorf("failed to read config: %w", err)
		}
		v.SetConfigFile(path)
		v.SetConfigType("yaml")
		if err := v.ReadInConfig(); err != nil {
			return nil, fmt.Errorf("failed to parse config %s: %w", path, err)
		}
	}
	if fs != nil {
		// fuse.allow_other is --fuse-allow-other: both separators become dashes.
		flagName := strings.NewReplacer(".", "-", "_", "-")
		for _, key := range v.AllKeys() {
			if f := fs.Lookup(flagName.Replace(key)); f != nil {
				if err := v.BindPFlag(key, f); err != nil {
					return nil, fmt.Errorf("failed to bind flag --%s: %w", f.Name, err)
				}
			}
		}
	}
	// YAML reads an unquoted 0660 as the number 432 (octal), which would then pass as the
	// string "432": refuse a mode that is not a string rather than guess what was meant.
	if m := v.Get("nbd.socket_mode"); m != nil {
		if _, ok := m.(string); !ok {
			return nil, &KeyError{"nbd.socket_mode", fmt.Sprintf("%v is a number, not a string: quote the mode (socket_mode: \"0660\"); YAML reads an unquoted 0660 as 432", m)}
		}
	}
	var c Config
	err := v.UnmarshalExact(&c, func(dc *mapstructure.DecoderConfig) { dc.ErrorUnused = true })
	if err != nil {
		return nil, fmt.Errorf("invalid config: %w", err)
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

// KeyError names the configuration key that is wrong.
type KeyError struct {
	Key    string
	Reason string
}

func (e *KeyError) Error() string { return fmt.Sprintf("invalid config key %s: %s", e.Key, e.Reason) }

// Validate checks values that types alone cannot, section by section; every error names its key.
func (c *Config) Validate() error {
	var errs []error
	for _, check := range []func() []error{c.Log.check, c.PSP.check, c.Engine.check, c.Ceph.check, c.NBD.check, c.Admin.check, c.checkVMs} {
		errs = append(errs, check()...)
	}
	return errors.Join(errs...)
}

// check validates log.*.
func (c LogConfig) check() []error {
	var errs []error
	switch c.Level {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, &KeyError{"log.level", fmt.Sprintf("%q is not debug, info, warn or error", c.Level)})
	}
	if c.Format != "text" && c.Format != "json" {
		errs = append(errs, &KeyError{"log.format", fmt.Sprintf("%q is not text or json", c.Format)})
	}
	return errs
}

// check validates psp.*.
func (c PSPConfig) check() []error {
	var errs []error
	if c.ASIDs < 1 || c.ASIDs > 1<<16 {
		errs = append(errs, &KeyError{"psp.asids", fmt.Sprintf("%d is outside 1..65536", c.ASIDs)})
	}
	if c.Dir != "" {
		if fi, err := os.Stat(c.Dir); err != nil || !fi.IsDir() {
			errs = append(errs, &KeyError{"psp.dir", fmt.Sprintf("%s is not a directory", c.Dir)})
		}
	}
	if (c.BrokerClientCert == "") != (c.BrokerClientKey == "") {
		errs = append(errs, &KeyError{"psp.broker_client_cert", "broker_client_cert and broker_client_key go together"})
	}
	if c.BrokerAttempts < 0 || c.BrokerAttempts > 20 {
		errs = append(errs, &KeyError{"psp.broker_attempts", fmt.Sprintf("%d is outside 0..20", c.BrokerAttempts)})
	}
	return errs
}

// check validates engine.*.
func (c EngineConfig) check() []error {
	var errs []error
	if c.Shards < 0 || c.Shards > 256 {
		errs = append(errs, &KeyError{"engine.shards", fmt.Sprintf("%d is outside 0..256", c.Shards)})
	}
	if n, err := ParseSize(c.CacheSize); err != nil || n < 1<<20 {
		errs = append(errs, &KeyError{"engine.cache_size", fmt.Sprintf("%q: want a size of at least 1M, e.g. 256M", c.CacheSize)})
	}
	if d, err := time.ParseDuration(c.IdleFlush); err != nil || d <= 0 {
		errs = append(errs, &KeyError{"engine.idle_flush", fmt.Sprintf("%q: want a positive duration, e.g. 5s", c.IdleFlush)})
	}
	if _, err := c.PlacedBytes(); err != nil {
		errs = append(errs, err)
	}
	return errs
}

// check validates ceph.*.
func (c CephConfig) check() []error {
	var errs []error
	for _, f := range []struct{ key, path string }{{"ceph.conf", c.Conf}, {"ceph.keyring", c.Keyring}} {
		if f.path != "" {
			if fi, err := os.Stat(f.path); err != nil || fi.IsDir() {
				errs = append(errs, &KeyError{f.key, fmt.Sprintf("%s is not a readable file", f.path)})
			}
		}
	}
	if strings.HasPrefix(c.ID, "client.") || strings.ContainsAny(c.ID, " \t\n") {
		errs = append(errs, &KeyError{"ceph.id", fmt.Sprintf("%q: give the cephx user without \"client.\" (sealdisk for client.sealdisk)", c.ID)})
	}
	return errs
}

// check validates nbd.*.
func (c NBDConfig) check() []error {
	var errs []error
	tls := c.TLSCert != "" || c.TLSKey != ""
	if tls && (c.TLSCert == "" || c.TLSKey == "") {
		errs = append(errs, &KeyError{"nbd.tls_cert", "tls_cert and tls_key go together"})
	}
	for _, f := range []struct{ key, path string }{{"nbd.tls_cert", c.TLSCert}, {"nbd.tls_key", c.TLSKey}, {"nbd.tls_client_ca", c.TLSClientCA}} {
		if f.path != "" {
			if _, err := os.Stat(f.path); err != nil {
				errs = append(errs, &KeyError{f.key, fmt.Sprintf("%s: %v", f.path, errors.Unwrap(err))})
			}
		}
	}
	if _, err := c.SocketPerm(); err != nil {
		errs = append(errs, err)
	}
	if _, err := c.SocketGID(); err != nil {
		errs = append(errs, err)
	}
	for i, l := range c.Listen {
		key := fmt.Sprintf("nbd.listen[%d]", i)
		kind, addr, ok := strings.Cut(l, ":")
		switch {
		case !ok || addr == "":
			errs = append(errs, &KeyError{key, fmt.Sprintf("%q: want unix:PATH or tcp:HOST:PORT", l)})
		case kind == "unix":
		case kind == "tcp":
			if _, _, err := net.SplitHostPort(addr); err != nil {
				errs = append(errs, &KeyError{key, fmt.Sprintf("%q: %v", l, err)})
			} else if !tls && !c.InsecureTCP {
				errs = append(errs, &KeyError{key, fmt.Sprintf("%q: TCP needs nbd.tls_cert/tls_key, or nbd.insecure_tcp: true", l)})
			}
		default:
			errs = append(errs, &KeyError{key, fmt.Sprintf("%q: unknown listener kind %q (unix or tcp)", l, kind)})
		}
	}
	return errs
}

// check validates admin.*.
func (c AdminConfig) check() []error {
	var errs []error
	if c.Socket != "" {
		if fi, err := os.Stat(filepath.Dir(c.Socket)); err != nil || !fi.IsDir() {
			errs = append(errs, &KeyError{"admin.socket", fmt.Sprintf("%s: its directory does not exist", c.Socket)})
		}
	}
	if m := c.MetricsListen; m != "" {
		kind, addr, ok := strings.Cut(m, ":")
		switch {
		case !ok || addr == "" || (kind != "unix" && kind != "tcp"):
			errs = append(errs, &KeyError{"admin.metrics_listen", fmt.Sprintf("%q: want tcp:HOST:PORT or unix:PATH", m)})
		case kind == "tcp":
			if _, _, err := net.SplitHostPort(addr); err != nil {
				errs = append(errs, &KeyError{"admin.metrics_listen", fmt.Sprintf("%q: %v", m, err)})
			}
		}
	}
	return errs
}

// checkVMs validates vms[]: each VM, and names, ASIDs, and the exports and FUSE files of
// every disk, across them.
func (c *Config) checkVMs() []error {
	var errs []error
	names, asids := map[string]bool{}, map[int]bool{}
	exports, files := map[string]string{}, map[string]string{} // name -> key that took it
	for i, vm := range c.VMs {
		prefix := fmt.Sprintf("vms[%d].", i)
		if names[vm.Name] {
			errs = append(errs, &KeyError{prefix + "name", fmt.Sprintf("duplicate VM name %q", vm.Name)})
		}
		names[vm.Name] = true
		if vm.ASID != 0 && asids[vm.ASID] {
			errs = append(errs, &KeyError{prefix + "asid", fmt.Sprintf("duplicate ASID %d", vm.ASID)})
		}
		asids[vm.ASID] = vm.ASID != 0
		errs = append(errs, vm.check(prefix, c.PSP.ASIDs)...)
		for j, d := range vm.AllDisks() {
			if !d.NVRAM {
				if k, dup := exports[d.Export]; dup && !strings.HasPrefix(k, prefix) {
					errs = append(errs, &KeyError{vm.diskKey(prefix, j, "export"), fmt.Sprintf("duplicate export name %q (also %s)", d.Export, k)})
				}
				exports[d.Export] = vm.diskKey(prefix, j, "export")
			}
			if k, dup := files[d.File]; dup && !strings.HasPrefix(k, prefix) {
				errs = append(errs, &KeyError{vm.diskKey(prefix, j, "file"), fmt.Sprintf("duplicate FUSE file name %q (also %s)", d.File, k)})
			}
			files[d.File] = vm.diskKey(prefix, j, "file")
		}
	}
	return errs
}

// Check validates one VM on its own (the admin API's attach call; Validate adds the checks
// across VMs). maxASID is psp.asids. Errors name the field.
func (vm VMConfig) Check(maxASID int) error { return errors.Join(vm.check("", maxASID)...) }

func (vm VMConfig) check(prefix string, maxASID int) []error {
	var errs []error
	if vm.Name == "" {
		errs = append(errs, &KeyError{prefix + "name", "is empty"})
	} else if strings.ContainsAny(vm.Name, "/\x00") || vm.Name == "." || vm.Name == ".." {
		errs = append(errs, &KeyError{prefix + "name", fmt.Sprintf("%q cannot be a file name", vm.Name)})
	}
	if vm.ASID < 0 || vm.ASID > maxASID {
		errs = append(errs, &KeyError{prefix + "asid", fmt.Sprintf("%d is outside 0..%d (0 = allocate)", vm.ASID, maxASID)})
	}
	errs = append(errs, checkFile(prefix+"firmware", vm.Firmware)...)
	if len(vm.Disks) > 0 {
		for f, set := range map[string]bool{"image": vm.Image != "", "export": vm.Export != "", "read_only": vm.ReadOnly} {
			if set {
				errs = append(errs, &KeyError{prefix + f, "give the disks' settings in disks[], not both"})
			}
		}
	}
	disks := vm.AllDisks()
	if len(disks) > MaxDisks {
		errs = append(errs, &KeyError{prefix + "disks", fmt.Sprintf("%d disks (nvram included): at most %d", len(disks), MaxDisks)})
	}
	exports, files, inodes := map[string]int{}, map[string]int{}, map[string]int{}
	for i, d := range disks {
		key := func(f string) string { return vm.diskKey(prefix, i, f) }
		if strings.HasPrefix(d.Image, "rbd:") {
			if _, err := rbd.ParseLocation(d.Image); err != nil {
				errs = append(errs, &KeyError{key("image"), err.Error()})
			}
			// the cluster is asked at attach, not at load
		} else if e := checkFile(key("image"), d.Image); e != nil {
			errs = append(errs, e...)
		} else if fi, err := os.Stat(d.Image); err == nil {
			id := fileID(fi)
			if j, dup := inodes[id]; dup {
				errs = append(errs, &KeyError{key("image"), fmt.Sprintf("%s is the same file as %s (%s): a VM's disks are different images", d.Image, disks[j].Image, vm.diskKey(prefix, j, "image"))})
			}
			inodes[id] = i
		}
		if !d.NVRAM {
			if j, dup := exports[d.Export]; dup {
				errs = append(errs, &KeyError{key("export"), fmt.Sprintf("duplicate export name %q (also %s)", d.Export, vm.diskKey(prefix, j, "export"))})
			}
			exports[d.Export] = i
		}
		if d.File == "" || strings.ContainsAny(d.File, "/\x00") || d.File == "." || d.File == ".." {
			errs = append(errs, &KeyError{key("file"), fmt.Sprintf("%q cannot be a file name", d.File)})
		} else if j, dup := files[d.File]; dup {
			errs = append(errs, &KeyError{key("file"), fmt.Sprintf("duplicate FUSE file name %q (also %s)", d.File, vm.diskKey(prefix, j, "file"))})
		}
		files[d.File] = i
	}
	return errs
}

// checkFile: path is required and a readable file.
func checkFile(key, path string) []error {
	if path == "" {
		return []error{&KeyError{key, "is required"}}
	}
	if fi, err := os.Stat(path); err != nil || fi.IsDir() {
		return []error{&KeyError{key, fmt.Sprintf("%s is not a readable file", path)}}
	}
	return nil
}

// fileID is a file's (device, inode), so two paths to one file compare equal.
func fileID(fi os.FileInfo) string {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return fmt.Sprintf("%d:%d", st.Dev, st.Ino)
	}
	return fi.Name()
}

// ExportName is the NBD export name of a VM.
func (vm VMConfig) ExportName() string {
	if vm.Export != "" {
		return vm.Export
	}
	return vm.Name
}

// ParseSize reads 512, 10M, 20G, 1T (powers of two).
func ParseSize(s string) (uint64, error) {
	t := strings.TrimSpace(strings.ToUpper(s))
	t = strings.TrimSuffix(strings.TrimSuffix(t, "B"), "I")
	mult := uint64(1)
	if n := len(t); n > 0 {
		if i := strings.IndexByte("KMGTP", t[n-1]); i >= 0 {
			mult = 1 << (10 * (i + 1))
			t = t[:n-1]
		}
	}
	n, err := strconv.ParseUint(t, 10, 64)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("invalid size %q: want a positive number with an optional K, M, G, T, P suffix", s)
	}
	if n > (1<<62)/mult {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	return n * mult, nil
}
