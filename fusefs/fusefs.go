// Package fusefs is the FUSE frontend: one regular file per attached VM disk (NAME.raw)
// under a mount point, for hypervisors that open disks as files (libvirt <disk type='file'>,
// QEMU -drive file=…). It is thin: it maps FUSE calls to engine.BlockDevice calls and errors
// to errno, and keeps no data, no lock around I/O and no passthrough fd (the kernel must never
// read the image file directly: it holds ciphertext).
package fusefs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/sealdisk/sealdisk/engine"
)

// Suffix is appended to a VM's name to form its file name.
const Suffix = ".raw"

// Options configure Mount.
type Options struct {
	Mountpoint string
	// AllowOther lets other users (libvirt's qemu user) open the files; it needs
	// user_allow_other in /etc/fuse.conf when sealdisk does not run as root.
	AllowOther bool
	// UID/GID own the files (libvirt can chown them later); default the process's.
	UID, GID uint32
	// MaxWrite is the largest read or write the kernel sends (default 1 MiB).
	MaxWrite int
	Logger   *slog.Logger
	Debug    bool
}

// FS is a mounted sealdisk filesystem.
type FS struct {
	opts   Options
	root   *rootNode
	server *fuse.Server
	log    *slog.Logger
}

// ErrStale is wrapped when a mount point held a dead FUSE mount that had to be cleared.
var ErrStale = errors.New("stale FUSE mount")

// ErrBusy: the filesystem could not be unmounted because files are open.
var ErrBusy = errors.New("mount point busy")

// Mount mounts an empty filesystem at opts.Mountpoint. A stale mount left by a crashed
// sealdisk (the mount point answers ENOTCONN) is detected, reported and cleared first.
func Mount(opts Options) (*FS, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.MaxWrite == 0 {
		opts.MaxWrite = 1 << 20
	}
	if opts.UID == 0 && opts.GID == 0 {
		opts.UID, opts.GID = uint32(os.Getuid()), uint32(os.Getgid())
	}
	if err := clearStale(opts.Mountpoint, opts.Logger); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(opts.Mountpoint, 0o755); err != nil {
		return nil, fmt.Errorf("failed to create mount point: %w", err)
	}
	f := &FS{opts: opts, log: opts.Logger}
	f.root = &rootNode{fs: f, disks: map[string]*diskNode{}}
	timeout := time.Second
	srv, err := fs.Mount(opts.Mountpoint, f.root, &fs.Options{
		MountOptions: fuse.MountOptions{
			AllowOther: opts.AllowOther,
			// The kernel checks owner and mode on open: with allow_other, and no checks of
			// its own here, any local user could otherwise read and write every disk.
			Options:       []string{"default_permissions"},
			MaxWrite:      opts.MaxWrite,
			MaxReadAhead:  opts.MaxWrite,
			MaxBackground: 64,
			FsName:        "sealdisk",
			Name:          "sealdisk",
			DisableXAttrs: true,
			// Replies come from engine buffers, never from a file descriptor: go-fuse's splice
			// path would only put the header through a pipe and fall back to writev, two wasted
			// syscalls per read.
			DisableSplice: true,
			// Asynchronous direct I/O: an io_submit of many requests (fio libaio, QEMU
			// aio=native) puts them all in flight instead of waiting for each in turn.
			ExtraCapabilities: fuse.CAP_ASYNC_DIO,
			// mount(2) first, where the process may (root, or CAP_SYS_ADMIN as the systemd
			// unit gives its user: packaging/sealdisk.service), so no setuid helper is needed
			// under NoNewPrivileges; otherwise fusermount3 as before.
			DirectMount: true,
			Debug:       opts.Debug,
		},
		EntryTimeout: &timeout,
		AttrTimeout:  &timeout,
		UID:          opts.UID,
		GID:          opts.GID,
	})
	if err != nil {
		return nil, fmt.Errorf("failed to mount FUSE at %s: %w", opts.Mountpoint, err)
	}
	f.server = srv
	return f, nil
}

// clearStale unmounts a dead FUSE mount at dir. statfs asks the filesystem every time and
// fails with ENOTCONN on a dead mount; stat may be answered from attributes the kernel still
// holds for a second after the crash.
func clearStale(dir string, log *slog.Logger) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); !errors.Is(err, syscall.ENOTCONN) {
		return nil
	}
	log.Warn("found a stale FUSE mount (a previous sealdisk did not unmount); clearing it", "mountpoint", dir)
	if uerr := unix.Unmount(dir, unix.MNT_DETACH); uerr != nil {
		out, ferr := exec.Command("fusermount3", "-u", "-z", dir).CombinedOutput()
		if ferr != nil {
			return fmt.Errorf("%w at %s: could not unmount it (%v; fusermount3: %s)", ErrStale, dir, uerr, strings.TrimSpace(string(out)))
		}
	}
	return nil
}

// Mountpoint is where the filesystem is mounted.
func (f *FS) Mountpoint() string { return f.opts.Mountpoint }

// Add makes dev appear as NAME.raw. Read-only devices give a read-only file.
func (f *FS) Add(name string, dev engine.BlockDevice) error {
	return f.root.add(name+Suffix, dev)
}

// AddFile makes dev appear as file (a full name: a VM's second disk, its NVRAM).
func (f *FS) AddFile(file string, dev engine.BlockDevice) error { return f.root.add(file, dev) }

// Remove makes NAME.raw disappear (open handles then fail with ENODEV).
func (f *FS) Remove(name string) error { return f.root.remove(name + Suffix) }

// RemoveFile makes file, added with AddFile, disappear.
func (f *FS) RemoveFile(file string) error { return f.root.remove(file) }

// Unmount unmounts; open files make it fail with ErrBusy rather than hang.
func (f *FS) Unmount() error {
	err := f.server.Unmount()
	if err != nil {
		if errors.Is(err, syscall.EBUSY) || strings.Contains(err.Error(), "busy") {
			return fmt.Errorf("%w: %s still has open files: %v", ErrBusy, f.opts.Mountpoint, err)
		}
		return fmt.Errorf("failed to unmount %s: %w", f.opts.Mountpoint, err)
	}
	f.server.Wait()
	return nil
}

// rootNode is the mount point's directory: one child per attached disk.
type rootNode struct {
	fs.Inode
	fs *FS

	mu    sync.Mutex // guards disks
	disks map[string]*diskNode
}

var _ = (fs.NodeOnAdder)((*rootNode)(nil))
var _ = (fs.NodeGetattrer)((*rootNode)(nil))

func (r *rootNode) OnAdd(context.Context) {}

func (r *rootNode) Getattr(_ context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = fuse.S_IFDIR | 0o755
	return 0
}

func (r *rootNode) add(name string, dev engine.BlockDevice) error {
	if name == "" || strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
		return fmt.Errorf("invalid disk name %q", name)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, dup := r.disks[name]; dup {
		return fmt.Errorf("disk %q is already attached", name)
	}
	mode := uint32(0o600)
	if dev.Caps().ReadOnly {
		mode = 0o400
	}
	d := &diskNode{dev: dev, mode: mode, uid: r.fs.opts.UID, gid: r.fs.opts.GID}
	ch := r.NewPersistentInode(context.Background(), d, fs.StableAttr{Mode: fuse.S_IFREG})
	if !r.AddChild(name, ch, false) {
		return fmt.Errorf("failed to add %s", name)
	}
	r.disks[name] = d
	return nil
}

func (r *rootNode) remove(name string) error {
	r.mu.Lock()
	d := r.disks[name]
	delete(r.disks, name)
	r.mu.Unlock()
	if d == nil {
		return fmt.Errorf("disk %q is not attached", name)
	}
	d.detach()
	r.RmChild(name)
	_ = r.NotifyEntry(name)
	return nil
}
