#!/bin/bash
# NBD throughput of sealdisk serve against nbdkit's luks filter, same run, with the shared fio
# script (../shared/bench/fio-nbd.sh; see ../shared/ANCHORS.md). 1 GiB images on tmpfs; the
# sealdisk image is sealed from random data so every read decrypts.
# usage: scripts/bench-nbd.sh   (RT=seconds per workload, default 8)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$HOME/go/bin:$PATH
FIO=${FIO_NBD:-$(cd .. && pwd)/shared/bench/fio-nbd.sh}
S=$PWD/bin/sealdisk
go build -o "$S" ./cmd/sealdisk
W=$(mktemp -d /dev/shm/sealdisk-nbd.XXXX)
trap 'kill $(cat "$W/pid" 2>/dev/null) 2>/dev/null; rm -rf "$W"' EXIT
cd "$W"
echo "# $(date -u +%FT%TZ) commit $(git -C "$OLDPWD" rev-parse --short HEAD) nproc $(nproc) load $(cut -d' ' -f1-3 /proc/loadavg)"
$S vendor init --dir v >/dev/null; $S psp init --dir p --vendor v >/dev/null
$S provider keygen --dir k >/dev/null; $S psp trust add --dir p k/provider.pub
echo fw > fw
head -c 1G /dev/urandom > raw
$S seal --in raw --out vm.img --chip p/chip.crt --vendor-root v/vendor.crt --provider-key k/provider.key --firmware fw 2>/dev/null
rm raw
$S serve --psp p --image vm.img --firmware fw --name vm --nbd "unix:$W/s.sock" 2>serve.log & echo $! > pid
for _ in $(seq 100); do [ -S s.sock ] && break; sleep 0.1; done
bash "$FIO" "nbd+unix:///vm?socket=$W/s.sock" sealdisk
kill "$(cat pid)"; wait "$(cat pid)" 2>/dev/null || true
printf PASS > pass
for _ in 1 2 3 4 5; do
  qemu-img create -f luks --object secret,id=s0,file=pass -o key-secret=s0,cipher-alg=aes-256,cipher-mode=xts,iter-time=10 luks.img 1G >/dev/null 2>&1 && break
done
nbdkit -U - --filter=luks file luks.img passphrase=+pass --run "bash '$FIO' \"\$uri\" nbdkit-luks"
