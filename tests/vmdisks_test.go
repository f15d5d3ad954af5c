package tests

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// vmConfigServer runs `sealdisk serve --config` on yaml (its vms: section; psp, NBD socket,
// FUSE mount and admin socket are added) and waits for the FUSE files in want.
func vmConfigServer(t *testing.T, e *env, vms string, want ...string) *server {
	t.Helper()
	requireFUSE(t)
	s := &server{log: &bytes.Buffer{}, sock: filepath.Join(e.dir, "nbd.sock"), mnt: filepath.Join(e.dir, "mnt")}
	cfg := filepath.Join(e.dir, "sealdisk.yaml")
	yaml := fmt.Sprintf("psp:\n  dir: %s\nnbd:\n  listen: [\"unix:%s\"]\nfuse:\n  mountpoint: %s\nadmin:\n  socket: %s\nengine:\n  cache_size: 16M\n%s",
		e.psp, s.sock, s.mnt, filepath.Join(e.dir, "admin.sock"), vms)
	if err := os.WriteFile(cfg, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	s.cmd = exec.Command(sealdisk, "serve", "--config", cfg)
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.stop(t) })
	waitFor(t, s, "NBD socket and FUSE files", func() bool {
		for _, f := range append([]string{s.sock}, want...) {
			if _, err := os.Stat(f); err != nil {
				return false
			}
		}
		return true
	})
	return s
}

func qemuIO(t *testing.T, uri string, cmds ...string) {
	t.Helper()
	requireTool(t, "qemu-io")
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out, err := exec.Command("qemu-io", append(args, uri)...).CombinedOutput()
	if err != nil || strings.Contains(string(out), "failed") {
		t.Fatalf("qemu-io %s %q: %v\n%s", uri, cmds, err, out)
	}
}

// fileAt writes (or, with write false, checks) n bytes of b at off of path, with an fsync.
func fileAt(t *testing.T, path string, off int64, n int, b byte, write bool) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	want := bytes.Repeat([]byte{b}, n)
	if write {
		if _, err := f.WriteAt(want, off); err != nil {
			t.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		return
	}
	got := make([]byte, n)
	if _, err := f.ReadAt(got, off); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("%s at %d: want %d × %#x, got %q… (%v)", path, off, n, b, got[:8], err)
	}
}

// TestServeVMWithTwoDisks: one VM, two sealed disks, each its own NBD export and FUSE file
// and its own key slot under the VM's ASID. Writes over NBD and through FUSE land on the
// right disk: after serve stops, each image unseals to what was written to it, and only that.
func TestServeVMWithTwoDisks(t *testing.T) {
	e := newEnv(t)
	a, b := filepath.Join(e.dir, "root.img"), filepath.Join(e.dir, "data.img")
	run(t, append([]string{"create", "--size", "8M", "--out", a}, e.certArgs()...)...)
	run(t, append([]string{"create", "--size", "4M", "--out", b}, e.certArgs()...)...)
	vms := fmt.Sprintf("vms:\n  - name: vm1\n    firmware: %s\n    disks:\n      - image: %s\n      - image: %s\n        export: vm1-data\n", e.fw, a, b)
	mnt := filepath.Join(e.dir, "mnt")
	rootFile, dataFile := filepath.Join(mnt, "vm1.raw"), filepath.Join(mnt, "vm1-data.raw")
	s := vmConfigServer(t, e, vms, rootFile, dataFile)

	var st struct {
		VMs []struct {
			Name  string
			ASID  uint32
			Disks []struct {
				Index   int
				Export  string
				File    string `json:"fuse_file"`
				KeySlot uint32 `json:"key_slot"`
				Size    int64
			}
		}
	}
	if err := json.Unmarshal([]byte(run(t, "admin", "--socket", filepath.Join(e.dir, "admin.sock"), "status", "--json")), &st); err != nil {
		t.Fatal(err)
	}
	if len(st.VMs) != 1 || len(st.VMs[0].Disks) != 2 {
		t.Fatalf("status: %+v", st)
	}
	d0, d1 := st.VMs[0].Disks[0], st.VMs[0].Disks[1]
	if d0.Export != "vm1" || d1.Export != "vm1-data" || d0.File != rootFile || d1.File != dataFile || d0.Size != 8<<20 || d1.Size != 4<<20 ||
		d0.KeySlot != st.VMs[0].ASID || d1.KeySlot == d0.KeySlot || d1.KeySlot&0xfffff != st.VMs[0].ASID {
		t.Fatalf("disks: %+v (VM ASID %d)", st.VMs[0].Disks, st.VMs[0].ASID)
	}

	uri0, uri1 := "nbd+unix:///vm1?socket="+s.sock, "nbd+unix:///vm1-data?socket="+s.sock
	qemuIO(t, uri0, "write -P 0x11 0 1M", "flush")
	qemuIO(t, uri1, "write -P 0x22 0 1M", "flush")
	fileAt(t, rootFile, 2<<20, 1<<20, 0x33, true)
	fileAt(t, dataFile, 2<<20, 1<<20, 0x44, true)
	// each frontend sees the other's writes, on that disk only
	qemuIO(t, uri0, "read -P 0x11 0 1M", "read -P 0x33 2M 1M", "read -P 0 1M 1M")
	qemuIO(t, uri1, "read -P 0x22 0 1M", "read -P 0x44 2M 1M", "read -P 0 3M 1M")
	fileAt(t, rootFile, 0, 1<<20, 0x11, false)
	fileAt(t, dataFile, 0, 1<<20, 0x22, false)

	// Each disk's launch has its own report: disk 1's names it and carries its image, not disk 0's.
	admin := filepath.Join(e.dir, "admin.sock")
	nonce := strings.Repeat("ab", 32)
	var bodies [2]struct {
		Disk       int    `json:"disk"`
		ASID       uint32 `json:"asid"`
		ImageUUID  string `json:"image_uuid"`
		CertDigest string `json:"cert_digest"`
	}
	for i := range bodies {
		rep := filepath.Join(e.dir, fmt.Sprintf("report%d.json", i))
		run(t, "admin", "--socket", admin, "attest", "vm1", "--disk", fmt.Sprint(i), "--nonce", nonce, "--out", rep)
		out := run(t, "attest", "verify", rep, "--vendor-root", filepath.Join(e.vendor, "vendor.crt"), "--nonce", nonce, "--json")
		if err := json.Unmarshal([]byte(out), &bodies[i]); err != nil {
			t.Fatalf("report of disk %d: %v\n%s", i, err, out)
		}
	}
	if bodies[0].Disk != 0 || bodies[1].Disk != 1 || bodies[0].ASID != st.VMs[0].ASID || bodies[1].ASID != st.VMs[0].ASID ||
		bodies[0].ImageUUID == bodies[1].ImageUUID || bodies[0].CertDigest == bodies[1].CertDigest {
		t.Fatalf("reports of the two disks: %+v (VM ASID %d)", bodies, st.VMs[0].ASID)
	}
	if out, err := runErr("admin", "--socket", admin, "attest", "vm1", "--disk", "2", "--nonce", nonce); err == nil || !strings.Contains(out, "disks 0..1, not 2") {
		t.Fatalf("attest of a disk the VM does not have: %v\n%s", err, out)
	}

	// Two disks of one VM on one file (a symlink to the first) are refused, naming the key:
	// through the admin API while serving, and at start.
	c := filepath.Join(e.dir, "c.img")
	run(t, append([]string{"create", "--size", "1M", "--out", c}, e.certArgs()...)...)
	alias := filepath.Join(e.dir, "c-alias.img")
	if err := os.Symlink(c, alias); err != nil {
		t.Fatal(err)
	}
	out, err := runErr("admin", "--socket", filepath.Join(e.dir, "admin.sock"), "attach", "--name", "vm2", "--firmware", e.fw, "--disk", c, "--disk", alias+",read_only")
	if err == nil || !strings.Contains(out, "disks[1].image") || !strings.Contains(out, "the same file") {
		t.Fatalf("admin attach of two disks on one file: %v\n%s", err, out)
	}
	s.stop(t)

	for _, c := range []struct {
		img  string
		size int64
		want [][3]int64 // off, len, byte
	}{
		{a, 8 << 20, [][3]int64{{0, 1 << 20, 0x11}, {1 << 20, 1 << 20, 0}, {2 << 20, 1 << 20, 0x33}, {3 << 20, 5 << 20, 0}}},
		{b, 4 << 20, [][3]int64{{0, 1 << 20, 0x22}, {1 << 20, 1 << 20, 0}, {2 << 20, 1 << 20, 0x44}, {3 << 20, 1 << 20, 0}}},
	} {
		raw := c.img + ".raw"
		run(t, "unseal", "--in", c.img, "--out", raw, "--psp", e.psp)
		got, err := os.ReadFile(raw)
		if err != nil || int64(len(got)) != c.size {
			t.Fatalf("unseal %s: %d bytes, %v", c.img, len(got), err)
		}
		for _, w := range c.want {
			if !bytes.Equal(got[w[0]:w[0]+w[1]], bytes.Repeat([]byte{byte(w[2])}, int(w[1]))) {
				t.Fatalf("%s at %d: not %d × %#x", c.img, w[0], w[1], w[2])
			}
		}
	}

	bad := fmt.Sprintf("vms:\n  - name: vm2\n    firmware: %s\n    disks:\n      - image: %s\n      - image: %s\n", e.fw, c, alias)
	cfg := filepath.Join(e.dir, "bad.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf("psp:\n  dir: %s\nnbd:\n  listen: [\"unix:%s\"]\n%s", e.psp, filepath.Join(e.dir, "bad.sock"), bad)), 0o644)
	if out, err := runErr("serve", "--config", cfg); err == nil || !strings.Contains(out, "invalid config key vms[0].disks[1].image") || !strings.Contains(out, "the same file") {
		t.Fatalf("serve with two disks on one file: %v\n%s", err, out)
	}
}
