package tests

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// configServer is `sealdisk serve --config FILE` with the admin socket and metrics on.
type configServer struct {
	*server
	cfg, admin, metrics string
	e                   *env
}

type testVM struct{ name, img, raw string }

// writeServeConfig writes a serve config for vms (NBD on a unix socket, FUSE, admin socket,
// metrics on a TCP port).
func (s *configServer) writeConfig(t *testing.T, vms ...testVM) {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "psp:\n  dir: %s\nnbd:\n  listen: [\"unix:%s\"]\nfuse:\n  mountpoint: %s\nadmin:\n  socket: %s\n  metrics_listen: \"tcp:%s\"\nengine:\n  cache_size: 16M\nvms:\n",
		s.e.psp, s.sock, s.mnt, s.admin, s.metrics)
	for _, vm := range vms {
		fmt.Fprintf(&b, "  - name: %s\n    image: %s\n    firmware: %s\n", vm.name, vm.img, s.e.fw)
	}
	if len(vms) == 0 {
		b.WriteString("  []\n")
	}
	if err := os.WriteFile(s.cfg, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func startConfigServe(t *testing.T, e *env, vms ...testVM) *configServer {
	t.Helper()
	requireFUSE(t)
	s := &configServer{e: e, server: &server{log: &bytes.Buffer{}, sock: filepath.Join(e.dir, "nbd.sock"), mnt: filepath.Join(e.dir, "mnt")},
		cfg: filepath.Join(e.dir, "sealdisk.yaml"), admin: filepath.Join(e.dir, "admin.sock"), metrics: freePort(t)}
	s.writeConfig(t, vms...)
	s.cmd = exec.Command(sealdisk, "serve", "--config", s.cfg)
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.stop(t) })
	waitFor(t, s.server, "admin socket", func() bool { _, err := os.Stat(s.admin); return err == nil })
	return s
}

// waitFor polls cond for up to 20 s, failing with the server log.
func waitFor(t *testing.T, s *server, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if cond() {
			return
		}
		if s.cmd.ProcessState != nil {
			break
		}
	}
	t.Fatalf("timed out waiting for %s; serve log:\n%s", what, s.log)
}

func (s *configServer) adminRun(t *testing.T, args ...string) string {
	t.Helper()
	return run(t, append([]string{"admin", "--socket", s.admin}, args...)...)
}

type statusJSON struct {
	VMs []struct {
		Name, Export, Source string
		ASID                 int
		File                 string `json:"fuse_file"`
		Image                string
		MappedBytes          int64 `json:"mapped_bytes"`
	}
	NotAttached map[string]string `json:"not_attached"`
}

func (s *configServer) status(t *testing.T) statusJSON {
	t.Helper()
	var st statusJSON
	if err := json.Unmarshal([]byte(s.adminRun(t, "status", "--json")), &st); err != nil {
		t.Fatal(err)
	}
	return st
}

func (s *configServer) vmNames(t *testing.T) string {
	var n []string
	for _, v := range s.status(t).VMs {
		n = append(n, v.Name)
	}
	return strings.Join(n, ",")
}

// checkServed: the VM's NBD export and FUSE file both equal its raw source.
func (s *configServer) checkServed(t *testing.T, vm testVM) {
	t.Helper()
	uri := fmt.Sprintf("nbd+unix:///%s?socket=%s", vm.name, s.sock)
	for _, target := range []string{uri, filepath.Join(s.mnt, vm.name+".raw")} {
		if out := qemuImg(t, "compare", "-f", "raw", "-F", "raw", vm.raw, target); !strings.Contains(out, "identical") {
			t.Fatalf("%s: %s", target, out)
		}
	}
}

// checkGone: neither the export nor the file of vm exists any more.
func (s *configServer) checkGone(t *testing.T, vm testVM) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(s.mnt, vm.name+".raw")); !os.IsNotExist(err) {
		t.Errorf("%s.raw still in the mount after detach: %v", vm.name, err)
	}
	uri := fmt.Sprintf("nbd+unix:///%s?socket=%s", vm.name, s.sock)
	if out, err := exec.Command("qemu-img", "info", uri).CombinedOutput(); err == nil {
		t.Errorf("export %s still served after detach:\n%s", vm.name, out)
	}
}

func newTestVM(t *testing.T, e *env, name string, seed byte, size int64) testVM {
	vm := testVM{name: name, raw: filepath.Join(e.dir, name+".raw"), img: filepath.Join(e.dir, name+".img")}
	fill(t, vm.raw, 0, size, seed)
	e.seal(t, vm.raw, vm.img)
	return vm
}

// TestAdminAttachDetachReload: two VMs served at once over NBD and FUSE, each showing only its
// own disk; detaching one (admin API, then SIGHUP with an edited config) leaves the other
// serving; a detached VM's last writes are in its image; attach and reload bring VMs back;
// attestation, status, metrics and refusals through the admin socket.
func TestAdminAttachDetachReload(t *testing.T) {
	requireTool(t, "qemu-img")
	requireTool(t, "qemu-io")
	e := newEnv(t)
	vm1 := newTestVM(t, e, "vm1", 11, 8<<20)
	vm2 := newTestVM(t, e, "vm2", 22, 12<<20)
	s := startConfigServe(t, e, vm1, vm2)
	if got := s.vmNames(t); got != "vm1,vm2" {
		t.Fatalf("status lists %q", got)
	}
	s.checkServed(t, vm1)
	s.checkServed(t, vm2)

	// Write through NBD, detach through the admin API: vm1 leaves, its write is in the image
	// (unsealed while the server keeps running), vm2 keeps serving.
	uri1 := fmt.Sprintf("nbd+unix:///vm1?socket=%s", s.sock)
	if out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", uri1).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v\n%s", err, out)
	}
	s.adminRun(t, "detach", "vm1")
	s.checkGone(t, vm1)
	s.checkServed(t, vm2)
	run(t, "unseal", "--in", vm1.img, "--out", vm1.raw+".after", "--psp", e.psp)
	got, _ := os.ReadFile(vm1.raw + ".after")
	if !bytes.Equal(got[1<<20:1<<20+64<<10], bytes.Repeat([]byte{0x5a}, 64<<10)) {
		t.Fatal("the write acknowledged before detach is not in the image")
	}
	os.Rename(vm1.raw+".after", vm1.raw) // vm1's expected content from now on

	// Refusals name what was wrong and change nothing.
	bad := filepath.Join(e.dir, "evil.fd")
	os.WriteFile(bad, []byte("other firmware"), 0o644)
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"attach", "--name", "vm1", "--image", vm1.img, "--firmware", bad}, "firmware measurement not allowed"},
		{[]string{"attach", "--name", "vm2", "--image", vm1.img, "--firmware", e.fw}, "already in use"},
		{[]string{"attach", "--name", "x", "--image", filepath.Join(e.dir, "nope.img"), "--firmware", e.fw}, "image"},
		{[]string{"detach", "vm9"}, "no such VM"},
		{[]string{"attest", "vm2", "--nonce", "00"}, "nonce"},
	} {
		out, err := runErr(append([]string{"admin", "--socket", s.admin}, c.args...)...)
		if err == nil || !strings.Contains(out, c.want) {
			t.Errorf("admin %v: err %v, want %q in:\n%s", c.args, err, c.want, out)
		}
	}
	s.checkServed(t, vm2)

	// Attach through the admin API.
	s.adminRun(t, "attach", "--name", "vm1", "--image", vm1.img, "--firmware", e.fw)
	s.checkServed(t, vm1)
	if got := s.vmNames(t); got != "vm1,vm2" {
		t.Fatalf("after attach, status lists %q", got)
	}

	// Attestation of a served VM verifies against the vendor root with the caller's nonce.
	nonce := "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
	rep := filepath.Join(e.dir, "report.json")
	s.adminRun(t, "attest", "vm2", "--nonce", nonce, "--out", rep)
	if out := run(t, "attest", "verify", rep, "--vendor-root", filepath.Join(e.vendor, "vendor.crt"), "--nonce", nonce); !strings.Contains(out, "vm2") {
		t.Errorf("attest verify output does not name vm2:\n%s", out)
	}

	// SIGHUP with vm2 removed from the config: vm2 leaves; vm1 (admin-attached, not in the
	// config) stays.
	s.writeConfig(t)
	s.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, s.server, "vm2 to be detached by SIGHUP", func() bool { return s.vmNames(t) == "vm1" })
	s.checkGone(t, vm2)
	s.checkServed(t, vm1)

	// admin reload with both listed: vm2 is back, vm1 now belongs to the config.
	s.writeConfig(t, vm1, vm2)
	if out := s.adminRun(t, "reload"); !strings.Contains(out, "attached: vm2") {
		t.Errorf("reload output:\n%s", out)
	}
	st := s.status(t)
	if len(st.VMs) != 2 || st.VMs[0].Source != "config" || st.VMs[1].Source != "config" {
		t.Errorf("after reload: %+v", st.VMs)
	}
	// engine.mmap defaults to on: each image file is mapped whole
	for _, v := range st.VMs {
		if fi, err := os.Stat(v.Image); err != nil || v.MappedBytes != fi.Size() {
			t.Errorf("%s: %d bytes mapped of its image (%v)", v.Name, v.MappedBytes, err)
		}
	}
	if out := s.adminRun(t, "status"); !strings.Contains(out, "READS") || !strings.Contains(out, " mapped ") {
		t.Errorf("status table does not say reads are mapped:\n%s", out)
	}
	s.checkServed(t, vm1)
	s.checkServed(t, vm2)

	// A broken config is refused by reload and changes nothing.
	os.WriteFile(s.cfg, []byte("vms: [{name: vm1, bogus: 1}]\n"), 0o644)
	if out, err := runErr("admin", "--socket", s.admin, "reload"); err == nil || !strings.Contains(out, "bogus") {
		t.Errorf("reload of a bad config: %v\n%s", err, out)
	}
	if got := s.vmNames(t); got != "vm1,vm2" {
		t.Fatalf("after a failed reload, status lists %q", got)
	}

	// Metrics: through the admin socket and the metrics listener.
	m := s.adminRun(t, "metrics")
	for _, want := range []string{`sealdisk_vms_attached 2`, `sealdisk_nbd_requests_total{export="vm2",op="read",result="ok"}`,
		`sealdisk_engine_read_bytes_total`, `sealdisk_engine_sync_failures_total 0`, `sealdisk_engine_direct_sectors_total`, `sealdisk_vm_attach_failures_total 3`, `sealdisk_engine_ring_occupancy{shard="0"}`,
		`sealdisk_vm_image_mapped_bytes{disk="0",vm="vm1"} `} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	resp, err := http.Get("http://" + s.metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), "sealdisk_nbd_request_duration_seconds_bucket") {
		t.Errorf("metrics listener: %s\n%.500s", resp.Status, body)
	}
	if fi, err := os.Stat(s.admin); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("admin socket mode: %v %v", fi.Mode(), err)
	}
}
