// Command cluster runs the test cluster of internal/cephtest by itself, for benchmarks and for
// trying sealdisk against Ceph by hand: it starts one in a new temporary directory, prints the
// paths a client needs as shell assignments, writes them to the file given as the only
// argument (if any), and stops the cluster (OSD, then mon) on SIGINT or SIGTERM.
//
//	go run ./internal/cephtest/cluster /tmp/ceph.env & ... ; source /tmp/ceph.env
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/sealdisk/sealdisk/internal/cephtest"
)

func main() {
	// Ceph's default watch timeout: a benchmark on a loaded machine must not lose watches.
	c, err := cephtest.StartWith("", 30*time.Second)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	env := fmt.Sprintf("CEPH_DIR=%s\nCEPH_CONF=%s\nCEPH_ID=%s\nCEPH_KEYRING=%s\nCEPH_POOL=%s\n",
		c.Dir, c.Conf, cephtest.ClientID, c.Keyring, cephtest.Pool)
	fmt.Print(env)
	if len(os.Args) > 1 {
		if err := os.WriteFile(os.Args[1], []byte(env), 0o600); err != nil {
			fmt.Fprintln(os.Stderr, err)
		}
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	if err := c.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
