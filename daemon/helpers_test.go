package daemon

import (
	"context"
	"crypto/sha512"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sealdisk/sealdisk/config"
	"github.com/sealdisk/sealdisk/internal/fixture"
	"github.com/sealdisk/sealdisk/store"
	"github.com/sealdisk/sealdisk/store/storetest"
)

func TestMain(m *testing.M) {
	storetest.LockProcessMain()
	fixture.Main(m)
}

// testEnv is a world (vendor, chip, trusted provider), a firmware file the images allow, and
// a config file for the daemon under test.
type testEnv struct {
	w       *fixture.World
	dir, fw string
	cfgPath string
	vms     []config.VMConfig // what writeConfig last wrote
}

func newTestEnv(t *testing.T) *testEnv {
	t.Helper()
	w := fixture.New(t)
	e := &testEnv{w: w, dir: t.TempDir()}
	e.fw = filepath.Join(e.dir, "OVMF.fd")
	if err := os.WriteFile(e.fw, []byte("test firmware"), 0o644); err != nil {
		t.Fatal(err)
	}
	e.cfgPath = filepath.Join(e.dir, "sealdisk.yaml")
	return e
}

// image creates a sealed image file of w's chip, signed by w's provider.
func (e *testEnv) image(t *testing.T, w *fixture.World, name string) string {
	t.Helper()
	m := sha512.Sum384([]byte("test firmware"))
	im := w.Image(t, fixture.Spec{Size: 1 << 20, Measurements: [][]byte{m[:]}})
	p := filepath.Join(e.dir, name)
	f, err := store.CreateFile(p)
	if err != nil {
		t.Fatal(err)
	}
	im.Create(t, f)
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return p
}

func (e *testEnv) vm(name, img string, readOnly bool) config.VMConfig {
	return config.VMConfig{Name: name, Image: img, Firmware: e.fw, ReadOnly: readOnly}
}

// writeConfig writes the config file: the world's PSP, an NBD Unix socket, vms.
func (e *testEnv) writeConfig(t *testing.T, vms ...config.VMConfig) {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "psp:\n  dir: %q\nengine:\n  shards: 2\n  cache_size: 4M\nnbd:\n  listen: [%q]\n", e.w.ChipDir, "unix:"+filepath.Join(e.dir, "nbd.sock"))
	if len(vms) > 0 {
		b.WriteString("vms:\n")
	}
	for _, vm := range vms {
		fmt.Fprintf(&b, "  - name: %q\n    image: %q\n    firmware: %q\n    read_only: %v\n", vm.Name, vm.Image, vm.Firmware, vm.ReadOnly)
	}
	if err := os.WriteFile(e.cfgPath, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	e.vms = vms
}

// start runs a daemon on the config file (writeConfig first); reload re-reads the file.
func (e *testEnv) start(t *testing.T) *Daemon {
	t.Helper()
	load := func() (*config.Config, error) { return config.Load(e.cfgPath, nil) }
	cfg, err := load()
	if err != nil {
		t.Fatal(err)
	}
	d, err := New(Options{Config: cfg, Logger: slog.New(slog.DiscardHandler), Reload: load, Version: "test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Close(context.Background()); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return d
}

func attached(d *Daemon) []string {
	var names []string
	for _, v := range d.Status().VMs {
		names = append(names, v.Name)
	}
	return names
}

func writeFile(t *testing.T, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}
