package kernelnbd

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/engine"
	"github.com/sealdisk/sealdisk/nbd"
)

// TestAttachErrors: against a real server, an unknown export is named as such, and device
// problems (no such device or no module, not a block device, not NBD) are named before any
// ioctl.
func TestAttachErrors(t *testing.T) {
	s := nbd.NewServer(nbd.Options{})
	if err := s.AddExport(nbd.Export{Name: "vm1", Device: engine.NewMemDevice(1<<20, false)}); err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "att")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s")
	ln, err := nbd.ListenUnix(sock, 0)
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(context.Background(), ln)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s.Shutdown(ctx)
	})
	regular := filepath.Join(dir, "file")
	os.WriteFile(regular, nil, 0o644)

	var noDev string
	if _, err := os.Stat("/sys/module/nbd"); err != nil {
		noDev = "nbd kernel module is not loaded"
	} else {
		noDev = "no such device"
	}
	for _, tc := range []struct {
		export, device, want string
	}{
		{"nope", "/dev/nbd0", `export "nope" unknown`},
		{"vm1", filepath.Join(dir, "nbd7"), noDev},
		{"vm1", regular, "not a block device"},
		{"vm1", "/dev/null", "not a block device"},
	} {
		o := Options{Export: tc.export, Socket: sock, Device: tc.device, HandshakeWithin: 10 * time.Second}
		err := Attach(context.Background(), o, slog.New(slog.DiscardHandler))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("export %s on %s: error %v, want it to mention %q", tc.export, tc.device, err, tc.want)
		}
	}
	if bs, err := kernelBlockSize(nbd.ExportInfo{Size: 1<<20 + 512, PreferredBlock: 4096, MinBlock: 1}); err != nil || bs != 512 {
		t.Errorf("block size for an odd size: %d %v", bs, err)
	}
	if _, err := kernelBlockSize(nbd.ExportInfo{Size: 1 << 20, PreferredBlock: 8192, MinBlock: 8192}); err == nil {
		t.Error("a minimum block above the kernel's maximum was accepted")
	}
}
