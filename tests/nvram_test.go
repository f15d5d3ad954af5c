package tests

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Debian's ovmf (scripts/deps.sh): the 4 MiB code and its variable-store template.
const (
	ovmfCode = "/usr/share/OVMF/OVMF_CODE_4M.fd"
	ovmfVars = "/usr/share/OVMF/OVMF_VARS_4M.fd"
)

func requireOVMF(t *testing.T) {
	t.Helper()
	requireTool(t, "qemu-system-x86_64")
	for _, f := range []string{ovmfCode, ovmfVars} {
		if _, err := os.Stat(f); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s missing (CI=true): install Debian's ovmf (make deps)", f)
			}
			t.Skipf("%s missing: install Debian's ovmf", f)
		}
	}
}

// TestNVRAMWrittenByOVMF: a VM's UEFI variable store is a sealed image served as the FUSE file
// vm1.nvram. OVMF_CODE is the VM's measured firmware (the PSP measures it against the
// certificate) and QEMU's pflash unit 0; vm1.nvram is pflash unit 1. OVMF boots under TCG to
// its shell, writing its boot variables; afterwards the varstore unsealed from the image is
// not the template (it was written through sealdisk), the sealed file holds none of its
// plaintext (no firmware-volume signature, no variable-store GUID), and after a restart the
// FUSE file reads what was unsealed.
func TestNVRAMWrittenByOVMF(t *testing.T) {
	requireOVMF(t)
	e := newEnv(t)
	e.fw = ovmfCode // the images allow OVMF_CODE's measurement; serve measures it again
	tmpl, err := os.ReadFile(ovmfVars)
	if err != nil {
		t.Fatal(err)
	}
	// A firmware volume header: "_FVH" at 40; the variable store header (its GUID) follows
	// the header's HeaderLength (uint16 at 48).
	if string(tmpl[40:44]) != "_FVH" {
		t.Fatalf("%s is not a firmware volume", ovmfVars)
	}
	hl := binary.LittleEndian.Uint16(tmpl[48:50])
	storeGUID := tmpl[hl : hl+16]

	vars := filepath.Join(e.dir, "vars.fd")
	if err := os.WriteFile(vars, tmpl, 0o600); err != nil {
		t.Fatal(err)
	}
	nvram := filepath.Join(e.dir, "vm1-vars.img")
	e.seal(t, vars, nvram)
	vms := fmt.Sprintf("vms:\n  - name: vm1\n    firmware: %s\n    nvram: %s\n", ovmfCode, nvram)
	nvFile := filepath.Join(e.dir, "mnt", "vm1.nvram")
	s := vmConfigServer(t, e, vms, nvFile)
	if got, err := os.ReadFile(nvFile); err != nil || !bytes.Equal(got, tmpl) {
		t.Fatalf("vm1.nvram before the boot: %d bytes, %v; want the template's %d", len(got), err, len(tmpl))
	}

	serial := filepath.Join(e.dir, "serial.log")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	qemu := exec.CommandContext(ctx, "qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-m", "256",
		"-nographic", "-nodefaults", "-monitor", "none", "-nic", "none", "-serial", "file:"+serial,
		"-drive", "if=pflash,format=raw,unit=0,readonly=on,file="+ovmfCode,
		"-drive", "if=pflash,format=raw,unit=1,file="+nvFile)
	var qlog bytes.Buffer
	qemu.Stdout, qemu.Stderr = &qlog, &qlog
	qemu.Cancel = func() error { return qemu.Process.Signal(syscall.SIGTERM) }
	start := time.Now()
	if err := qemu.Start(); err != nil {
		t.Fatal(err)
	}
	// BdsDxe writes the boot options (Boot####, BootOrder, …) before it starts the shell.
	for {
		b, _ := os.ReadFile(serial)
		if bytes.Contains(b, []byte("UEFI Interactive Shell")) {
			break
		}
		if ctx.Err() != nil || qemu.ProcessState != nil {
			t.Fatalf("OVMF did not reach its shell in %v:\n%s\nqemu: %s", time.Since(start), b, qlog.String())
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("OVMF reached its shell after %v", time.Since(start).Round(time.Millisecond))
	time.Sleep(time.Second)
	qemu.Process.Signal(syscall.SIGTERM) // QEMU flushes its drives and exits
	if err := qemu.Wait(); err != nil && !strings.Contains(err.Error(), "signal") {
		t.Fatalf("qemu: %v\n%s", err, qlog.String())
	}
	s.stop(t)

	sealed, err := os.ReadFile(nvram)
	if err != nil {
		t.Fatal(err)
	}
	for what, sig := range map[string][]byte{"_FVH signature": []byte("_FVH"), "variable store GUID": storeGUID} {
		if bytes.Contains(sealed, sig) {
			t.Errorf("the sealed NVRAM holds the varstore's %s in plaintext", what)
		}
	}
	unsealed := filepath.Join(e.dir, "vars-after.fd")
	run(t, "unseal", "--in", nvram, "--out", unsealed, "--psp", e.psp)
	after, err := os.ReadFile(unsealed)
	if err != nil {
		t.Fatal(err)
	}
	if len(after) != len(tmpl) || string(after[40:44]) != "_FVH" || !bytes.Equal(after[hl:hl+16], storeGUID) {
		t.Fatalf("unsealed varstore: %d bytes, not a firmware volume with the variable store", len(after))
	}
	if bytes.Equal(after, tmpl) {
		t.Fatal("the varstore is unchanged: OVMF's writes did not reach the sealed NVRAM")
	}
	// UEFI variable names are UTF-16LE; BdsDxe wrote BootOrder.
	if !bytes.Contains(after, utf16le("BootOrder")) || bytes.Contains(tmpl, utf16le("BootOrder")) {
		t.Error("no BootOrder variable in the written varstore (or already in the template)")
	}

	vmConfigServer(t, e, vms, nvFile)
	if got, err := os.ReadFile(nvFile); err != nil || !bytes.Equal(got, after) {
		t.Fatalf("vm1.nvram after a restart differs from what was unsealed (%v)", err)
	}
}

func utf16le(s string) []byte {
	b := make([]byte, 0, 2*len(s))
	for _, r := range s {
		b = append(b, byte(r), 0)
	}
	return b
}
