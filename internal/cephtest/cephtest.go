// Package cephtest starts and stops a throwaway single-node Ceph cluster for tests: one mon and
// one OSD (bluestore over a sparse file) from one temporary directory, bound to 127.0.0.1 on a
// free port, msgr2 only, cephx on, no mgr and no systemd. The daemons are children of the test
// binary (and die with it: Pdeathsig); Stop ends exactly those two pids, OSD before mon.
//
// A test binary shares one cluster: Main from TestMain, Shared from a test. It needs the Debian
// packages ceph-mon, ceph-osd, ceph-common and uuid-runtime (scripts/deps.sh); where they are
// missing the tests are skipped, except with CI=true, where that fails them.
package cephtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
)

// Pool is the RBD pool every cluster has, initialised with `rbd pool init`.
const Pool = "rbd"

// ClientID is the cephx user sealdisk connects as (client.sealdisk), with the caps OPERATOR.md
// documents: mon 'profile rbd', osd 'profile rbd pool=rbd'.
const ClientID = "sealdisk"

// Tools are the programs a cluster needs.
var Tools = []string{"ceph-mon", "ceph-osd", "ceph", "rbd", "ceph-authtool", "monmaptool"}

// Cluster is a running throwaway cluster.
type Cluster struct {
	Dir     string // everything lives here: ceph.conf, keyrings, mon and OSD data, logs
	Conf    string // ceph.conf, for librados clients, rbd and qemu
	Keyring string // client.sealdisk's keyring
	Admin   string // client.admin's keyring
	MonAddr string // 127.0.0.1:PORT

	mon, osd  *exec.Cmd
	removeDir bool
}

// WatchTimeout is the test cluster's osd_client_watch_timeout: how long the OSD keeps the watch
// of a client that stopped answering, so how long a killed client's exclusive lock outlives it.
// Short, for the kill -9 tests; not so short that a client slowed by a loaded machine loses its
// watch (Ceph's default is 30 s).
const WatchTimeout = 10 * time.Second

// Start makes and starts a cluster in dir ("" for a new temporary directory, removed by Stop)
// with the WatchTimeout of the tests.
func Start(dir string) (*Cluster, error) { return StartWith(dir, WatchTimeout) }

// StartWith is Start with another osd_client_watch_timeout.
func StartWith(dir string, watchTimeout time.Duration) (c *Cluster, err error) {
	for _, tool := range Tools {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("failed to start a Ceph cluster: %s not found (scripts/deps.sh installs ceph-mon ceph-osd ceph-common): %w", tool, err)
		}
	}
	c = &Cluster{Dir: dir}
	if dir == "" {
		// Short and outside t.TempDir: admin sockets live here and a unix path is 108 bytes.
		if c.Dir, err = os.MkdirTemp("", "cephtest"); err != nil {
			return nil, err
		}
		c.removeDir = true
	}
	defer func() {
		if err != nil {
			c.Stop()
		}
	}()
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	c.MonAddr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	c.Conf = filepath.Join(c.Dir, "ceph.conf")
	c.Admin = filepath.Join(c.Dir, "client.admin.keyring")
	c.Keyring = filepath.Join(c.Dir, "client."+ClientID+".keyring")
	for _, d := range []string{"mon", "osd0", "run", "log"} {
		if err := os.MkdirAll(filepath.Join(c.Dir, d), 0o700); err != nil {
			return nil, err
		}
	}
	fsid := uuid.NewString()
	if err := os.WriteFile(c.Conf, []byte(c.config(fsid, watchTimeout)), 0o600); err != nil {
		return nil, err
	}
	monKeyring := filepath.Join(c.Dir, "mon.a.keyring")
	monmap := filepath.Join(c.Dir, "monmap")
	steps := [][]string{
		{"ceph-authtool", "--create-keyring", monKeyring, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"},
		{"ceph-authtool", "--create-keyring", c.Admin, "--gen-key", "-n", "client.admin",
			"--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *"},
		{"ceph-authtool", monKeyring, "--import-keyring", c.Admin},
		{"monmaptool", "--create", "--addv", "a", "[v2:" + c.MonAddr + "]", "--fsid", fsid, monmap},
		{"ceph-mon", "-c", c.Conf, "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", monKeyring},
	}
	for _, s := range steps {
		if _, err := c.run(s...); err != nil {
			return nil, err
		}
	}
	if c.mon, err = c.daemon("ceph-mon", "-c", c.Conf, "-f", "-i", "a"); err != nil {
		return nil, err
	}
	// The OSD: registered with its own cephx key, its bluestore made over a sparse file.
	osdUUID := uuid.NewString()
	osdKeyring := filepath.Join(c.Dir, "osd.0.keyring")
	if _, err := c.run("ceph-authtool", "--create-keyring", osdKeyring, "--gen-key", "-n", "osd.0"); err != nil {
		return nil, err
	}
	key, err := c.run("ceph-authtool", "-p", "-n", "osd.0", osdKeyring)
	if err != nil {
		return nil, err
	}
	secret, _ := json.Marshal(map[string]string{"cephx_secret": strings.TrimSpace(string(key))})
	secretFile := filepath.Join(c.Dir, "osd.0.json")
	if err := os.WriteFile(secretFile, secret, 0o600); err != nil {
		return nil, err
	}
	if _, err := c.Ceph("osd", "new", osdUUID, "-i", secretFile); err != nil {
		return nil, err
	}
	if _, err := c.run("ceph-osd", "-c", c.Conf, "-i", "0", "--mkfs", "--osd-uuid", osdUUID); err != nil {
		return nil, err
	}
	if c.osd, err = c.daemon("ceph-osd", "-c", c.Conf, "-f", "-i", "0"); err != nil {
		return nil, err
	}
	if _, err := c.Ceph("osd", "pool", "create", Pool, "8"); err != nil {
		return nil, err
	}
	// rbd pool init returns only once the pool's PGs are active: the readiness check.
	if _, err := c.RBD("pool", "init", Pool); err != nil {
		return nil, err
	}
	if _, err := c.Ceph("auth", "get-or-create", "client."+ClientID, "mon", "profile rbd",
		"osd", "profile rbd pool="+Pool, "-o", c.Keyring); err != nil {
		return nil, err
	}
	return c, nil
}

// config is the cluster's ceph.conf: one OSD happy with pools of size 1, a fast start, and the
// given watch timeout.
func (c *Cluster) config(fsid string, watchTimeout time.Duration) string {
	d := c.Dir
	return fmt.Sprintf(`[global]
fsid = %s
mon host = v2:%s
public addr = 127.0.0.1
ms bind msgr1 = false
ms bind msgr2 = true
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
paxos propose interval = 0.1
mon data avail warn = 1
run dir = %[3]s/run
admin socket = %[3]s/run/$name.asok
log file = %[3]s/log/$name.log
keyring = %[3]s/$name.keyring
mon data = %[3]s/mon
osd data = %[3]s/osd0
osd objectstore = bluestore
bluestore block create = true
bluestore block size = 21474836480
bluestore fsck on mkfs = false
osd max object name len = 256
osd max object namespace len = 64
osd client watch timeout = %[4]d
`, fsid, c.MonAddr, d, int(watchTimeout/time.Second))
}

// Ceph runs the ceph CLI as client.admin.
func (c *Cluster) Ceph(args ...string) ([]byte, error) {
	return c.run(append([]string{"ceph", "-c", c.Conf, "--connect-timeout", "30"}, args...)...)
}

// RBD runs the rbd CLI as client.admin.
func (c *Cluster) RBD(args ...string) ([]byte, error) {
	return c.run(append([]string{"rbd", "-c", c.Conf}, args...)...)
}

// QemuSpec is the qemu rbd: filename of pool/image as client.sealdisk (qemu-block-extra).
func (c *Cluster) QemuSpec(image string) string {
	return fmt.Sprintf("rbd:%s/%s:conf=%s:id=%s:keyring=%s", Pool, image, c.Conf, ClientID, c.Keyring)
}

// UniqueImage returns a name not used before in this cluster, for a test's image.
func UniqueImage(prefix string) string {
	b := make([]byte, 4)
	rand.Read(b)
	return fmt.Sprintf("%s-%x", prefix, b)
}

func (c *Cluster) run(args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Dir = c.Dir
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.Bytes(), fmt.Errorf("failed to run %s: %w: %s", strings.Join(args, " "), err, lastLines(errb.String(), 5))
	}
	return out.Bytes(), nil
}

// daemon starts a Ceph daemon in the foreground as a child that dies with this process.
func (c *Cluster) daemon(args ...string) (*exec.Cmd, error) {
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Dir = c.Dir
	out, err := os.Create(filepath.Join(c.Dir, "log", filepath.Base(args[0])+".out"))
	if err != nil {
		return nil, err
	}
	defer out.Close()
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("failed to start %s: %w", args[0], err)
	}
	return cmd, nil
}

// Stop ends the OSD, then the mon (SIGTERM, SIGKILL after 10 s), and removes a temporary
// directory. Only the two processes Start started are signalled.
func (c *Cluster) Stop() error {
	var errs []string
	for _, d := range []*exec.Cmd{c.osd, c.mon} {
		if d == nil || d.Process == nil {
			continue
		}
		d.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { d.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			d.Process.Kill()
			<-done
			errs = append(errs, fmt.Sprintf("%s ignored SIGTERM", d.Path))
		}
	}
	c.osd, c.mon = nil, nil
	if c.removeDir {
		os.RemoveAll(c.Dir)
	}
	if errs != nil {
		return fmt.Errorf("failed to stop the Ceph cluster cleanly: %s", strings.Join(errs, "; "))
	}
	return nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

var shared struct {
	once    sync.Once
	c       *Cluster
	err     error
	started time.Duration
}

// Shared returns the test binary's cluster, starting it on first use. Where the Ceph tools are
// missing it skips t, or fails it with CI=true.
func Shared(t testing.TB) *Cluster {
	t.Helper()
	Require(t)
	shared.once.Do(func() {
		start := time.Now()
		shared.c, shared.err = Start("")
		shared.started = time.Since(start)
	})
	if shared.err != nil {
		t.Fatal(shared.err)
	}
	return shared.c
}

// Require skips t where a Ceph tool is missing, or fails it with CI=true.
func Require(t testing.TB) {
	t.Helper()
	for _, tool := range Tools {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("required tool %s missing (CI=true; scripts/deps.sh installs it)", tool)
			}
			t.Skipf("%s missing (run scripts/deps.sh)", tool)
		}
	}
}

// Main runs the tests and stops the shared cluster if one was started; call it from TestMain.
func Main(m *testing.M) int {
	code := m.Run()
	if err := StopShared(); err != nil && code == 0 {
		code = 1
	}
	return code
}

// StopShared stops the shared cluster if one was started, for a TestMain that cannot use Main;
// an unclean stop is printed and returned.
func StopShared() error {
	if shared.c == nil {
		return nil
	}
	if testing.Verbose() {
		fmt.Fprintf(os.Stderr, "cephtest: cluster started in %v\n", shared.started.Round(time.Millisecond))
	}
	err := shared.c.Stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
	}
	shared.c = nil
	return err
}
