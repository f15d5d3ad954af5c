#!/bin/bash
# make demo: build, create a development vendor, PSP (chip) and provider, seal a small bootable
# sample image, inspect, verify and round-trip it, then serve it over NBD and FUSE until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$HOME/go/bin:$PATH
need=()
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
[ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q static || need+=(busybox-static file)
command -v fusermount3 >/dev/null || need+=(fuse3)
if ((${#need[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
S=$PWD/bin/sealdisk
D=$PWD/demo
rm -rf "$D"; mkdir -p "$D"; cd "$D"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "development vendor, chip (PSP) and provider"
$S vendor init --dir vendor
$S psp init --dir psp --vendor vendor
$S provider keygen --dir provider
$S psp trust add --dir psp provider/provider.pub
printf 'demo firmware stand-in for OVMF.fd\n' > OVMF.fd
echo "firmware measurement (sha384): $($S measure OVMF.fd)"

step "a small bootable ext4 root (busybox) as disk.raw"
../scripts/guest/mkroot.sh disk.raw 64M
ls -ls disk.raw

step "seal it: the image key is sealed to this chip, signed by the provider"
$S seal --in disk.raw --out vm1.img --chip psp/chip.crt --vendor-root vendor/vendor.crt \
  --provider-key provider/provider.key --firmware OVMF.fd
ls -ls vm1.img

step "inspect (no private key needed)"
$S inspect vm1.img --trust psp/trust
step "inspect --json (for scripts; also written to demo/vm1.json)"
$S inspect vm1.img --json --trust psp/trust | tee vm1.json

step "unseal with the PSP and compare"
$S unseal --in vm1.img --out roundtrip.raw --psp psp
cmp disk.raw roundtrip.raw && echo "unsealed image is byte-identical to disk.raw"
echo "/hello.txt inside the unsealed file system: $(debugfs -R 'cat /hello.txt' roundtrip.raw 2>/dev/null)"

step "tamper: flip one byte of the first data sector"
cp --sparse=always vm1.img tampered.img
off=$(python3 -c "import json;print(json.load(open('vm1.json'))['data_offset']+1024)")
printf '\xff' | dd of=tampered.img bs=1 seek="$off" conv=notrunc status=none
if $S unseal --in tampered.img --out bad.raw --psp psp; then echo "BUG: tampering not detected"; exit 1; fi
echo "tampering detected: unseal refused, naming the sector"

K=$(ls /boot/vmlinuz-* 2>/dev/null | tail -1); I=$(ls /boot/initrd.img-* 2>/dev/null | tail -1)
SOCK=$D/nbd.sock; MNT=$D/mnt; ADMIN=$D/admin.sock
cat <<MSG

Done sealing. Now serving demo/vm1.img over NBD ($SOCK) and FUSE ($MNT/vm1.raw).
In another terminal:

  qemu-img info 'nbd+unix:///vm1?socket=$SOCK'
  nbdinfo --map 'nbd+unix:///vm1?socket=$SOCK'
  qemu-img compare demo/disk.raw $MNT/vm1.raw
  $S admin --socket $ADMIN status
  $S admin --socket $ADMIN attest vm1 --nonce \$(openssl rand -hex 32)
  $S admin --socket $ADMIN metrics | grep '^sealdisk_'

Boot it (Debian kernel and initrd; the guest prints GUEST: lines and powers off):

  qemu-system-x86_64 -accel tcg -m 512 -nographic -no-reboot -kernel ${K:-/boot/vmlinuz} -initrd ${I:-/boot/initrd.img} \
    -append 'console=ttyS0 root=/dev/vda rw panic=-1 quiet' -drive 'file=nbd+unix:///vm1?socket=$SOCK,format=raw,if=virtio'
  # or through the FUSE file, as libvirt would open it:
  qemu-system-x86_64 … -drive file=$MNT/vm1.raw,format=raw,if=virtio,cache=none

Ctrl-C stops serving: in-flight requests finish, data is flushed, $MNT is unmounted, keys are
zeroised.
MSG
exec $S serve --psp psp --image vm1.img --firmware OVMF.fd --nbd "unix:$SOCK" --fuse-mountpoint "$MNT" --admin-socket "$ADMIN"
