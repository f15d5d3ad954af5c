package tests

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The guest's view of the export: a 64 MiB disk whose first 40 MiB hold an ext4 file system;
// round r (1: nbd-client, 2: sealdisk attach) dd's pattern r at (48+r) MiB and discards 1 MiB
// at (56+2r) MiB. The rest of the tail keeps what was sealed.
const (
	kguestDisk = 64 << 20
	kguestFS   = "40M"
)

func kguestPatternAt(r int) int64 { return int64(48+r) << 20 }
func kguestTrimAt(r int) int64    { return int64(56+2*r) << 20 }

// kguestNBDClient is the guest's nbd-client command line; docs/OPERATOR.md quotes it verbatim.
const kguestNBDClient = "nbd-client -N vm1 10.0.2.100 10809 /dev/nbd0"

// kguestAttach is the guest's sealdisk attach command line; docs/OPERATOR.md quotes it too.
const kguestAttach = "sealdisk attach --export vm1 --tcp 10.0.2.100:10809 --insecure-tcp /dev/nbd0"

// kguestInit is the guest's /init: it attaches the export to /dev/nbd0 with nbd-client, then
// with sealdisk attach, and in each makes a file system, writes, syncs, reads back after
// dropping the caches, dd's a pattern, flushes and discards; each step prints a KGUEST: line
// on the serial console, and the first failure prints "KGUEST: FAIL: …" and powers off.
const kguestInit = `#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /mnt /tmp
say() { echo "KGUEST: $*"; }
fail() { say "FAIL: $*"; dmesg | tail -30; poweroff -f; sleep 30; }
for m in $(cat /etc/modules.order); do insmod /lib/modules/$m || fail "insmod $m"; done
ifconfig lo 127.0.0.1 up
ifconfig eth0 10.0.2.15 netmask 255.255.255.0 up || fail "eth0 up"
say "booted $(uname -r)"
MiB=1048576
sum() { sha256sum | cut -d' ' -f1; }
zero=$(dd if=/dev/zero bs=1M count=1 2>/dev/null | sum)
q=/sys/block/nbd0/queue

wait_attached() { # client [pid]
  i=0
  while [ "$(cat /sys/block/nbd0/size)" != 131072 ]; do
    [ -z "$2" ] || kill -0 $2 2>/dev/null || fail "$1 exited before /dev/nbd0 was attached"
    i=$((i+1)); [ $i -lt 300 ] || fail "$1: /dev/nbd0 not attached within 30 s (size $(cat /sys/block/nbd0/size))"
    usleep 100000
  done
  say "$1 attached size=$(cat /sys/block/nbd0/size) write_cache=$(tr ' ' - < $q/write_cache) discard_max=$(cat $q/discard_max_bytes)"
}
wait_detached() { # client
  i=0
  while [ "$(cat /sys/block/nbd0/size)" != 0 ] || [ -e /sys/block/nbd0/pid ]; do
    i=$((i+1)); [ $i -lt 300 ] || fail "$1: /dev/nbd0 still attached 30 s after detaching"
    usleep 100000
  done
  say "$1 detached"
}
io() { # round client
  r=$1; c=$2
  mkfs.ext4 -q -F -b 4096 -E nodiscard /dev/nbd0 ` + kguestFS + ` || fail "$c: mkfs.ext4"
  mount -t ext4 /dev/nbd0 /mnt || fail "$c: mount"
  echo "round $r via $c" > /mnt/round.txt || fail "$c: writing round.txt"
  cp /pattern$r.bin /mnt/data.bin || fail "$c: writing data.bin"
  sync
  umount /mnt || fail "$c: umount"
  blockdev --flushbufs /dev/nbd0 || fail "$c: blockdev --flushbufs"
  echo 3 > /proc/sys/vm/drop_caches
  mount -t ext4 -o ro /dev/nbd0 /mnt || fail "$c: mount again"
  got=$(cat /mnt/round.txt)
  [ "$got" = "round $r via $c" ] || fail "$c: round.txt reads '$got' after remount"
  [ "$(sum < /mnt/data.bin)" = "$(sum < /pattern$r.bin)" ] || fail "$c: data.bin differs after remount"
  umount /mnt || fail "$c: umount"
  say "$c fs ok"
  at=$((48+r))
  dd if=/pattern$r.bin of=/dev/nbd0 bs=1M seek=$at conv=fsync 2>/dev/null || fail "$c: dd pattern"
  blockdev --flushbufs /dev/nbd0 || fail "$c: blockdev --flushbufs"
  [ "$(dd if=/dev/nbd0 bs=1M skip=$at count=1 iflag=direct 2>/dev/null | sum)" = "$(sum < /pattern$r.bin)" ] || fail "$c: pattern at $at MiB reads back wrong"
  say "$c pattern ok at $at MiB"
  at=$((56+2*r))
  blkdiscard -o $((at*MiB)) -l $MiB /dev/nbd0 || fail "$c: blkdiscard"
  [ "$(dd if=/dev/nbd0 bs=1M skip=$at count=1 iflag=direct 2>/dev/null | sum)" = "$zero" ] || fail "$c: discarded MiB at $at does not read as zeros"
  say "$c trim ok at $at MiB"
}

` + kguestNBDClient + ` || fail "nbd-client: attach"
wait_attached nbd-client
io 1 nbd-client
nbd-client -d /dev/nbd0 || fail "nbd-client -d"
wait_detached nbd-client

` + kguestAttach + ` &
pid=$!
wait_attached sealdisk-attach $pid
mount -t ext4 -o ro /dev/nbd0 /mnt || fail "sealdisk-attach: mounting round 1's file system"
got=$(cat /mnt/round.txt)
[ "$got" = "round 1 via nbd-client" ] || fail "sealdisk-attach: round 1's round.txt reads '$got'"
umount /mnt
say "sealdisk-attach sees round 1"
io 2 sealdisk-attach
kill -TERM $pid
wait $pid
rc=$?
[ $rc = 0 ] || fail "sealdisk attach exited $rc after SIGTERM"
wait_detached sealdisk-attach
say DONE
poweroff -f
`

// TestKernelNBDInGuest: the kernel's NBD client, where the host has none. A TCG guest boots
// Debian's kernel with an initramfs of busybox, nbd.ko, Debian's nbd-client and a static
// sealdisk, reaches `sealdisk serve`'s Unix socket only through QEMU user networking
// (restrict=on) and a guestfwd that runs socat per connection (nothing on the host listens on
// a network address), and attaches the export to /dev/nbd0 twice: nbd-client, then sealdisk
// attach. The guest makes a file system, writes, reads back, flushes and discards in each; the
// host checks that FLUSH and TRIM reached the server and that the unsealed image holds what the
// guest wrote.
func TestKernelNBDInGuest(t *testing.T) {
	if testing.Short() {
		t.Skip("guest boot in -short mode")
	}
	for _, tool := range []string{"qemu-system-x86_64", "socat", "nbd-client", "busybox", "mkfs.ext4", "debugfs", "modinfo", "ldd"} {
		requireTool(t, tool)
	}
	kernels, _ := filepath.Glob("/boot/vmlinuz-*")
	if len(kernels) == 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("no kernel in /boot (linux-image-amd64): run make deps")
		}
		t.Skip("no kernel in /boot")
	}
	kernel := kernels[len(kernels)-1]
	kver := strings.TrimPrefix(filepath.Base(kernel), "vmlinuz-")
	start := time.Now()

	e := newEnv(t)
	raw := filepath.Join(e.dir, "disk.raw")
	fill(t, raw, 0, kguestDisk, 3) // non-zero everywhere, so a discard shows
	img := filepath.Join(e.dir, "disk.img")
	e.seal(t, raw, img)
	admin := filepath.Join(e.dir, "admin.sock")
	s := startServe(t, e, img, false, "--admin-socket", admin)

	// The initramfs.
	r := newInitramfs()
	for _, d := range []string{"proc", "sys", "dev", "mnt", "tmp", "etc"} {
		r.dir(d)
	}
	busybox, _ := exec.LookPath("busybox")
	if out, _ := exec.Command("file", "-L", busybox).Output(); len(out) > 0 && !bytes.Contains(out, []byte("statically linked")) {
		busybox = "/bin/busybox" // busybox-static's, when another busybox is first on PATH
	}
	r.copyFile(t, busybox, "bin/busybox")
	for _, a := range strings.Fields("sh cat echo mount umount mkdir sync poweroff insmod ifconfig dd sha256sum cut tr kill usleep sleep cp blockdev blkdiscard dmesg tail uname") {
		r.symlink("bin/"+a, "busybox")
	}
	for _, b := range []string{"nbd-client", "mkfs.ext4"} {
		p, _ := exec.LookPath(b)
		r.copyBinary(t, p, "sbin/"+b)
	}
	if _, err := os.Stat("/etc/mke2fs.conf"); err == nil {
		r.copyFile(t, "/etc/mke2fs.conf", "etc/mke2fs.conf")
	}
	r.add("sbin/sealdisk", 0o755, staticSealdisk(t))
	// crc32c: ext4's and jbd2's metadata checksums (mkfs.ext4's default), loaded by name.
	mods := r.addModules(t, kver, "crc32c_generic", "nbd", "e1000", "ext4")
	r.add("etc/modules.order", 0o644, []byte(strings.Join(mods, "\n")+"\n"))
	for round := 1; round <= 2; round++ {
		p := filepath.Join(e.dir, fmt.Sprintf("pattern%d.bin", round))
		fill(t, p, 0, 1<<20, byte(10+round))
		r.copyFile(t, p, fmt.Sprintf("pattern%d.bin", round))
	}
	r.add("init", 0o755, []byte(kguestInit))
	initrd := filepath.Join(e.dir, "initramfs.cpio")
	f, err := os.Create(initrd)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.write(f); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	t.Logf("initramfs with modules %v built in %v", mods, time.Since(start).Round(time.Millisecond))

	// The guest: its only network is slirp, restricted; 10.0.2.100:10809 runs socat to serve's
	// Unix socket for each connection.
	socat, _ := exec.LookPath("socat")
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Second)
	defer cancel()
	var console bytes.Buffer
	qemu := exec.CommandContext(ctx, "qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot",
		"-kernel", kernel, "-initrd", initrd, "-append", "console=ttyS0 panic=-1 rdinit=/init quiet",
		"-nic", "user,model=e1000,restrict=on,guestfwd=tcp:10.0.2.100:10809-cmd:"+socat+" - UNIX-CONNECT:"+s.sock)
	qemu.Stdout, qemu.Stderr = &console, &console
	boot := time.Now()
	err = qemu.Run()
	t.Logf("guest ran %v", time.Since(boot).Round(time.Millisecond))
	if ctx.Err() != nil {
		t.Fatalf("guest did not finish within 150 s; console:\n%s\nserve log:\n%s", console.String(), s.log)
	}
	if err != nil {
		t.Fatalf("qemu: %v; console:\n%s", err, console.String())
	}
	checkKguestConsole(t, console.String(), s.log.String())

	// FLUSH and TRIM reached the server (the kernel sends them only when the client passed
	// the server's transmission flags on).
	metrics := run(t, "admin", "--socket", admin, "metrics")
	for _, op := range []string{"flush", "trim", "write"} {
		if n := nbdRequests(metrics, "vm1", op); n == 0 {
			t.Errorf("no successful NBD %s reached the server:\n%s", op, metrics)
		}
	}

	s.stop(t)
	out := filepath.Join(e.dir, "out.raw")
	run(t, "unseal", "--in", img, "--out", out, "--psp", e.psp)
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != kguestDisk {
		t.Fatalf("unsealed %d bytes, want %d", len(got), kguestDisk)
	}
	for round := 1; round <= 2; round++ {
		p, _ := os.ReadFile(filepath.Join(e.dir, fmt.Sprintf("pattern%d.bin", round)))
		at := kguestPatternAt(round)
		if !bytes.Equal(got[at:at+1<<20], p) {
			t.Errorf("round %d's pattern is not at %d MiB in the unsealed image", round, at>>20)
		}
		at = kguestTrimAt(round)
		if !bytes.Equal(got[at:at+1<<20], make([]byte, 1<<20)) {
			t.Errorf("round %d's discarded MiB at %d is not zeros in the unsealed image", round, at>>20)
		}
	}
	for _, keep := range [][2]int64{{48 << 20, 49 << 20}, {51 << 20, 58 << 20}, {59 << 20, 60 << 20}, {61 << 20, kguestDisk}} {
		if !bytes.Equal(got[keep[0]:keep[1]], want[keep[0]:keep[1]]) {
			t.Errorf("[%d, %d) MiB changed; the guest never wrote there", keep[0]>>20, keep[1]>>20)
		}
	}
	if b, err := exec.Command("debugfs", "-R", "cat /round.txt", out).Output(); err != nil || strings.TrimSpace(string(b)) != "round 2 via sealdisk-attach" {
		t.Errorf("debugfs cat /round.txt in the unsealed image: %q, %v", b, err)
	}
	data := filepath.Join(e.dir, "data.bin")
	if b, err := exec.Command("debugfs", "-R", "dump /data.bin "+data, out).CombinedOutput(); err != nil {
		t.Fatalf("debugfs dump: %v\n%s", err, b)
	}
	cmpFiles(t, filepath.Join(e.dir, "pattern2.bin"), data, 1<<20)
	t.Logf("whole test %v", time.Since(start).Round(time.Millisecond))
}

// checkKguestConsole requires every step's marker, in order, and no failure.
func checkKguestConsole(t *testing.T, console, serveLog string) {
	t.Helper()
	var lines []string
	sc := bufio.NewScanner(strings.NewReader(console))
	for sc.Scan() {
		if _, m, ok := strings.Cut(sc.Text(), "KGUEST: "); ok {
			lines = append(lines, strings.TrimSpace(m))
		}
	}
	fail := func(format string, a ...any) {
		t.Fatalf(format+"\nconsole:\n%s\nserve log:\n%s", append(a, terminalCodes.ReplaceAllString(console, ""), serveLog)...)
	}
	for _, l := range lines {
		if strings.HasPrefix(l, "FAIL") {
			fail("guest: %s", l)
		}
	}
	want := []string{"booted"}
	for _, c := range []string{"nbd-client", "sealdisk-attach"} {
		want = append(want, c+" attached size=131072 write_cache=write-back discard_max=")
		if c == "sealdisk-attach" {
			want = append(want, c+" sees round 1")
		}
		want = append(want, c+" fs ok", c+" pattern ok", c+" trim ok", c+" detached")
	}
	want = append(want, "DONE")
	i := 0
	for _, l := range lines {
		if i < len(want) && strings.HasPrefix(l, want[i]) {
			if strings.Contains(want[i], "discard_max=") && strings.HasSuffix(l, "discard_max=0") {
				fail("guest: %s: the kernel got no TRIM flag", l)
			}
			i++
		}
	}
	if i < len(want) {
		fail("guest console lacks %q (markers seen: %q)", want[i], lines)
	}
}

// terminalCodes are the escape sequences SeaBIOS and the kernel write to the console.
var terminalCodes = regexp.MustCompile("\x1b(c|\\[[0-9;?]*[A-Za-z])")

var nbdRequestsLine = regexp.MustCompile(`^sealdisk_nbd_requests_total\{([^}]*)\} ([0-9.e+]+)$`)

// nbdRequests is the count of successful NBD requests of op on export in Prometheus text.
func nbdRequests(metrics, export, op string) float64 {
	var n float64
	for _, l := range strings.Split(metrics, "\n") {
		m := nbdRequestsLine.FindStringSubmatch(strings.TrimSpace(l))
		if m == nil {
			continue
		}
		if strings.Contains(m[1], `export="`+export+`"`) && strings.Contains(m[1], `op="`+op+`"`) && strings.Contains(m[1], `result="ok"`) {
			v, _ := strconv.ParseFloat(m[2], 64)
			n += v
		}
	}
	return n
}

// staticSealdisk builds sealdisk without cgo (a static binary, which the initramfs can hold
// without a C library) and returns it.
func staticSealdisk(t *testing.T) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "sealdisk")
	cmd := exec.Command("go", "build", "-o", out, "../cmd/sealdisk")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("static build: %v\n%s", err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestOperatorQuotesKernelNBDLines: docs/OPERATOR.md gives the guest's nbd-client and sealdisk
// attach lines exactly as TestKernelNBDInGuest runs them.
func TestOperatorQuotesKernelNBDLines(t *testing.T) {
	doc, err := os.ReadFile("../docs/OPERATOR.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range []string{kguestNBDClient, kguestAttach} {
		if !bytes.Contains(doc, []byte("    "+line+"\n")) {
			t.Errorf("docs/OPERATOR.md does not quote %q", line)
		}
	}
}
