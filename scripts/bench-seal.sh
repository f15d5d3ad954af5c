#!/bin/bash
# Seal/unseal throughput of a 1 GiB page-cached random image, side by side in one run with
# qemu-img converting the same raw image into and out of LUKS (aes-256-xts, as the reference runs in BENCHMARKS.md).
# usage: scripts/bench-seal.sh [SIZE_MIB]   (prints a Markdown table)
set -euo pipefail
cd "$(dirname "$0")/.."; REPO=$PWD
export PATH=/usr/local/go/bin:$HOME/go/bin:$PATH
MIB=${1:-1024}; RUNS=${RUNS:-3}
S=$PWD/bin/sealdisk
[ -x "$S" ] || go build -o "$S" ./cmd/sealdisk
command -v qemu-img >/dev/null || { echo "qemu-img missing: make deps" >&2; exit 1; }
# tmpfs: "page cached" for both tools, so fdatasync costs nothing and neither is measuring a disk
W=$(mktemp -d /dev/shm/sealdisk-bench.XXXX); trap 'rm -rf "$W"' EXIT
cd "$W"
$S vendor init --dir v >/dev/null; $S psp init --dir p --vendor v >/dev/null
$S provider keygen --dir k >/dev/null; $S psp trust add --dir p k/provider.pub
echo fw > fw
head -c $((MIB << 20)) /dev/urandom > raw
cat raw > /dev/null
pw=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf '%s' "$pw" > pass
best() { # best wall time in seconds of RUNS runs of "$@"
  local b=999999 t s e
  for _ in $(seq "$RUNS"); do
    rm -f out.img out.raw luks.img luks.raw
    s=$(date +%s.%N); "$@" >/dev/null 2>>errors.log || { cat errors.log >&2; exit 1; }; e=$(date +%s.%N)
    t=$(echo "$e - $s" | bc -l); (( $(echo "$t < $b" | bc -l) )) && b=$t
  done
  echo "$b"
}
seal() { $S seal --in raw --out out.img --chip p/chip.crt --vendor-root v/vendor.crt --provider-key k/provider.key --firmware fw; }
unseal() { $S unseal --in sealed.img --out out.raw --psp p; }
# qemu-img sometimes fails its PBKDF timing ("Unable to get accurate CPU usage"): retry.
luks_enc() { for _ in 1 2 3 4 5; do luks_enc1 && return 0; rm -f luks.img; done; return 1; }
luks_enc1() { qemu-img convert -f raw -O luks --object secret,id=s0,file=pass -o key-secret=s0,cipher-alg=aes-256,cipher-mode=xts,iter-time=10 raw luks.img; }
luks_dec() { qemu-img convert --object secret,id=s0,file=pass --image-opts driver=luks,key-secret=s0,file.filename=lsealed.img -O raw luks.raw; }
load0=$(cut -d' ' -f1-3 /proc/loadavg)
seal 2>>errors.log; mv out.img sealed.img; luks_enc; mv luks.img lsealed.img
cat sealed.img lsealed.img > /dev/null
ts=$(best seal); tu=$(best unseal); ls=$(best luks_enc); lu=$(best luks_dec)
mbps() { echo "scale=0; $MIB * 1048576 / $1 / 1000000" | bc -l; }
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
echo "$(date -u +%Y-%m-%d), commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown), $(nproc) cores ($cpu), $(qemu-img --version | head -1), load average before $load0:"
echo
echo "| operation ($MIB MiB, page cache, best of $RUNS) | sealdisk | qemu-img LUKS aes-256-xts | sealdisk speed-up |"
echo "|---|---|---|---|"
echo "| encrypt (seal / convert -O luks) | $(mbps "$ts") MB/s | $(mbps "$ls") MB/s | $(echo "scale=1; $ls / $ts" | bc -l)x |"
echo "| decrypt (unseal / convert -O raw) | $(mbps "$tu") MB/s | $(mbps "$lu") MB/s | $(echo "scale=1; $lu / $tu" | bc -l)x |"
