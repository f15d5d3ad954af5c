package daemon

import (
	"bufio"
	"context"
	"crypto/sha512"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sealdisk/sealdisk/config"
	"github.com/sealdisk/sealdisk/internal/fixture"
	"github.com/sealdisk/sealdisk/store"
)

// lockHelperEnv makes the test binary another process that locks an image file (TestMain):
// "rw:PATH" or "ro:PATH". It prints "locked" or the error and holds the lock until its stdin
// closes; it exits 3 when refused with store.ErrLocked.
const lockHelperEnv = "SEALDISK_DAEMON_LOCK_HELPER"

func TestMain(m *testing.M) {
	if spec := os.Getenv(lockHelperEnv); spec != "" {
		mode, path, _ := strings.Cut(spec, ":")
		f, err := store.OpenLocked(path, mode == "ro")
		if err != nil {
			fmt.Println(err)
			if errors.Is(err, store.ErrLocked) {
				os.Exit(3)
			}
			os.Exit(1)
		}
		fmt.Println("locked")
		io.Copy(io.Discard, os.Stdin)
		f.Close()
		os.Exit(0)
	}
	fixture.Main(m)
}

// lockProcess is another process holding, or refused, a lock on an image file.
type lockProcess struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	line  string // "locked" or its error
}

func otherProcessLocks(t *testing.T, mode, path string) *lockProcess {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), lockHelperEnv+"="+mode+":"+path)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &lockProcess{cmd: cmd, stdin: stdin}
	t.Cleanup(func() { p.stop() })
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("lock process said nothing: %v", err)
	}
	p.line = strings.TrimSpace(line)
	return p
}

// stop makes the process release its lock and exit; it returns the exit code.
func (p *lockProcess) stop() int {
	p.stdin.Close()
	p.cmd.Wait()
	return p.cmd.ProcessState.ExitCode()
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
