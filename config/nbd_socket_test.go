package config

import (
	"errors"
	"os"
	"os/user"
	"strconv"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

// nbd.socket_mode and nbd.socket_group: what they accept, and refusals that name the key.
func TestNBDSocketPermissions(t *testing.T) {
	c, err := Load("", nil)
	if err != nil {
		t.Fatal(err)
	}
	if m, err := c.NBD.SocketPerm(); err != nil || m != 0o660 {
		t.Fatalf("default mode: %#o %v", m, err)
	}
	if g, err := c.NBD.SocketGID(); err != nil || g != -1 {
		t.Fatalf("default group: %d %v (want -1: the service's own)", g, err)
	}
	gid := os.Getgid()
	grp, err := user.LookupGroupId(strconv.Itoa(gid))
	if err != nil {
		t.Fatalf("this process's group %d has no name: %v", gid, err)
	}
	for _, ok := range []struct {
		yaml string
		mode os.FileMode
		gid  int
	}{
		{"nbd:\n  socket_mode: \"0660\"\n", 0o660, -1},
		{"nbd:\n  socket_mode: \"600\"\n", 0o600, -1},
		{"nbd:\n  socket_mode: \"0o640\"\n", 0o640, -1},
		{"nbd:\n  socket_mode: \"0777\"\n  socket_group: " + grp.Name + "\n", 0o777, gid},
		{"nbd:\n  socket_group: " + strconv.Itoa(gid) + "\n", 0o660, gid},     // a number, unquoted
		{"nbd:\n  socket_group: \"" + strconv.Itoa(gid) + "\"\n", 0o660, gid}, // and quoted
	} {
		c, err := Load(write(t, ok.yaml), nil)
		if err != nil {
			t.Errorf("%q: %v", ok.yaml, err)
			continue
		}
		m, _ := c.NBD.SocketPerm()
		g, _ := c.NBD.SocketGID()
		if m != ok.mode || g != ok.gid {
			t.Errorf("%q: mode %#o gid %d, want %#o %d", ok.yaml, m, g, ok.mode, ok.gid)
		}
	}
	for yaml, want := range map[string]struct{ key, says string }{
		"nbd:\n  socket_mode: \"0999\"\n":         {"nbd.socket_mode", `"0999" is not an octal mode`},
		"nbd:\n  socket_mode: \"rw-rw----\"\n":    {"nbd.socket_mode", "is not an octal mode"},
		"nbd:\n  socket_mode: \"\"\n":             {"nbd.socket_mode", `"" is not an octal mode`},
		"nbd:\n  socket_mode: \"-660\"\n":         {"nbd.socket_mode", "is not an octal mode"},
		"nbd:\n  socket_mode: \"01777\"\n":        {"nbd.socket_mode", "at most 0777"},
		"nbd:\n  socket_mode: \"4660\"\n":         {"nbd.socket_mode", "at most 0777"},
		"nbd:\n  socket_mode: 0660\n":             {"nbd.socket_mode", "quote the mode"},
		"nbd:\n  socket_group: no-such-group-x\n": {"nbd.socket_group", `"no-such-group-x": no such group`},
		"nbd:\n  socket_group: 3999999999\n":      {"nbd.socket_group", `"3999999999": no such group`},
	} {
		_, err := Load(write(t, yaml), nil)
		var ke *KeyError
		if !errors.As(err, &ke) || ke.Key != want.key || !strings.Contains(err.Error(), want.says) {
			t.Errorf("%q: want an error naming %s saying %q, got %v", yaml, want.key, want.says, err)
		}
	}
	// the serve flags beside --nbd-listen, and the environment
	fs := pflag.NewFlagSet("x", pflag.ContinueOnError)
	fs.String("nbd-socket-mode", DefaultSocketMode, "")
	fs.String("nbd-socket-group", "", "")
	if err := fs.Parse([]string{"--nbd-socket-mode=0640", "--nbd-socket-group=" + grp.Name}); err != nil {
		t.Fatal(err)
	}
	if c, err := Load("", fs); err != nil || c.NBD.SocketMode != "0640" || c.NBD.SocketGroup != grp.Name {
		t.Fatalf("flags: %+v %v", c, err)
	}
	t.Setenv("SEALDISK_NBD_SOCKET_MODE", "0606")
	if c, err := Load("", nil); err != nil || c.NBD.SocketMode != "0606" {
		t.Fatalf("env: %+v %v", c, err)
	}
	t.Setenv("SEALDISK_NBD_SOCKET_MODE", "0888")
	if _, err := Load("", nil); err == nil || !strings.Contains(err.Error(), "nbd.socket_mode") {
		t.Fatalf("env 0888: %v", err)
	}
}
