#!/bin/bash
# NBD throughput of sealdisk serve against nbdkit's luks filter, same run, with the fio script
# scripts/bench/fio-nbd.sh (the reference runs' script; BENCHMARKS.md). 1 GiB images on tmpfs; the
# sealdisk image is sealed from random data so every read decrypts. Both servers run for the
# whole run and are measured alternately (ROUNDS times), so a change in machine load hits
# both sides alike; compare ratios within one run.
# usage: scripts/bench-nbd.sh   (RT=seconds per workload, default 8; ROUNDS, default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$HOME/go/bin:$PATH
FIO=${FIO_NBD:-$PWD/scripts/bench/fio-nbd.sh}
ROUNDS=${ROUNDS:-1}
S=$PWD/bin/sealdisk
go build -o "$S" ./cmd/sealdisk
W=$(mktemp -d /dev/shm/sealdisk-nbd.XXXX)
trap 'for p in "$W"/*.pid; do [ -e "$p" ] && kill "$(cat "$p")" 2>/dev/null || true; done; rm -rf "$W"' EXIT  # no set -e abort before rm
cd "$W"
echo "# $(date -u +%FT%TZ) commit $(git -C "$OLDPWD" rev-parse --short HEAD) nproc $(nproc) load $(cut -d' ' -f1-3 /proc/loadavg)"
$S vendor init --dir v >/dev/null; $S psp init --dir p --vendor v >/dev/null
$S provider keygen --dir k >/dev/null; $S psp trust add --dir p k/provider.pub
echo fw > fw
head -c 1G /dev/urandom > raw
$S seal --in raw --out vm.img --chip p/chip.crt --vendor-root v/vendor.crt --provider-key k/provider.key --firmware fw 2>/dev/null
rm raw
printf PASS > pass
for _ in 1 2 3 4 5; do
  qemu-img create -f luks --object secret,id=s0,file=pass -o key-secret=s0,cipher-alg=aes-256,cipher-mode=xts,iter-time=10 luks.img 1G >/dev/null 2>&1 && break
done
$S serve --psp p --image vm.img --firmware fw --name vm --nbd "unix:$W/s.sock" 2>serve.log & echo $! > sealdisk.pid
nbdkit -f -U "$W/l.sock" --filter=luks file luks.img passphrase=+pass 2>nbdkit.log & echo $! > nbdkit.pid
for _ in $(seq 100); do [ -S s.sock ] && [ -S l.sock ] && break; sleep 0.1; done
for _ in $(seq "$ROUNDS"); do
  bash "$FIO" "nbd+unix:///vm?socket=$W/s.sock" sealdisk
  bash "$FIO" "nbd+unix:///?socket=$W/l.sock" nbdkit-luks
done
echo "# end $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)"
