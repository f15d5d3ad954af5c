package daemon

import (
	"context"
	"log/slog"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/sealdisk/sealdisk/config"
)

// otherGroup is a group this process may give a file that is not its own group, so that a
// chown shows; root may give any, others one of their supplementary groups. Without one, the
// process's own group (the chown is then not seen, and the test says so).
func otherGroup(t *testing.T) *user.Group {
	t.Helper()
	var gids []int
	if os.Geteuid() == 0 {
		for _, name := range []string{"nogroup", "kvm", "daemon", "bin"} {
			if g, err := user.LookupGroup(name); err == nil {
				n, _ := strconv.Atoi(g.Gid)
				gids = append(gids, n)
			}
		}
	} else if more, err := os.Getgroups(); err == nil {
		gids = more
	}
	for _, gid := range gids {
		if gid == os.Getgid() {
			continue
		}
		if g, err := user.LookupGroupId(strconv.Itoa(gid)); err == nil {
			return g
		}
	}
	g, err := user.LookupGroupId(strconv.Itoa(os.Getgid()))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("no group other than the process's own (%s) to give the socket: the group is checked but not its change", g.Name)
	return g
}

// startNBD starts a daemon with one NBD unix socket and nbd, no VMs; it returns the socket.
func startNBD(t *testing.T, e *testEnv, nbdc func(*config.NBDConfig)) (string, error) {
	t.Helper()
	e.writeConfig(t)
	cfg, err := config.Load(e.cfgPath, nil)
	if err != nil {
		t.Fatal(err)
	}
	nbdc(&cfg.NBD)
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	d, err := New(Options{Config: cfg, Logger: slog.New(slog.DiscardHandler), Version: "test"})
	if err != nil {
		return "", err
	}
	t.Cleanup(func() { d.Close(context.Background()) })
	return strings.TrimPrefix(cfg.NBD.Listen[0], "unix:"), nil
}

func socketPerms(t *testing.T, path string) (os.FileMode, int) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket {
		t.Fatalf("%s is %v, not a socket", path, fi.Mode())
	}
	return fi.Mode().Perm(), int(fi.Sys().(*syscall.Stat_t).Gid)
}

// TestNBDSocketModeAndGroup: the NBD unix socket has nbd.socket_mode and nbd.socket_group
// when the daemon serves on it — by group name, then by gid with another mode — and the
// default (0660, the process's group) without them.
func TestNBDSocketModeAndGroup(t *testing.T) {
	e := newTestEnv(t)
	g := otherGroup(t)
	gid, _ := strconv.Atoi(g.Gid)

	sock, err := startNBD(t, e, func(c *config.NBDConfig) { c.SocketGroup = g.Name })
	if err != nil {
		t.Fatal(err)
	}
	if mode, got := socketPerms(t, sock); mode != 0o660 || got != gid {
		t.Fatalf("socket_group %s: mode %#o gid %d, want 0660 and %d", g.Name, mode, got, gid)
	}
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	c.Close()

	e2 := newTestEnv(t)
	sock, err = startNBD(t, e2, func(c *config.NBDConfig) { c.SocketMode, c.SocketGroup = "0604", g.Gid })
	if err != nil {
		t.Fatal(err)
	}
	if mode, got := socketPerms(t, sock); mode != 0o604 || got != gid {
		t.Fatalf("socket_mode 0604, socket_group %s: mode %#o gid %d, want 0604 and %d", g.Gid, mode, got, gid)
	}

	e3 := newTestEnv(t)
	if sock, err = startNBD(t, e3, func(*config.NBDConfig) {}); err != nil {
		t.Fatal(err)
	}
	if mode, got := socketPerms(t, sock); mode != 0o660 || got != os.Getegid() {
		t.Fatalf("defaults: mode %#o gid %d, want 0660 and the process's %d", mode, got, os.Getegid())
	}
}

// TestNBDSocketPermsFailure: a socket whose group or mode cannot be set fails, naming the
// key and the socket; a daemon that cannot give its socket the group does not start.
func TestNBDSocketPermsFailure(t *testing.T) {
	gone := filepath.Join(t.TempDir(), "gone.sock")
	err := setSocketPerms(gone, config.NBDConfig{SocketMode: "0660", SocketGroup: strconv.Itoa(os.Getgid())})
	if err == nil || !strings.Contains(err.Error(), "nbd.socket_group") || !strings.Contains(err.Error(), gone) {
		t.Fatalf("group of a missing socket: %v", err)
	}
	err = setSocketPerms(gone, config.NBDConfig{SocketMode: "0660"})
	if err == nil || !strings.Contains(err.Error(), "nbd.socket_mode") || !strings.Contains(err.Error(), gone) {
		t.Fatalf("mode of a missing socket: %v", err)
	}
	if os.Geteuid() == 0 {
		return // root may give a socket any group
	}
	// a group this user is not in: chown(2) refuses it
	groups, _ := os.Getgroups()
	for _, name := range []string{"root", "kvm", "nogroup", "daemon"} {
		g, err := user.LookupGroup(name)
		if err != nil {
			continue
		}
		n, _ := strconv.Atoi(g.Gid)
		if n == os.Getgid() || slices.Contains(groups, n) {
			continue
		}
		e := newTestEnv(t)
		_, err = startNBD(t, e, func(c *config.NBDConfig) { c.SocketGroup = name })
		if err == nil || !strings.Contains(err.Error(), "nbd.socket_group") || !strings.Contains(err.Error(), "operation not permitted") {
			t.Fatalf("socket_group %s (not this user's): %v", name, err)
		}
		return
	}
}
