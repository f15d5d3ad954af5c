package tests

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The libvirt tests run their domains through a libvirtd of libvirt's system instance
// (qemu:///system: QEMU as libvirt-qemu, group kvm), started without systemd once per test
// binary and stopped at its end, and read the domain XML from docs/OPERATOR.md.

const libvirtURI = "qemu:///system"

// qemuUser is the user libvirt runs QEMU as (Debian's build; /etc/libvirt/qemu.conf "user").
const qemuUser = "libvirt-qemu"

var (
	libvirtOnce sync.Once
	libvirtErr  error
	libvirtNote string // how the daemons were found or started, for the first test's log
)

// sbinTool is a daemon's path: on PATH, else in /usr/sbin (not on every user's PATH).
func sbinTool(t *testing.T, name string) string {
	t.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	if p := "/usr/sbin/" + name; fileExists(p) {
		return p
	}
	requireTool(t, name) // fails under CI=true, skips elsewhere
	return ""
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// requireLibvirt makes sure virtlogd and libvirtd answer on their Unix sockets, starting
// them (once per test binary) when they do not.
func requireLibvirt(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("libvirt guest boots in -short mode")
	}
	for _, tool := range []string{"virsh", "qemu-system-x86_64", "mkfs.ext4", "debugfs"} {
		requireTool(t, tool)
	}
	logd, lvd := sbinTool(t, "virtlogd"), sbinTool(t, "libvirtd")
	if _, err := user.Lookup(qemuUser); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("no user %s (CI=true): install libvirt-daemon-system (make deps)", qemuUser)
		}
		t.Skipf("no user %s: install libvirt-daemon-system", qemuUser)
	}
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("libvirt's system instance (qemu:///system) needs root (CI=true)")
		}
		t.Skip("libvirt's system instance (qemu:///system) needs root")
	}
	libvirtOnce.Do(func() { libvirtErr = startLibvirt(logd, lvd) })
	if libvirtErr != nil {
		t.Fatal(libvirtErr)
	}
	if libvirtNote != "" {
		t.Log(libvirtNote)
		libvirtNote = ""
	}
}

// virsh runs virsh on libvirtURI.
func virsh(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "virsh", append([]string{"-c", libvirtURI}, args...)...).CombinedOutput()
	return string(out), err
}

// daemonProc is a daemon startLibvirt started; done is closed when it has exited.
type daemonProc struct {
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

func (p *daemonProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// startLibvirt starts virtlogd and libvirtd in the foreground (no systemd, no socket
// activation, libvirtd without --listen: its Unix sockets under /run/libvirt only), unless
// they already answer, and has TestMain stop the ones it started.
func startLibvirt(logd, lvd string) error {
	var started []*daemonProc
	dir, err := os.MkdirTemp("", "sealdisk-libvirt-")
	if err != nil {
		return err
	}
	start := func(path string) (*daemonProc, error) {
		p := &daemonProc{log: filepath.Join(dir, filepath.Base(path)+".log"), done: make(chan struct{})}
		f, err := os.Create(p.log)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		p.cmd = exec.Command(path)
		p.cmd.Stdout, p.cmd.Stderr = f, f
		if err := p.cmd.Start(); err != nil {
			return nil, fmt.Errorf("failed to start %s: %w", path, err)
		}
		started = append(started, p)
		go func() { p.cmd.Wait(); close(p.done) }()
		return p, nil
	}
	atExit = append(atExit, func() error {
		var errs []error
		for i := len(started) - 1; i >= 0; i-- {
			p := started[i]
			p.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-p.done:
			case <-time.After(15 * time.Second):
				p.cmd.Process.Kill()
				errs = append(errs, fmt.Errorf("%s did not stop within 15 s of SIGTERM", p.cmd.Path))
			}
		}
		os.RemoveAll(dir)
		return errors.Join(errs...)
	})
	logdUp := func() bool {
		c, err := net.Dial("unix", "/run/libvirt/virtlogd-sock")
		if err == nil {
			c.Close()
		}
		return err == nil
	}
	var notes []string
	if logdUp() {
		notes = append(notes, "virtlogd already running")
	} else {
		p, err := start(logd)
		if err != nil {
			return err
		}
		if err := p.waitUp(10*time.Second, logdUp); err != nil {
			return err
		}
		notes = append(notes, fmt.Sprintf("started virtlogd (pid %d)", p.cmd.Process.Pid))
	}
	if out, err := virsh("version"); err == nil {
		notes = append(notes, "libvirtd already running: "+strings.Join(strings.Fields(out), " "))
	} else {
		p, err := start(lvd)
		if err != nil {
			return err
		}
		if err := p.waitUp(60*time.Second, func() bool { _, err := virsh("version"); return err == nil }); err != nil {
			return err
		}
		notes = append(notes, fmt.Sprintf("started libvirtd (pid %d)", p.cmd.Process.Pid))
	}
	libvirtNote = strings.Join(notes, "; ")
	return nil
}

// waitUp waits until up(), or fails when the daemon exits or the timeout passes.
func (p *daemonProc) waitUp(timeout time.Duration, up func() bool) error {
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if up() {
			return nil
		}
		if p.exited() {
			b, _ := os.ReadFile(p.log)
			return fmt.Errorf("%s exited (%v) before it answered:\n%s", p.cmd.Path, p.cmd.ProcessState, b)
		}
	}
	b, _ := os.ReadFile(p.log)
	return fmt.Errorf("%s did not answer within %v:\n%s", p.cmd.Path, timeout, b)
}

// The xml blocks of OPERATOR.md's "libvirt domains", by their first line.
const (
	xmlGuest = "<!-- guest: Debian's kernel and initrd, its root file system on the sealed disk -->"
	xmlFUSE  = "<!-- disk: the FUSE file -->"
	xmlNBD   = "<!-- disk: the NBD export on the Unix socket -->"
	xmlOVMF  = "<!-- guest: OVMF, its variable store on the sealed NVRAM -->"
)

// operatorXML is the section's xml blocks by first line; every block is one of the above.
func operatorXML(t *testing.T) map[string]string {
	t.Helper()
	doc, err := os.ReadFile("../docs/OPERATOR.md")
	if err != nil {
		t.Fatal(err)
	}
	_, sec, ok := strings.Cut(string(doc), "\n### libvirt domains\n")
	if !ok {
		t.Fatal(`docs/OPERATOR.md has no section "### libvirt domains"`)
	}
	if i := regexp.MustCompile(`\n##+ `).FindStringIndex(sec); i != nil {
		sec = sec[:i[0]]
	}
	blocks := map[string]string{}
	for _, m := range regexp.MustCompile("(?s)\n```xml\n(.*?)```\n").FindAllStringSubmatch(sec, -1) {
		first, _, _ := strings.Cut(m[1], "\n")
		switch first {
		case xmlGuest, xmlFUSE, xmlNBD, xmlOVMF:
			blocks[first] = m[1]
		default:
			t.Errorf("docs/OPERATOR.md, libvirt domains: an xml block no test runs: %s", first)
		}
	}
	for _, k := range []string{xmlGuest, xmlFUSE, xmlNBD, xmlOVMF} {
		if blocks[k] == "" {
			t.Fatalf("docs/OPERATOR.md, libvirt domains: no xml block starting %s", k)
		}
	}
	return blocks
}

var placeholder = regexp.MustCompile(`@[A-Z]+@`)

// fillXML replaces placeholders in a block; each given must be there, none may be left.
func fillXML(t *testing.T, block string, subst ...string) string {
	t.Helper()
	for i := 0; i < len(subst); i += 2 {
		if !strings.Contains(block, subst[i]) {
			t.Fatalf("no %s in the xml block %q", subst[i], strings.SplitN(block, "\n", 2)[0])
		}
	}
	out := strings.NewReplacer(subst...).Replace(block)
	if p := placeholder.FindString(out); p != "" {
		t.Fatalf("%s left in the xml block %q", p, strings.SplitN(block, "\n", 2)[0])
	}
	return out
}

// libvirtEnv is newEnv with its directory (and the test's directory above it, both 0700)
// searchable by QEMU's user, as the path to a disk, socket or console must be.
func libvirtEnv(t *testing.T) *env {
	t.Helper()
	e := newEnv(t)
	for _, d := range []string{e.dir, filepath.Dir(e.dir)} {
		if err := os.Chmod(d, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	return e
}

// qemuIDs is the uid and primary gid libvirt runs QEMU with.
func qemuUID(t *testing.T) int {
	uid, _ := qemuIDs(t)
	return uid
}

func qemuIDs(t *testing.T) (uid, gid int) {
	t.Helper()
	u, err := user.Lookup(qemuUser)
	if err != nil {
		t.Fatal(err)
	}
	uid, _ = strconv.Atoi(u.Uid)
	gid, _ = strconv.Atoi(u.Gid)
	return uid, gid
}

// domain is a transient libvirt domain (virsh create: gone when it stops).
type domain struct {
	name, console string
	created       time.Time
}

// domainName is this test binary's name of a domain of kind.
func domainName(kind string) string { return fmt.Sprintf("sealdisk-test-%s-%d", kind, os.Getpid()) }

// createDomain starts a transient domain of kind from xml (named domainName(kind)),
// destroying it at cleanup if it is still there.
func createDomain(t *testing.T, e *env, kind, xml string) (*domain, error) {
	t.Helper()
	d := &domain{name: domainName(kind)}
	path := filepath.Join(e.dir, kind+".xml")
	if err := os.WriteFile(path, []byte(xml), 0o644); err != nil {
		t.Fatal(err)
	}
	virsh("destroy", d.name) // a leftover of an interrupted run
	if out, err := virsh("create", path); err != nil {
		return nil, fmt.Errorf("virsh create %s: %v\n%s", path, err, out)
	}
	d.created = time.Now()
	t.Cleanup(func() { virsh("destroy", d.name) })
	return d, nil
}

// startDomain creates a domain that must start, its console written to console; libvirt's
// dynamic ownership must give owned (a file its QEMU opens, if any) to QEMU's user meanwhile.
func startDomain(t *testing.T, e *env, kind, xml, console, owned string) *domain {
	t.Helper()
	d, err := createDomain(t, e, kind, xml)
	if err != nil {
		t.Fatal(err)
	}
	d.console = console
	if owned != "" {
		if uid, _ := ownerOf(t, owned); uid != qemuUID(t) {
			t.Errorf("%s is owned by uid %d while the domain runs; want %s (%d), libvirt's dynamic ownership", owned, uid, qemuUser, qemuUID(t))
		}
	}
	return d
}

// running reports whether the domain still exists (a transient one disappears when it stops).
func (d *domain) running() bool {
	out, err := virsh("domstate", d.name)
	return err == nil && !strings.Contains(out, "shut off")
}

// qemuLog is the tail of libvirt's log of the domain's QEMU, for failure messages.
func (d *domain) qemuLog() string {
	b, _ := os.ReadFile("/var/log/libvirt/qemu/" + d.name + ".log")
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// waitGone waits for the guest to power off and returns its console.
func (d *domain) waitGone(t *testing.T, timeout time.Duration) string {
	t.Helper()
	start := time.Now()
	for d.running() {
		if time.Since(start) > timeout {
			b, _ := os.ReadFile(d.console)
			t.Fatalf("domain %s still running after %v; console:\n%s\nQEMU log:\n%s", d.name, timeout, b, d.qemuLog())
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Logf("domain %s ran %v", d.name, time.Since(d.created).Round(time.Millisecond))
	b, _ := os.ReadFile(d.console)
	return string(b)
}

func ownerOf(t *testing.T, path string) (uid, gid int) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	return int(st.Uid), int(st.Gid)
}

// guestDomain is OPERATOR.md's guest of kind with disk, booting with the marker; console is
// its serial log.
func guestDomain(t *testing.T, e *env, blocks map[string]string, kind, disk, marker string) (xml, console string) {
	t.Helper()
	kernel, initrd := guestKernel(t)
	console = filepath.Join(e.dir, "console.log")
	xml = fillXML(t, blocks[xmlGuest], "@NAME@", domainName(kind),
		"@KERNEL@", kernel, "@INITRD@", initrd, "@MARKER@", marker, "@CONSOLE@", console,
		"@DISK@", strings.ReplaceAll(strings.TrimSpace(disk), "\n", "\n    "))
	return xml, console
}

// TestLibvirtFUSEDisk: a libvirt domain (TCG, QEMU as libvirt-qemu) boots with its root on
// sealdisk's FUSE file as OPERATOR.md's <disk type='file'> (cache='none', io='native'), writes
// a marker and powers off; the unsealed image holds it. Without fuse.allow_other QEMU cannot
// open the file. libvirt's dynamic ownership chowns the file to QEMU's user while the
// domain runs and back afterwards, through sealdisk.
func TestLibvirtFUSEDisk(t *testing.T) {
	requireLibvirt(t)
	blocks := operatorXML(t)
	e := libvirtEnv(t)
	_, img := guestRoot(t, e)
	marker := fmt.Sprintf("fuse-%d", time.Now().UnixNano())

	// without allow_other
	s := startServe(t, e, img, true)
	file := filepath.Join(s.mnt, "vm1.raw")
	xml, console := guestDomain(t, e, blocks, "fuse", fillXML(t, blocks[xmlFUSE], "@IMAGE@", file), marker)
	if _, err := createDomain(t, e, "fuse", xml); err == nil || !strings.Contains(err.Error(), "Could not open '"+file+"': Permission denied") {
		t.Fatalf("a domain on the FUSE file without fuse.allow_other: want QEMU's Permission denied, got %v", err)
	}
	s.stop(t)

	s = startServe(t, e, img, true, "--fuse-allow-other")
	d := startDomain(t, e, "fuse", xml, console, file)
	checkConsole(t, d.waitGone(t, 2*time.Minute), marker)
	if uid, _ := ownerOf(t, file); uid != os.Getuid() {
		t.Errorf("%s is owned by uid %d after the domain stopped; want sealdisk's %d back", file, uid, os.Getuid())
	}
	s.stop(t)
	if got := markerIn(t, e, img); got != marker {
		t.Fatalf("marker in the unsealed image: %q, want %q", got, marker)
	}
}

// TestLibvirtNBDDisk: the same guest with its root on the NBD export through OPERATOR.md's
// <disk type='network'> on serve's Unix socket. With the socket's default group (sealdisk's)
// QEMU's user cannot connect; with --nbd-socket-group set to QEMU's group (kvm) the guest
// boots, its writes and flushes reach the export, and the unsealed image holds its marker.
func TestLibvirtNBDDisk(t *testing.T) {
	requireLibvirt(t)
	blocks := operatorXML(t)
	e := libvirtEnv(t)
	_, img := guestRoot(t, e)
	_, qemuGID := qemuIDs(t)
	grp, err := user.LookupGroupId(strconv.Itoa(qemuGID))
	if err != nil {
		t.Fatal(err)
	}
	marker := fmt.Sprintf("nbd-%d", time.Now().UnixNano())

	s := startServe(t, e, img, false)
	disk := func(s *server) string {
		return fillXML(t, blocks[xmlNBD], "@EXPORT@", "vm1", "@SOCKET@", s.sock)
	}
	xml, _ := guestDomain(t, e, blocks, "nbd", disk(s), marker)
	if _, err := createDomain(t, e, "nbd", xml); err == nil || !strings.Contains(err.Error(), "Failed to connect to '"+s.sock+"': Permission denied") {
		t.Fatalf("a domain on the NBD socket without nbd.socket_group: want QEMU's Permission denied, got %v", err)
	}
	s.stop(t)

	admin := filepath.Join(e.dir, "admin.sock")
	s = startServe(t, e, img, false, "--nbd-socket-group", grp.Name, "--admin-socket", admin)
	fi, err := os.Stat(s.sock)
	if err != nil {
		t.Fatal(err)
	}
	if _, gid := ownerOf(t, s.sock); gid != qemuGID || fi.Mode().Perm() != 0o660 {
		t.Fatalf("NBD socket: mode %#o gid %d; want 0660 and %s (%d)", fi.Mode().Perm(), gid, grp.Name, qemuGID)
	}
	xml, console := guestDomain(t, e, blocks, "nbd", disk(s), marker)
	d := startDomain(t, e, "nbd", xml, console, "")
	checkConsole(t, d.waitGone(t, 2*time.Minute), marker)
	metrics := run(t, "admin", "--socket", admin, "metrics")
	for _, op := range []string{"read", "write", "flush"} {
		if nbdRequests(metrics, "vm1", op) == 0 {
			t.Errorf("no successful NBD %s from the domain reached serve", op)
		}
	}
	s.stop(t)
	if got := markerIn(t, e, img); got != marker {
		t.Fatalf("marker in the unsealed image: %q, want %q", got, marker)
	}
}

// TestLibvirtNVRAM: OPERATOR.md's UEFI domain, OVMF_CODE as its loader and the VM's sealed
// NVRAM (the FUSE file vm1.nvram) as its <nvram>, boots under TCG to OVMF's shell and is
// destroyed; the NVRAM image then unseals to a varstore OVMF wrote (BootOrder), not the
// template, and holds no plaintext of it. Dynamic ownership chowns the NVRAM file like a disk.
func TestLibvirtNVRAM(t *testing.T) {
	requireLibvirt(t)
	requireOVMF(t)
	blocks := operatorXML(t)
	e := libvirtEnv(t)
	e.fw = ovmfCode
	tmpl, err := os.ReadFile(ovmfVars)
	if err != nil {
		t.Fatal(err)
	}
	vars := filepath.Join(e.dir, "vars.fd")
	if err := os.WriteFile(vars, tmpl, 0o600); err != nil {
		t.Fatal(err)
	}
	nvram := filepath.Join(e.dir, "vm1-vars.img")
	e.seal(t, vars, nvram)
	t.Setenv("SEALDISK_FUSE_ALLOW_OTHER", "true")
	nvFile := filepath.Join(e.dir, "mnt", "vm1.nvram")
	s := vmConfigServer(t, e, fmt.Sprintf("vms:\n  - name: vm1\n    firmware: %s\n    nvram: %s\n", ovmfCode, nvram), nvFile)
	console := filepath.Join(e.dir, "console.log")
	xml := fillXML(t, blocks[xmlOVMF], "@NAME@", domainName("ovmf"), "@NVRAM@", nvFile, "@CONSOLE@", console)
	if !strings.Contains(xml, "<loader readonly='yes' type='pflash'>"+ovmfCode+"</loader>") {
		t.Fatalf("the OVMF domain's loader is not %s", ovmfCode)
	}
	d := startDomain(t, e, "ovmf", xml, console, nvFile)
	start := time.Now()
	for {
		b, _ := os.ReadFile(console)
		if bytes.Contains(b, []byte("UEFI Interactive Shell")) {
			break
		}
		if time.Since(start) > 90*time.Second || !d.running() {
			t.Fatalf("OVMF did not reach its shell (%v):\n%s\nQEMU log:\n%s", time.Since(start).Round(time.Millisecond), b, d.qemuLog())
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("OVMF reached its shell after %v", time.Since(start).Round(time.Millisecond))
	time.Sleep(time.Second)
	// SIGTERM only: QEMU flushes its drives and exits
	if out, err := virsh("destroy", "--graceful", d.name); err != nil {
		t.Fatalf("virsh destroy --graceful: %v\n%s", err, out)
	}
	d.waitGone(t, 30*time.Second)
	if uid, _ := ownerOf(t, nvFile); uid != os.Getuid() {
		t.Errorf("%s is owned by uid %d after the domain stopped; want sealdisk's %d back", nvFile, uid, os.Getuid())
	}
	s.stop(t)

	sealed, err := os.ReadFile(nvram)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(sealed, []byte("_FVH")) {
		t.Error("the sealed NVRAM holds the varstore's firmware-volume signature in plaintext")
	}
	unsealed := filepath.Join(e.dir, "vars-after.fd")
	run(t, "unseal", "--in", nvram, "--out", unsealed, "--psp", e.psp)
	after, err := os.ReadFile(unsealed)
	if err != nil {
		t.Fatal(err)
	}
	if len(after) != len(tmpl) || string(after[40:44]) != "_FVH" {
		t.Fatalf("unsealed varstore: %d bytes, not a firmware volume", len(after))
	}
	if bytes.Equal(after, tmpl) {
		t.Fatal("the varstore is unchanged: OVMF's writes through libvirt did not reach the sealed NVRAM")
	}
	if !bytes.Contains(after, utf16le("BootOrder")) || bytes.Contains(tmpl, utf16le("BootOrder")) {
		t.Error("no BootOrder variable in the written varstore (or already in the template)")
	}
}
