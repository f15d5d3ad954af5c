#!/bin/bash
# Several VMs on one host: N sealed images attached to one `sealdisk serve`, fio on every export
# at once, against fio on one export alone, in one run. Prints, per workload, one VM's figure,
# the aggregate of N, their ratio, and the server's resident memory per attached VM.
#
#   scripts/bench-vms.sh                 # 8 VMs, images on DISK_DIR (default /var/tmp, the disk)
#   N=4 DIR=/dev/shm scripts/bench-vms.sh
#
# Variables: N (VMs, default 8), RT (seconds per run, default 5), ROUNDS (default 2),
# SIZE_MIB (per image, default 256), DIR (where the images live), CACHE (engine cache_size per
# server, default the config's), SETTLE (seconds idle after the runs before memory is read again).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
export PATH=/usr/local/go/bin:$HOME/go/bin:$PATH
N=${N:-8}; RT=${RT:-5}; ROUNDS=${ROUNDS:-2}; SIZE_MIB=${SIZE_MIB:-256}; DIR=${DIR:-/var/tmp}
command -v fio >/dev/null || { echo "bench-vms: fio missing (apt-get install fio)" >&2; exit 1; }
S=$REPO/bin/sealdisk
go build -o "$S" ./cmd/sealdisk
W=$(mktemp -d "$DIR/sealdisk-vms.XXXX")
cleanup() { # the server checkpoints every image on SIGTERM: wait for it before removing them
  if [ -f "$W/pid" ]; then
    local p; p=$(cat "$W/pid"); kill "$p" 2>/dev/null
    for _ in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -rf "$W"
}
trap cleanup EXIT
cd "$W"
$S vendor init --dir v >/dev/null; $S psp init --dir p --vendor v >/dev/null
$S provider keygen --dir k >/dev/null; $S psp trust add --dir p k/provider.pub
echo fw > fw
head -c $((SIZE_MIB << 20)) /dev/urandom > raw
cert=(--chip p/chip.crt --vendor-root v/vendor.crt --provider-key k/provider.key --firmware fw)
{ echo "psp:"; echo "  dir: $W/p"; echo "nbd:"; echo "  listen: [\"unix:$W/s.sock\"]"
  echo "admin:"; echo "  socket: $W/admin.sock"; echo "  metrics_listen: unix:$W/metrics.sock"
  [ -n "${CACHE:-}" ] && { echo "engine:"; echo "  cache_size: $CACHE"; }
  echo "vms:"; echo "  - name: vm1"; echo "    image: $W/vm1.img"; echo "    firmware: $W/fw"; } > serve.yaml
for i in $(seq 1 "$N"); do $S seal --in raw --out "vm$i.img" "${cert[@]}" 2>/dev/null; done
sync
# Anonymous resident memory: the server's own (caches, buffers); its mappings of the image
# files (RssFile) are the page cache's, shared, and reported apart.
rss_kib() { awk '/^RssAnon/ {print $2}' /proc/"$1"/status; }
rssfile_kib() { awk '/^RssFile/ {print $2}' /proc/"$1"/status; }
$S serve --config serve.yaml 2>serve.log & echo $! > pid
for _ in $(seq 100); do [ -S s.sock ] && break; sleep 0.1; done
PID=$(cat pid)
rss1=$(rss_kib "$PID")
for i in $(seq 2 "$N"); do
  $S admin --socket "$W/admin.sock" attach --name "vm$i" --image "$W/vm$i.img" --firmware "$W/fw" >/dev/null
done
rssn=$(rss_kib "$PID")
# fio JOBS... : one job per export given, all at once; prints aggregate MB/s and IOPS.
fiorun() {
  local rw=$1 bs=$2 qd=$3; shift 3
  local args=() v
  for v in "$@"; do args+=(--name="$v" --uri="nbd+unix:///$v?socket=$W/s.sock"); done
  fio --ioengine=nbd --rw="$rw" --bs="$bs" --iodepth="$qd" --size="${SIZE_MIB}m" --runtime="$RT" \
    --time_based --group_reporting --output-format=json "${args[@]}" 2>/dev/null |
    python3 -c '
import json, sys
raw = sys.stdin.read(); j = json.loads(raw[raw.index("{"):])["jobs"][0]
s = j["read"] if sys.argv[1].startswith(("read", "randread")) else j["write"]
print(round(s["bw_bytes"] / 1e6, 1), round(s["iops"]))' "$rw"
}
all=(); for i in $(seq 1 "$N"); do all+=("vm$i"); done
echo "bench-vms: $N VMs of $SIZE_MIB MiB in $DIR ($(df -T "$DIR" | awk 'NR==2 {print $2}')), commit $(git -C "$REPO" rev-parse --short HEAD), load $(cut -d' ' -f1 /proc/loadavg)"
printf '%-6s %-16s %12s %14s %7s\n' round workload "one VM" "$N VMs" ratio
for r in $(seq 1 "$ROUNDS"); do
  for w in "read 1M 8" "write 1M 8" "randread 4k 32" "randwrite 4k 32"; do
    read -r rw bs qd <<<"$w"
    read -r mb1 io1 <<<"$(fiorun "$rw" "$bs" "$qd" vm1)"
    read -r mbn ion <<<"$(fiorun "$rw" "$bs" "$qd" "${all[@]}")"
    if [ "$bs" = 1M ]; then one="$mb1 MB/s"; many="$mbn MB/s"; ratio=$(python3 -c "print(round($mbn/$mb1,2))")
    else one="$io1 IOPS"; many="$ion IOPS"; ratio=$(python3 -c "print(round($ion/$io1,2))"); fi
    printf '%-6s %-16s %12s %14s %7s\n' "$r" "$rw $bs qd$qd" "$one" "$many" "$ratio"
  done
done
rssa=$(rss_kib "$PID")
# The Go heap behind that RSS: in use, and idle (freed, not yet returned to the kernel).
metric() { curl -s --unix-socket "$W/metrics.sock" http://x/metrics | awk -v m="$1" '$1 == m {printf "%d", $2 / 1048576}'; }
heap="Go heap in use $(metric go_memstats_heap_inuse_bytes) MiB, idle $(metric go_memstats_heap_idle_bytes) MiB of which released $(metric go_memstats_heap_released_bytes) MiB"
if [ "${SETTLE:-0}" -gt 0 ]; then # idle, the runtime collects (every 2 min at most) and returns memory
  sleep "$SETTLE"
  echo "after $SETTLE s idle: anonymous RSS $(($(rss_kib "$PID") / 1024)) MiB; Go heap in use $(metric go_memstats_heap_inuse_bytes) MiB, idle $(metric go_memstats_heap_idle_bytes) MiB of which released $(metric go_memstats_heap_released_bytes) MiB"
fi
echo "server anonymous RSS: $((rss1 / 1024)) MiB with one VM attached, $((rssn / 1024)) MiB with $N (idle): $(( (rssn - rss1) / 1024 / (N > 1 ? N - 1 : 1) )) MiB per further VM; $((rssa / 1024)) MiB after the runs ($((rssa / 1024 / N)) MiB per VM, each disk's own cache (engine.cache_size) included); mapped image pages $(($(rssfile_kib "$PID") / 1024)) MiB; $heap"
