#!/bin/bash
# FUSE-file throughput of sealdisk serve against qemu-storage-daemon's FUSE export of a LUKS
# image and a 1 GiB file inside gocryptfs, same run, with the fio script
# scripts/bench/fio-file.sh (libaio, direct=0, as the reference runs; BENCHMARKS.md). Everything lives
# on tmpfs; the sealdisk image is sealed from random data so every read decrypts. All three
# stay mounted for the whole run and are measured alternately (ROUNDS times), so a change in
# machine load hits each alike; compare ratios within one run. The run holds
# /tmp/sealdisk-bench.lock so other benchmarks on the machine do not overlap it.
# usage: scripts/bench-fuse.sh   (RT=seconds per workload, default 8; ROUNDS, default 2;
#        DIRECT=1 for O_DIRECT instead of the anchors' buffered I/O)
set -euo pipefail
if [ -z "${SEALDISK_BENCH_LOCKED:-}" ]; then
  SEALDISK_BENCH_LOCKED=1 exec flock /tmp/sealdisk-bench.lock "$0" "$@"
fi
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$HOME/go/bin:$PATH
FIO=${FIO_FILE:-$PWD/scripts/bench/fio-file.sh}
ROUNDS=${ROUNDS:-2}
S=$PWD/bin/sealdisk
go build -o "$S" ./cmd/sealdisk
W=$(mktemp -d /dev/shm/sealdisk-fuse.XXXX)
cleanup() {
  for m in "$W/mnt" "$W/qsd.raw" "$W/plain"; do
    grep -q " $m " /proc/self/mountinfo && { fusermount3 -u "$m" 2>/dev/null || fusermount3 -u -z "$m" || true; }
  done
  for p in "$W"/*.pid; do [ -e "$p" ] && kill "$(cat "$p")" 2>/dev/null || true; done
  sleep 0.5
  rm -rf "$W"
}
trap cleanup EXIT # no set -e abort before rm
cd "$W"
dirty=$(git -C "$OLDPWD" status --porcelain --untracked-files=no | awk '{printf " %s", $2}')
echo "# $(date -u +%FT%TZ) commit $(git -C "$OLDPWD" rev-parse --short HEAD)${dirty:+ plus uncommitted changes in$dirty} nproc $(nproc) load $(cut -d' ' -f1-3 /proc/loadavg)"
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
mkdir cipher plain; touch qsd.raw
gocryptfs -q -init -passfile pass -scryptn 10 cipher
gocryptfs -q -nosyslog -passfile pass cipher plain
head -c 1G /dev/urandom > plain/file
$S serve --psp p --image vm.img --firmware fw --name vm --fuse-mountpoint "$W/mnt" 2>serve.log & echo $! > sealdisk.pid
qemu-storage-daemon --object secret,id=s0,file=pass --blockdev driver=file,node-name=f0,filename=luks.img \
  --blockdev driver=luks,node-name=l0,file=f0,key-secret=s0 \
  --export type=fuse,id=e0,node-name=l0,mountpoint="$W/qsd.raw",writable=on 2>qsd.log & echo $! > qsd.pid
for _ in $(seq 200); do [ -e mnt/vm.raw ] && [ "$(stat -c %s qsd.raw)" = 1073741824 ] && break; sleep 0.1; done
[ -e mnt/vm.raw ] || { cat serve.log; exit 1; }
: > results
for _ in $(seq "$ROUNDS"); do
  bash "$FIO" "$W/mnt/vm.raw" sealdisk | tee -a results
  bash "$FIO" "$W/qsd.raw" qsd-luks | tee -a results
  bash "$FIO" "$W/plain/file" gocryptfs | tee -a results
done
echo "# end $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)"
# Mean over the rounds: MB/s for the 1M workloads, IOPS for the 4k ones; ratio = sealdisk/peer.
awk -v rounds="$ROUNDS" '
  { v = ($2 ~ /-1M-/) ? $3 : $5; sum[$2 "|" $1] += v; if (!($2 in seen)) { seen[$2] = 1; order[n++] = $2 } }
  END {
    printf "\n| workload (fio-file.sh, direct=%s) | sealdisk | qsd LUKS | gocryptfs | vs qsd | vs gocryptfs |\n|---|---|---|---|---|---|\n", ENVIRON["DIRECT"] == "" ? 0 : ENVIRON["DIRECT"]
    for (i = 0; i < n; i++) {
      w = order[i]; s = sum[w "|sealdisk"] / rounds; q = sum[w "|qsd-luks"] / rounds; g = sum[w "|gocryptfs"] / rounds
      if (w ~ /-1M-/) printf "| %s | %.0f MB/s | %.0f MB/s | %.0f MB/s | %.2fx | %.2fx |\n", w, s, q, g, s / q, s / g
      else printf "| %s | %.1fk IOPS | %.1fk IOPS | %.1fk IOPS | %.2fx | %.2fx |\n", w, s / 1000, q / 1000, g / 1000, s / q, s / g
    }
  }' results
