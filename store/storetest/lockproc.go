package storetest

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/sealdisk/sealdisk/store"
)

// lockProcessEnv makes a test binary the other process of StartLockProcess: it locks the file
// named in the variable ("rw:PATH" or "ro:PATH"), prints "locked" or the error, and holds the
// lock until its stdin closes; it exits 3 when refused with store.ErrLocked.
const lockProcessEnv = "SEALDISK_STORETEST_LOCK_PROCESS"

// LockProcessMain turns this test binary into the lock process when StartLockProcess started
// it (and then never returns); otherwise it returns at once. Call it first in TestMain.
func LockProcessMain() {
	spec := os.Getenv(lockProcessEnv)
	if spec == "" {
		return
	}
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

// LockProcess is another process holding, or refused, a lock on an image file: the open-file-
// description locks of package store are per process, so only another process shows them.
type LockProcess struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	Line  string // its first line: "locked" or the error
}

// StartLockProcess runs this test binary again (its TestMain calls LockProcessMain) to lock
// path read-only or read-write, and waits for its first line; the test's cleanup stops it.
func StartLockProcess(t testing.TB, readOnly bool, path string) *LockProcess {
	t.Helper()
	mode := "rw"
	if readOnly {
		mode = "ro"
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), lockProcessEnv+"="+mode+":"+path)
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
	p := &LockProcess{cmd: cmd, stdin: stdin}
	t.Cleanup(func() { p.Stop() })
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("lock process said nothing: %v", err)
	}
	p.Line = strings.TrimSpace(line)
	return p
}

// Stop makes the process release its lock and exit, and returns its exit code (3: the lock
// was refused). Stopping twice is harmless.
func (p *LockProcess) Stop() int {
	p.stdin.Close()
	if p.cmd.ProcessState == nil {
		p.cmd.Wait()
	}
	return p.cmd.ProcessState.ExitCode()
}
