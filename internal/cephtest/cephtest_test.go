package cephtest

import (
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestMain(m *testing.M) { os.Exit(Main(m)) }

// A cluster of its own: it starts, serves rbd as client.sealdisk with that user's caps only,
// and Stop ends both daemons and removes the directory.
func TestStartStop(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a cluster")
	}
	Require(t)
	start := time.Now()
	c, err := Start("")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("started in %v", time.Since(start))
	if !strings.HasPrefix(c.MonAddr, "127.0.0.1:") {
		t.Fatalf("mon on %s, not loopback", c.MonAddr)
	}
	if out, err := c.run("rbd", "-c", c.Conf, "--id", ClientID, "--keyring", c.Keyring, "create", "--size", "1M", Pool+"/probe"); err != nil {
		t.Fatalf("client.%s cannot create an image: %v %s", ClientID, err, out)
	}
	if _, err := c.run("ceph", "-c", c.Conf, "--id", ClientID, "--keyring", c.Keyring, "osd", "pool", "create", "other", "8"); err == nil {
		t.Fatalf("client.%s could create a pool: its caps are too wide", ClientID)
	}
	mon, osd := c.mon.Process.Pid, c.osd.Process.Pid
	start = time.Now()
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	t.Logf("stopped in %v", time.Since(start))
	for _, pid := range []int{mon, osd} {
		if syscall.Kill(pid, 0) == nil {
			t.Fatalf("pid %d still runs after Stop", pid)
		}
	}
	if _, err := os.Stat(c.Dir); !os.IsNotExist(err) {
		t.Fatalf("%s left behind: %v", c.Dir, err)
	}
}
