#!/bin/bash
# The benchmark a new user would run: fio against sealdisk and the peers they use today, in one
# run, interleaved round by round, images on the machine's disk file system first, then on
# tmpfs. Prints one line per (place, server, workload) and writes the same as JSON lines.
#
#   scripts/bench.sh                    # disk (DISK_DIR, default /var/tmp) then tmpfs; NBD and FUSE
#   WHERE=disk ONLY=nbd scripts/bench.sh
#   CONTENDED=1 scripts/bench.sh        # every core kept busy by a CPU hog during the runs (a busy host)
#   SHORT=1 scripts/bench.sh            # CI smoke: 1 s runs, sealdisk and nbdkit-luks, a 64 MiB image
#   APPEND=1 scripts/bench.sh           # also append the results as a section to BENCHMARKS.md
#
# Variables: RT (seconds per run, default 5), ROUNDS (default 2), SIZE_MIB (default 1024),
# DISK_DIR, WHERE (disk,tmpfs), ONLY (nbd,fuse), JSON (output file, default bench-results.jsonl).
# Ratios between servers measured in the same round are what to compare; absolute numbers move
# with the machine's load.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
export PATH=/usr/local/go/bin:$HOME/go/bin:$PATH
RT=${RT:-5}; ROUNDS=${ROUNDS:-2}; SIZE_MIB=${SIZE_MIB:-1024}
WHERE=${WHERE:-disk,tmpfs}; ONLY=${ONLY:-nbd,fuse}; DISK_DIR=${DISK_DIR:-/var/tmp}
JSON=${JSON:-$REPO/bench-results.jsonl}
if [ -n "${SHORT:-}" ]; then RT=1; ROUNDS=1; SIZE_MIB=64; WHERE=${WHERE_SHORT:-tmpfs}; ONLY=nbd; fi
# The peers come from Debian packages: install what is missing.
need_tool() { # TOOL PACKAGE
  command -v "$1" >/dev/null && return 0
  echo "bench: installing $2 (for $1)" >&2
  { [ -n "${APT_UPDATED:-}" ] || apt-get update -qq; } && APT_UPDATED=1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  command -v "$1" >/dev/null || { echo "bench: $1 missing and $2 did not install it" >&2; exit 1; }
}
need_tool fio fio; need_tool nbdkit nbdkit; need_tool qemu-img qemu-utils; need_tool qemu-nbd qemu-utils
if [[ $ONLY == *fuse* ]]; then
  need_tool gocryptfs gocryptfs; need_tool qemu-storage-daemon qemu-system-x86; need_tool fusermount3 fuse3
fi
S=$REPO/bin/sealdisk
go build -o "$S" ./cmd/sealdisk
COMMIT=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!BENCHMARKS.md' || echo +dirty)
: > "$JSON"
TXT=$(mktemp /tmp/sealdisk-bench.XXXX.txt)
PARSE=$(mktemp /tmp/sealdisk-bench.XXXX.py)
cat > "$PARSE" <<'PY'
import json, sys
place, label, wl, c0, c1, tck, path, commit, contended = sys.argv[1:]
raw = sys.stdin.read()  # fio's nbd engine prints a line before the JSON
j = json.loads(raw[raw.index("{"):])["jobs"][0]
side = j["read"] if wl.startswith(("read", "randread")) else j["write"]
pct = side.get("clat_ns", {}).get("percentile", {})
p50, p99 = pct.get("50.000000", 0) / 1000, pct.get("99.000000", 0) / 1000
gib = side["io_bytes"] / (1 << 30)
cpu = (int(c1) - int(c0)) / int(tck)
rec = {"commit": commit, "place": place, "server": label, "workload": wl, "contended": contended == "1",
       "mb_s": round(side["bw_bytes"] / 1e6, 1), "iops": round(side["iops"]),
       "p50_us": round(p50), "p99_us": round(p99), "cpu_s_per_gib": round(cpu / gib, 2) if gib else None}
with open(path, "a") as f:
    f.write(json.dumps(rec) + "\n")
print(f"{place:5s} {label:16s} {wl:24s} {rec['mb_s']:8.1f} MB/s {rec['iops']:7d} IOPS p50 {rec['p50_us']:6d}us p99 {rec['p99_us']:6d}us cpu {rec['cpu_s_per_gib'] or 0:6.2f} s/GiB")
PY
HOG=()
stop_hog() { for p in "${HOG[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; HOG=(); }
W=
cleanup() {
  stop_hog
  [ -n "$W" ] || return 0
  for m in "$W/mnt" "$W/qsd.raw" "$W/plain"; do
    grep -q " $m " /proc/self/mountinfo && { fusermount3 -u "$m" 2>/dev/null || fusermount3 -u -z "$m" || true; }
  done
  for p in "$W"/*.pid; do [ -e "$p" ] && kill "$(cat "$p")" 2>/dev/null || true; done
  sleep 0.5; rm -rf "$W"
}
trap 'cleanup; rm -f "$TXT" "$PARSE"' EXIT
out() { echo "$*" | tee -a "$TXT"; }

cputicks() { awk '{print $14+$15}' /proc/"$1"/stat; }
TCK=$(getconf CLK_TCK)
WORKLOADS=("read 1M 8" "write 1M 8" "randread 4k 32" "randwrite 4k 32" "randwrite 4k 32 32" "randread 4k 1")
[ -n "${SHORT:-}" ] && WORKLOADS=("randwrite 4k 32" "randwrite 4k 32 32" "randread 4k 32")

# run PLACE LABEL PID fio-args...: one line per workload
run() {
  local place=$1 label=$2 pid=$3; shift 3
  local w
  for w in "${WORKLOADS[@]}"; do
    local rw bs qd fs
    read -r rw bs qd fs <<<"$w"
    local extra=() name="$rw-$bs-qd$qd"
    if [ -n "$fs" ]; then extra=(--fsync="$fs"); name="$name-fsync$fs"; fi
    local c0 c1 res
    c0=$(cputicks "$pid")
    res=$(fio --name=x "$@" --rw="$rw" --bs="$bs" --iodepth="$qd" "${extra[@]}" --size="${SIZE_MIB}m" \
      --runtime="$RT" --time_based --output-format=json 2>/dev/null)
    c1=$(cputicks "$pid")
    python3 "$PARSE" "$place" "$label" "$name" "$c0" "$c1" "$TCK" "$JSON" "$COMMIT" "${CONTENDED:-0}" <<<"$res" | tee -a "$TXT"
  done
}

bench_place() {
  local place=$1 base=$2
  W=$(mktemp -d "$base/sealdisk-bench.XXXX")
  cd "$W"
  $S vendor init --dir v >/dev/null; $S psp init --dir p --vendor v >/dev/null
  $S provider keygen --dir k >/dev/null; $S psp trust add --dir p k/provider.pub
  echo fw > fw
  head -c $((SIZE_MIB << 20)) /dev/urandom > raw
  local cert=(--chip p/chip.crt --vendor-root v/vendor.crt --provider-key k/provider.key --firmware fw)
  $S seal --in raw --out vm.img "${cert[@]}" 2>/dev/null
  [ -n "${SHORT:-}" ] || $S seal --in raw --out notree.img --no-integrity-tree "${cert[@]}" 2>/dev/null
  head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > pass
  for _ in 1 2 3 4 5; do
    qemu-img create -f luks --object secret,id=s0,file=pass -o key-secret=s0,cipher-alg=aes-256,cipher-mode=xts,iter-time=10 \
      luks.img "${SIZE_MIB}M" >/dev/null 2>&1 && break
  done
  qemu-img convert -n --object secret,id=s0,file=pass -f raw raw --target-image-opts driver=luks,key-secret=s0,file.filename=luks.img
  # Every image is written before the first run and synced: a copy still being written back
  # would compete for the disk with whichever server runs first.
  [[ $ONLY == *nbd* ]] && [ -z "${SHORT:-}" ] && cp raw plainfile.raw
  sync
  if [[ $ONLY == *nbd* ]]; then
    cat > serve.yaml <<EOF
psp:
  dir: $W/p
nbd:
  listen: ["unix:$W/s.sock"]
vms:
  - name: vm
    image: $W/vm.img
    firmware: $W/fw
EOF
    if [ -z "${SHORT:-}" ]; then
      cat >> serve.yaml <<EOF
  - name: notree
    image: $W/notree.img
    firmware: $W/fw
EOF
    fi
    $S serve --config serve.yaml 2>serve.log & echo $! > sealdisk.pid
    nbdkit -f -U "$W/l.sock" --filter=luks file luks.img passphrase=+pass 2>nbdkit.log & echo $! > nbdkitluks.pid
    local peers=(nbdkitluks)
    if [ -z "${SHORT:-}" ]; then
      nbdkit -f -U "$W/f.sock" file plainfile.raw 2>nbdkitf.log & echo $! > nbdkitfile.pid
      qemu-nbd -t -e 8 -k "$W/q.sock" --cache=writeback --object secret,id=s0,file=pass \
        --image-opts driver=luks,key-secret=s0,file.filename=luks.img 2>qnbd.log & echo $! > qemunbd.pid
      peers+=(nbdkitfile qemunbd)
    fi
    for _ in $(seq 200); do
      local up=1; [ -S s.sock ] && [ -S l.sock ] || up=0
      if [ -z "${SHORT:-}" ]; then [ -S f.sock ] && [ -S q.sock ] || up=0; fi
      [ $up = 1 ] && break; sleep 0.1
    done
    for _ in $(seq "$ROUNDS"); do
      run "$place" sealdisk-nbd "$(cat sealdisk.pid)" --ioengine=nbd --uri="nbd+unix:///vm?socket=$W/s.sock"
      [ -n "${SHORT:-}" ] || run "$place" sealdisk-notree "$(cat sealdisk.pid)" --ioengine=nbd --uri="nbd+unix:///notree?socket=$W/s.sock"
      run "$place" nbdkit-luks "$(cat nbdkitluks.pid)" --ioengine=nbd --uri="nbd+unix:///?socket=$W/l.sock"
      if [ -z "${SHORT:-}" ]; then
        run "$place" qemu-nbd-luks "$(cat qemunbd.pid)" --ioengine=nbd --uri="nbd+unix:///?socket=$W/q.sock"
        run "$place" nbdkit-file "$(cat nbdkitfile.pid)" --ioengine=nbd --uri="nbd+unix:///?socket=$W/f.sock"
      fi
    done
    for p in sealdisk "${peers[@]}"; do kill "$(cat $p.pid)" 2>/dev/null || true; rm -f $p.pid; done
    sleep 1
  fi
  if [[ $ONLY == *fuse* ]]; then
    mkdir -p cipher plain; touch qsd.raw
    gocryptfs -q -init -passfile pass -scryptn 10 cipher
    gocryptfs -q -nosyslog -passfile pass cipher plain
    pgrep -n -x gocryptfs > gocryptfs.pid
    cp raw plain/file
    sync # as above: gocryptfs's copy is written back before the first run
    $S serve --psp p --image vm.img --firmware fw --name vm --fuse-mountpoint "$W/mnt" 2>serve-fuse.log & echo $! > sealdisk.pid
    qemu-storage-daemon --object secret,id=s0,file=pass --blockdev driver=file,node-name=f0,filename=luks.img \
      --blockdev driver=luks,node-name=l0,file=f0,key-secret=s0 \
      --export type=fuse,id=e0,node-name=l0,mountpoint="$W/qsd.raw",writable=on 2>qsd.log & echo $! > qsd.pid
    for _ in $(seq 200); do [ -e mnt/vm.raw ] && [ "$(stat -c %s qsd.raw)" = $((SIZE_MIB << 20)) ] && break; sleep 0.1; done
    for _ in $(seq "$ROUNDS"); do
      run "$place" sealdisk-fuse "$(cat sealdisk.pid)" --filename="$W/mnt/vm.raw" --ioengine=libaio --direct=0
      run "$place" qsd-fuse-luks "$(cat qsd.pid)" --filename="$W/qsd.raw" --ioengine=libaio --direct=0
      run "$place" gocryptfs "$(cat gocryptfs.pid)" --filename="$W/plain/file" --ioengine=libaio --direct=0
    done
  fi
  cd "$REPO"
  cleanup
  W=
}

start_hog() {
  [ "${CONTENDED:-}" = 1 ] || return 0
  for _ in $(seq "$(nproc)"); do (while :; do :; done) & HOG+=($!); done
}

out "# sealdisk bench $(date -u +%FT%TZ) commit $COMMIT cpu $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) nproc $(nproc) load $(cut -d' ' -f1-3 /proc/loadavg) RT=$RT ROUNDS=$ROUNDS SIZE_MIB=$SIZE_MIB CONTENDED=${CONTENDED:-0} fio $(fio --version)"
start_hog
for place in ${WHERE//,/ }; do
  case $place in
    disk) out "# disk: $DISK_DIR on $(df -T "$DISK_DIR" | awk 'NR==2{print $2" "$1}')"; bench_place disk "$DISK_DIR" ;;
    tmpfs) bench_place tmpfs /dev/shm ;;
    *) echo "bench: unknown place $place (disk, tmpfs)" >&2; exit 1 ;;
  esac
done
stop_hog
out "# end $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg); JSON lines in $JSON"
python3 - "$JSON" <<'PY' | tee -a "$TXT"
import json, statistics, sys
from collections import defaultdict
rows = [json.loads(l) for l in open(sys.argv[1])]
med = defaultdict(list)
for r in rows:
    med[(r["place"], r["server"], r["workload"])].append(r)
def m(place, server, wl, key):
    v = [r[key] for r in med.get((place, server, wl), []) if r[key] is not None]
    return statistics.median(v) if v else None
pairs = [("sealdisk-nbd", p) for p in ("nbdkit-luks", "qemu-nbd-luks", "nbdkit-file", "sealdisk-notree")] + \
        [("sealdisk-fuse", p) for p in ("gocryptfs", "qsd-fuse-luks")]
places = sorted({r["place"] for r in rows}, key=lambda p: p != "disk")
wls = list(dict.fromkeys(r["workload"] for r in rows))
print("# ratios, medians over rounds: throughput (MB/s or IOPS) sealdisk/peer, then server CPU s/GiB sealdisk/peer")
for place in places:
    print(f"# {place}: " + " | ".join(f"{a.split('-')[1]}/{b}" for a, b in pairs if m(place, a, wls[0], 'iops') and m(place, b, wls[0], 'iops')))
    for wl in wls:
        key = "mb_s" if "1M" in wl else "iops"
        cells = []
        for a, b in pairs:
            x, y = m(place, a, wl, key), m(place, b, wl, key)
            if x is None or y is None:
                continue
            cx, cy = m(place, a, wl, "cpu_s_per_gib"), m(place, b, wl, "cpu_s_per_gib")
            cells.append(f"{x / y:5.2f}x cpu {cx / cy if cx and cy else 0:4.2f}")
        print(f"{place:5s} {wl:26s} " + " | ".join(cells))
PY
if [ -n "${APPEND:-}" ]; then
  {
    echo
    echo "### make bench, $(date -u +%F), commit $COMMIT"
    echo
    echo "Command: \`$( [ "${CONTENDED:-}" = 1 ] && printf 'CONTENDED=1 ')RT=$RT ROUNDS=$ROUNDS WHERE=$WHERE ONLY=$ONLY make bench\`."
    echo
    echo '```'
    cat "$TXT"
    echo '```'
  } >> "$REPO/BENCHMARKS.md"
fi
