package fusefs

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/sealdisk/sealdisk/engine"
)

// TestFioMemDevice runs scripts/bench/fio-file.sh (fio libaio on the file, the four
// BENCHMARKS.md workloads) against this filesystem over a 1 GiB MemDevice: the FUSE
// frontend's own ceiling, without the engine. Opt-in, it measures rather than checks:
//
//	FUSE_FIO_BENCH=$PWD/scripts/bench/fio-file.sh RT=5 go test -run=FioMemDevice -v ./fusefs
func TestFioMemDevice(t *testing.T) {
	script := os.Getenv("FUSE_FIO_BENCH")
	if script == "" {
		t.Skip("FUSE_FIO_BENCH (path of fio-file.sh) not set: measurement only")
	}
	requireTool(t, "fio")
	dev := engine.NewMemDevice(1<<30, false)
	fill := make([]byte, 1<<20)
	for off := int64(0); off < 1<<30; off += int64(len(fill)) {
		if err := dev.WriteAt(t.Context(), fill, off, false); err != nil {
			t.Fatal(err)
		}
	}
	f := mount(t)
	if err := f.Add("m", dev); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("bash", script, filepath.Join(f.Mountpoint(), "m.raw"), "fuse-memdevice").CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", script, err, out)
	}
	t.Log("\n" + string(out))
}
