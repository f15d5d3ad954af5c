//go:build rbd

package tests

// End-to-end tests of images on Ceph RBD, against the throwaway cluster of internal/cephtest
// (started once for this test binary, stopped by TestMain). Built and run with the tags rbd and
// pacific (`make e2e`), which the binary under test is built with too.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/internal/cephtest"
)

func init() {
	buildFlags = []string{"-tags", "rbd,pacific"}
	atExit = append(atExit, cephtest.StopShared)
}

// rbdEnv is env plus the cluster, reached by every sealdisk the test runs through the
// SEALDISK_CEPH_* environment (paths only: the key stays in the keyring file).
func rbdEnv(t *testing.T) (*env, *cephtest.Cluster) {
	t.Helper()
	c := cephtest.Shared(t)
	t.Setenv("SEALDISK_CEPH_CONF", c.Conf)
	t.Setenv("SEALDISK_CEPH_ID", cephtest.ClientID)
	t.Setenv("SEALDISK_CEPH_KEYRING", c.Keyring)
	return newEnv(t), c
}

func rbdLoc(name string) string { return "rbd:" + cephtest.Pool + "/" + name }

// TestRBDSealServeUnseal: a raw image sealed into RBD is seen by rbd and by qemu's own rbd
// driver (as ciphertext), served over NBD and FUSE equal to the input, written through NBD,
// and then unsealed equal to what was written — from RBD, and offline from an `rbd export`
// file. scrub passes, inspect names the location, reseal moves it to a second chip.
func TestRBDSealServeUnseal(t *testing.T) {
	e, c := rbdEnv(t)
	requireTool(t, "nbdinfo")
	name := cephtest.UniqueImage("seal")
	loc := rbdLoc(name)
	src := filepath.Join(e.dir, "disk.raw")
	fill(t, src, 0, 24<<20, 5)
	e.seal(t, src, loc)

	if _, err := c.RBD("info", cephtest.Pool+"/"+name); err != nil {
		t.Fatal(err)
	}
	if out, err := c.RBD("ls", cephtest.Pool); err != nil || strings.Contains(string(out), name+".tmp") {
		t.Fatalf("the seal's .tmp image left behind: %s %v", out, err)
	}
	info := qemuImg(t, "info", "--output=json", c.QemuSpec(name))
	var qi struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal([]byte(info), &qi); err != nil || qi.VirtualSize <= 24<<20 {
		t.Fatalf("qemu-img info of the RBD image: %v\n%s", err, info)
	}
	// qemu reads the RBD image itself: ciphertext, not the input
	if out, _ := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", src, c.QemuSpec(name)).CombinedOutput(); strings.Contains(string(out), "identical") {
		t.Fatal("the RBD image holds the plaintext")
	}
	if out := run(t, "inspect", loc); !strings.Contains(out, loc) || !strings.Contains(out, "virtual size:          25165824") {
		t.Fatalf("inspect:\n%s", out)
	}
	run(t, "scrub", loc, "--psp", e.psp)

	s := startServe(t, e, loc, true)
	if out, err := exec.Command("nbdinfo", s.uri()).CombinedOutput(); err != nil || !strings.Contains(string(out), "export-size: 25165824") {
		t.Fatalf("nbdinfo: %v\n%s", err, out)
	}
	if out := qemuImg(t, "compare", "-f", "raw", "-F", "raw", src, s.uri()); !strings.Contains(out, "identical") {
		t.Fatal(out)
	}
	if out := qemuImg(t, "compare", "-f", "raw", "-F", "raw", src, filepath.Join(s.mnt, "vm1.raw")); !strings.Contains(out, "identical") {
		t.Fatal(out)
	}
	other := filepath.Join(e.dir, "other.raw")
	fill(t, other, 0, 24<<20, 9)
	qemuImg(t, "convert", "-n", "-f", "raw", "-O", "raw", other, s.uri())
	s.stop(t)

	run(t, "unseal", "--in", loc, "--out", filepath.Join(e.dir, "back.raw"), "--psp", e.psp)
	cmpFiles(t, other, filepath.Join(e.dir, "back.raw"), 24<<20)
	exported := filepath.Join(e.dir, "exported.img")
	if out, err := c.RBD("export", "--no-progress", cephtest.Pool+"/"+name, exported); err != nil {
		t.Fatal(err, string(out))
	}
	run(t, "unseal", "--in", exported, "--out", filepath.Join(e.dir, "fromexport.raw"), "--psp", e.psp)
	cmpFiles(t, other, filepath.Join(e.dir, "fromexport.raw"), 24<<20)
	run(t, "scrub", loc, "--psp", e.psp)

	// reseal to a second host's chip, in place in the pool; that chip unseals it
	psp2 := filepath.Join(e.dir, "psp2")
	run(t, "psp", "init", "--dir", psp2, "--vendor", e.vendor)
	run(t, "psp", "trust", "add", "--dir", psp2, filepath.Join(e.prov, "provider.pub"))
	run(t, "reseal", "--in", loc, "--psp", e.psp, "--to-chip", filepath.Join(psp2, "chip.crt"),
		"--vendor-root", filepath.Join(e.vendor, "vendor.crt"), "--provider-key", filepath.Join(e.prov, "provider.key"))
	run(t, "unseal", "--in", loc, "--out", filepath.Join(e.dir, "host2.raw"), "--psp", psp2)
	cmpFiles(t, other, filepath.Join(e.dir, "host2.raw"), 24<<20)
	if out, err := runErr("unseal", "--in", loc, "--out", filepath.Join(e.dir, "host1.raw"), "--psp", e.psp); err == nil {
		t.Fatalf("the first chip still unseals a resealed image:\n%s", out)
	}
}

// TestRBDLocationErrors: bad locations and bad cluster settings fail with an error naming
// what is wrong, and no key ever appears in a message.
func TestRBDLocationErrors(t *testing.T) {
	e, c := rbdEnv(t)
	for args, want := range map[string]string{
		"inspect rbd:nopool":                       `want rbd:POOL/IMAGE`,
		"inspect rbd:" + cephtest.Pool + "/absent": "rbd:rbd/absent",
		"inspect rbd:nopool/x":                     `pool "nopool"`,
	} {
		out, err := runErr(strings.Fields(args)...)
		if err == nil || !strings.Contains(out, want) {
			t.Errorf("sealdisk %s: %v\n%s\nwant %q", args, err, out, want)
		}
	}
	out, err := runErr("inspect", rbdLoc("x"), "--ceph-keyring", filepath.Join(e.dir, "nokeyring"))
	if err == nil || !strings.Contains(out, "keyring") {
		t.Errorf("missing keyring: %v\n%s", err, out)
	}
	out, err = runErr("inspect", rbdLoc("x"), "--ceph-id", "client.sealdisk")
	if err == nil || !strings.Contains(out, "ceph.id") {
		t.Errorf("ceph id with client.: %v\n%s", err, out)
	}
	// a user whose key the keyring does not hold is refused by cephx, and the message carries
	// no key
	key, _ := os.ReadFile(c.Keyring)
	out, err = runErr("inspect", rbdLoc("x"), "--ceph-id", "nobody")
	if err == nil || !strings.Contains(out, "client.nobody") {
		t.Errorf("unknown cephx user: %v\n%s", err, out)
	}
	for _, line := range strings.Split(string(key), "\n") {
		if k, ok := strings.CutPrefix(strings.TrimSpace(line), "key = "); ok && strings.Contains(out, k) {
			t.Fatal("a cephx key in an error message")
		}
	}
	// seal refuses an existing RBD image
	name := cephtest.UniqueImage("exists")
	if out, err := c.RBD("create", "--size", "1M", cephtest.Pool+"/"+name); err != nil {
		t.Fatal(err, string(out))
	}
	src := filepath.Join(e.dir, "disk.raw")
	fill(t, src, 0, 1<<20, 1)
	out, err = runErr(append([]string{"seal", "--in", src, "--out", rbdLoc(name)}, e.certArgs()...)...)
	if err == nil || !strings.Contains(out, "already exists") {
		t.Fatalf("seal over an RBD image: %v\n%s", err, out)
	}
}

// TestRBDTwoServesAndKill9: two hosts' worth of serve on one RBD image. The second is refused
// while the first holds the exclusive lock (so is unseal); the first is killed with SIGKILL
// after a flushed write; the second then attaches (once the cluster drops the dead client)
// and serves every flushed byte; unseal afterwards agrees.
func TestRBDTwoServesAndKill9(t *testing.T) {
	e, c := rbdEnv(t)
	loc := rbdLoc(cephtest.UniqueImage("two"))
	run(t, append([]string{"create", "--size", "16M", "--out", loc}, e.certArgs()...)...)
	first := startServe(t, e, loc, false)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, sealdisk, "serve", "--psp", e.psp, "--image", loc, "--firmware", e.fw,
		"--name", "vm2", "--nbd", "unix:"+filepath.Join(e.dir, "nbd2.sock")).CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("the second serve kept running on a served RBD image:\n%s", out)
	}
	if err == nil || !strings.Contains(string(out), "image is locked by another user") || !strings.Contains(string(out), "RBD exclusive lock held by") {
		t.Fatalf("second serve: %v\n%s", err, out)
	}
	if out, err := runErr("unseal", "--in", loc, "--out", filepath.Join(e.dir, "early.raw"), "--psp", e.psp); err == nil || !strings.Contains(out, "is in use") {
		t.Fatalf("unseal of a served RBD image: %v\n%s", err, out)
	}

	data := filepath.Join(e.dir, "data.raw")
	fill(t, data, 0, 16<<20, 7)
	qemuImg(t, "convert", "-n", "-f", "raw", "-O", "raw", data, first.uri()) // flushes at its end
	first.cmd.Process.Signal(syscall.SIGKILL)
	first.cmd.Wait()
	killed := time.Now()

	// The dead client's watch lingers until the OSD times it out (osd_client_watch_timeout,
	// cephtest.WatchTimeout on the test cluster); then librbd breaks its lock for the next client.
	for {
		out, err := c.RBD("status", strings.TrimPrefix(loc, "rbd:"))
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(out), "Watchers: none") {
			break
		}
		if time.Since(killed) > 60*time.Second {
			t.Fatalf("the killed serve still watches the image after 60 s:\n%s", out)
		}
		time.Sleep(500 * time.Millisecond)
	}
	second := startServe(t, e, loc, false)
	t.Logf("second serve attached %v after the first was killed", time.Since(killed).Round(100*time.Millisecond))
	if out := qemuImg(t, "compare", "-f", "raw", "-F", "raw", data, second.uri()); !strings.Contains(out, "identical") {
		t.Fatalf("after kill -9: %s", out)
	}
	second.stop(t)
	run(t, "unseal", "--in", loc, "--out", filepath.Join(e.dir, "after.raw"), "--psp", e.psp)
	cmpFiles(t, data, filepath.Join(e.dir, "after.raw"), 16<<20)
}

// TestRBDGuestBoots: a guest boots with its root on a sealed image in RBD, over NBD, and the
// marker it writes is in the image afterwards.
func TestRBDGuestBoots(t *testing.T) {
	if testing.Short() {
		t.Skip("guest boot in -short mode")
	}
	e, _ := rbdEnv(t)
	requireTool(t, "mkfs.ext4")
	raw := filepath.Join(e.dir, "root.raw")
	if out, err := exec.Command("../scripts/guest/mkroot.sh", raw, "64M").CombinedOutput(); err != nil {
		t.Fatalf("mkroot: %v\n%s", err, out)
	}
	loc := rbdLoc(cephtest.UniqueImage("guest"))
	e.seal(t, raw, loc)
	s := startServe(t, e, loc, false)
	marker := fmt.Sprintf("rbd-%d", time.Now().UnixNano())
	checkConsole(t, bootGuest(t, "file="+s.uri()+",format=raw,if=virtio", marker), marker)
	s.stop(t)
	requireTool(t, "debugfs")
	out := filepath.Join(e.dir, "unsealed.raw")
	run(t, "unseal", "--in", loc, "--out", out, "--psp", e.psp)
	b, err := exec.Command("debugfs", "-R", "cat /marker.txt", out).Output()
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(b)); got != marker {
		t.Fatalf("marker after serve stopped: %q, want %q", got, marker)
	}
}
