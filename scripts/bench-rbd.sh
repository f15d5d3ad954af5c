#!/bin/bash
# NBD throughput of a sealed image on Ceph RBD served by sealdisk, against QEMU's own rbd driver
# with librbd's built-in LUKS2 encryption (qemu-storage-daemon, encrypt.format=luks2) and
# against the same driver on a plain RBD image — one throwaway cluster (internal/cephtest:
# one mon, one BlueStore OSD over a sparse file on the root filesystem, loopback), same run,
# fio's nbd engine as the client for all three (fio_nbd below). Each image is 1 GiB, fully written with random data first, so reads
# decrypt real sectors. The three are measured alternately (ROUNDS times). The run holds
# /tmp/sealdisk-bench.lock so other benchmarks on the machine do not overlap it.
# usage: scripts/bench-rbd.sh   (RT=seconds per workload, default 8; ROUNDS, default 2)
set -euo pipefail
if [ -z "${SEALDISK_BENCH_LOCKED:-}" ]; then
  SEALDISK_BENCH_LOCKED=1 exec flock /tmp/sealdisk-bench.lock "$0" "$@"
fi
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$HOME/go/bin:$PATH
# fio_nbd URI LABEL: one line per workload: label workload MB/s IOPS (RT seconds each).
fio_nbd() {
  local uri=$1 label=$2 w out bw iops
  for w in "read 1M 8" "write 1M 8" "randread 4k 32" "randwrite 4k 32"; do
    set -- $w
    out=$(fio --name=x --ioengine=nbd --uri="$uri" --rw="$1" --bs="$2" --iodepth="$3" --size=1g \
      --runtime="${RT:-8}" --time_based --output-format=terse --terse-version=3 2>&1 | tail -1)
    if [[ $1 == *read* ]]; then bw=$(echo "$out" | cut -d';' -f7); iops=$(echo "$out" | cut -d';' -f8)
    else bw=$(echo "$out" | cut -d';' -f48); iops=$(echo "$out" | cut -d';' -f49); fi
    printf "%-14s %-16s %8.1f MB/s %9s IOPS\n" "$label" "$1-$2-qd$3" "$(echo "$bw/1024" | bc -l)" "$iops"
  done
}
ROUNDS=${ROUNDS:-2}
S=$PWD/bin/sealdisk
make -s build
W=$(mktemp -d /tmp/sealdisk-rbd.XXXX)
go build -o "$W/cluster" ./internal/cephtest/cluster
# the clients first, each waited for (a librbd client stuck on a stopped cluster never exits),
# then the cluster
cleanup() {
  for p in sealdisk qsd cluster; do
    [ -e "$W/$p.pid" ] || continue
    pid=$(cat "$W/$p.pid")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$W"
}
trap cleanup EXIT
cd "$W"
dirty=$(git -C "$OLDPWD" status --porcelain --untracked-files=no | awk '{printf " %s", $2}')
echo "# $(date -u +%FT%TZ) commit $(git -C "$OLDPWD" rev-parse --short HEAD)${dirty:+ plus uncommitted changes in$dirty} nproc $(nproc) load $(cut -d' ' -f1-3 /proc/loadavg)"
./cluster "$W/ceph.env" >cluster.log 2>&1 & echo $! > cluster.pid
for _ in $(seq 300); do [ -s ceph.env ] && break; sleep 0.1; done
[ -s ceph.env ] || { cat cluster.log; exit 1; }
. ./ceph.env
export SEALDISK_CEPH_CONF=$CEPH_CONF SEALDISK_CEPH_ID=$CEPH_ID SEALDISK_CEPH_KEYRING=$CEPH_KEYRING
RBD="rbd -c $CEPH_CONF --id $CEPH_ID --keyring $CEPH_KEYRING"
echo "# cluster: $(ceph-osd --version | cut -d' ' -f1-3), BlueStore on $(df -T "$CEPH_DIR" | awk 'NR==2{print $2}'), rbd_cache off for all three"

$S vendor init --dir v >/dev/null; $S psp init --dir p --vendor v >/dev/null
$S provider keygen --dir k >/dev/null; $S psp trust add --dir p k/provider.pub
echo fw > fw
head -c 1G /dev/urandom > raw
$S seal --in raw --out "rbd:$CEPH_POOL/sealdisk" --chip p/chip.crt --vendor-root v/vendor.crt --provider-key k/provider.key --firmware fw 2>/dev/null
printf PASS > pass
$RBD create --size 1040M "$CEPH_POOL/luks" # 1 GiB after the 16 MiB LUKS2 header
$RBD encryption format "$CEPH_POOL/luks" luks2 pass
$RBD create --size 1G "$CEPH_POOL/plain"

$S serve --psp p --image "rbd:$CEPH_POOL/sealdisk" --firmware fw --name vm --nbd "unix:$W/sealdisk.sock" 2>serve.log & echo $! > sealdisk.pid
rbdopts="pool=$CEPH_POOL,conf=$CEPH_CONF,user=$CEPH_ID"
qemu-storage-daemon --object secret,id=s0,file=pass \
  --blockdev driver=rbd,node-name=luks,$rbdopts,image=luks,encrypt.format=luks2,encrypt.key-secret=s0,cache.direct=on \
  --blockdev driver=rbd,node-name=plain,$rbdopts,image=plain,cache.direct=on \
  --nbd-server addr.type=unix,addr.path="$W/qsd.sock" \
  --export type=nbd,id=e0,node-name=luks,name=luks,writable=on \
  --export type=nbd,id=e1,node-name=plain,name=plain,writable=on 2>qsd.log & echo $! > qsd.pid
for _ in $(seq 300); do [ -S sealdisk.sock ] && [ -S qsd.sock ] && break; sleep 0.1; done
[ -S sealdisk.sock ] || { cat serve.log; exit 1; }
[ -S qsd.sock ] || { cat qsd.log; exit 1; }
# fill the other two with the same random data the sealed image holds
for e in luks plain; do
  nbdcopy raw "nbd+unix:///$e?socket=$W/qsd.sock"
done
rm raw
echo "# luks2 export (after its header): $(qemu-img info "nbd+unix:///luks?socket=$W/qsd.sock" | grep "virtual size")"
for _ in $(seq "$ROUNDS"); do
  fio_nbd "nbd+unix:///vm?socket=$W/sealdisk.sock" sealdisk-rbd
  fio_nbd "nbd+unix:///luks?socket=$W/qsd.sock" qemu-rbd-luks2
  fio_nbd "nbd+unix:///plain?socket=$W/qsd.sock" qemu-rbd-plain
done
echo "# end $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)"
