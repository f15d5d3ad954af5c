#!/bin/bash
# usage: mkroot.sh OUT.raw [SIZE]  — a small bootable ext4 root: busybox-static and an /sbin/init
# that prints the sealed /hello.txt, writes /marker.txt and powers off (or, booted with
# sealdisk.ticker on the command line, prints a tick a second until stopped). Boot it with Debian's
# kernel and initrd: root=/dev/vda (see docs/OPERATOR.md).
set -euo pipefail
out=$1; size=${2:-64M}
busybox=$(command -v busybox || true)
[ -n "$busybox" ] && file -L "$busybox" 2>/dev/null | grep -q 'statically linked' || busybox=/bin/busybox
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"/{bin,sbin,etc,proc,sys,dev,tmp}
cp "$busybox" "$tmp/bin/busybox"
for a in sh mount umount cat echo sync poweroff ls mkdir sleep; do ln -s busybox "$tmp/bin/$a"; done
cat > "$tmp/sbin/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
echo "GUEST: booted"
echo "GUEST: hello=$(cat /hello.txt)"
case " $(cat /proc/cmdline) " in
*" sealdisk.ticker "*) # a guest that runs until stopped, for save and restore tests
  i=0; while :; do i=$((i+1)); echo "GUEST: tick $i"; sleep 1; done ;;
esac
marker=$(cat /proc/cmdline | sed -n 's/.*sealdisk.marker=\([^ ]*\).*/\1/p')
[ -n "$marker" ] || marker="marker-$(cat /proc/sys/kernel/random/uuid)"
echo "$marker" > /marker.txt
sync
echo "GUEST: wrote $marker"
mount -o remount,ro /
poweroff -f
INIT
chmod +x "$tmp/sbin/init"
echo "hello from a sealed image" > "$tmp/hello.txt"
rm -f "$out"
truncate -s "$size" "$out"
mkfs.ext4 -q -F -d "$tmp" "$out"
