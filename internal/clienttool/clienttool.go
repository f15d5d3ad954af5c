// Package clienttool is what the tests that drive real NBD and file clients (nbdinfo, nbdsh,
// fio, qemu-img…) share: finding the tools (a missing one fails under CI=true and skips
// elsewhere) and reading their JSON output. Only tests import it.
package clienttool

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// Require returns the path of tool name, or fails (CI=true) / skips the test when it is
// missing.
func Require(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		Missing(t, name)
	}
	return p
}

// Missing fails the test under CI=true (a missing tool must never turn into a silent skip
// there) and skips it elsewhere.
func Missing(t testing.TB, what string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("required tool %s is missing (CI=true: missing tools fail): run make deps", what)
	}
	t.Skipf("%s not installed (run make deps)", what)
}

var (
	pyOnce sync.Once
	pyDir  string // directory of a python3 that can import libnbd's nbd module
)

// NbdshEnv is the environment for nbdsh, which runs "python3 -m nbd" from PATH: a python3
// without the python3-libnbd module (a pyenv one, say) must not come first.
func NbdshEnv(t testing.TB) []string {
	t.Helper()
	Require(t, "nbdsh")
	pyOnce.Do(func() {
		cands := []string{"/usr/bin/python3"}
		if p, err := exec.LookPath("python3"); err == nil {
			cands = append([]string{p}, cands...)
		}
		for _, p := range cands {
			if exec.Command(p, "-c", "import nbd").Run() == nil {
				pyDir = filepath.Dir(p)
				return
			}
		}
	})
	if pyDir == "" {
		Missing(t, "python3-libnbd")
	}
	return append(os.Environ(), "PATH="+pyDir+string(os.PathListSeparator)+os.Getenv("PATH"))
}

// Export is one export of `nbdinfo --list --json`.
type Export struct {
	Name        string `json:"export-name"`
	Description string `json:"description"`
	Size        int64  `json:"export-size"`
	ReadOnly    bool   `json:"is_read_only"`
	CanTrim     bool   `json:"can_trim"`
	CanFUA      bool   `json:"can_fua"`
	CanFastZero bool   `json:"can_fast_zero"`
	MultiConn   bool   `json:"can_multi_conn"`
	MinBlock    int    `json:"block_size_minimum"`
	PrefBlock   int    `json:"block_size_preferred"`
	MaxBlock    int    `json:"block_size_maximum"`
	Contexts    []string
}

// ParseList parses `nbdinfo --list --json` output.
func ParseList(t testing.TB, out string) []Export {
	t.Helper()
	var v struct {
		Exports []Export `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("nbdinfo --list --json: %v\n%s", err, out)
	}
	return v.Exports
}

// Extent is one entry of `nbdinfo --map --json` (Type: 0 data, 3 hole|zero).
type Extent struct {
	Offset, Length int64
	Type           int
}

// ParseMap parses `nbdinfo --map --json` output.
func ParseMap(t testing.TB, out string) []Extent {
	t.Helper()
	var m []Extent
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("nbdinfo --map --json: %v\n%s", err, out)
	}
	return m
}

// CheckFioVerify requires one fio job's --output-format=json output to report no error,
// n bytes written and n bytes read back by verify.
func CheckFioVerify(t testing.TB, out string, n int64) {
	t.Helper()
	var res struct {
		Jobs []struct {
			Error int `json:"error"`
			Write struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"write"`
			Read struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"read"`
		} `json:"jobs"`
	}
	js := out
	if i := strings.IndexByte(js, '{'); i >= 0 {
		js = js[i:]
	}
	if err := json.Unmarshal([]byte(js), &res); err != nil || len(res.Jobs) != 1 {
		t.Fatalf("fio output: %v\n%s", err, out)
	}
	j := res.Jobs[0]
	if j.Error != 0 || j.Write.IOBytes != n || j.Read.IOBytes != n {
		t.Fatalf("fio: error %d, wrote %d, verified %d bytes (want %d)\n%s", j.Error, j.Write.IOBytes, j.Read.IOBytes, n, out)
	}
}
