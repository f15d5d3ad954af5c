package config

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// The commented sample packaging/sealdisk.yaml loads and validates, once the files it names
// exist (under a temporary root standing in for /), and means what its comments say.
func TestPackagedSampleConfig(t *testing.T) {
	sample, err := os.ReadFile("../packaging/sealdisk.yaml")
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	text := string(sample)
	for _, prefix := range []string{"/var/lib/sealdisk", "/run/sealdisk", "/usr/share/OVMF"} {
		text = strings.ReplaceAll(text, prefix, root+prefix)
	}
	// every uncommented path value: create it (directories for psp.dir and the sockets' dirs)
	for _, m := range regexp.MustCompile(`(?m)^[^#\n]*?(?:image|firmware|nvram): (\S+)`).FindAllStringSubmatch(text, -1) {
		if err := os.MkdirAll(filepath.Dir(m[1]), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(m[1], []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{"/var/lib/sealdisk/psp", "/run/sealdisk"} {
		if err := os.MkdirAll(root+d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	p := filepath.Join(root, "sealdisk.yaml")
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := Load(p, nil)
	if err != nil {
		t.Fatalf("the sample does not load: %v", err)
	}
	if c.PSP.Dir != root+"/var/lib/sealdisk/psp" || c.FUSE.Mountpoint != root+"/run/sealdisk/disks" || !c.FUSE.AllowOther ||
		!slices.Equal(c.NBD.Listen, []string{"unix:" + root + "/run/sealdisk/nbd.sock"}) || c.Admin.Socket != root+"/run/sealdisk/admin.sock" {
		t.Fatalf("sample: %+v", c)
	}
	// libvirt's QEMU (group kvm: systemd's sysusers make it on Debian) connects to the socket
	if m, err := c.NBD.SocketPerm(); err != nil || m != 0o660 || c.NBD.SocketGroup != "kvm" {
		t.Fatalf("sample NBD socket: mode %#o (%v), group %q; want 0660 and kvm", m, err, c.NBD.SocketGroup)
	}
	if len(c.VMs) != 2 {
		t.Fatalf("%d VMs", len(c.VMs))
	}
	var files, exports []string
	for _, d := range c.VMs[1].AllDisks() {
		files, exports = append(files, d.File), append(exports, d.Export)
	}
	if !slices.Equal(files, []string{"db1.raw", "db1-data.raw", "db1-2.raw", "db1.nvram"}) ||
		!slices.Equal(exports, []string{"db1", "db1-data", "db1-2", ""}) || !c.VMs[1].AllDisks()[2].ReadOnly {
		t.Fatalf("db1's disks as the comments say: files %q, exports %q", files, exports)
	}
	if d := c.VMs[0].AllDisks(); len(d) != 1 || d[0].Export != "web1" || d[0].File != "web1.raw" {
		t.Fatalf("web1: %+v", d)
	}
}
