#!/bin/bash
# Two (or more) builds of sealdisk on one image, interleaved round by round, with nbdkit-luks on
# a LUKS copy of the same data beside them: the before/after of an engine change. Each revision
# is built from `git archive` of it (the work tree is not touched); "." is the work tree as it is.
#
#   REVS="HEAD~1 ." scripts/bench-ab.sh
#   REVS="abc123 def456" WL="randwrite 4k 32 32|write 1M 8" ROUNDS=3 scripts/bench-ab.sh
#
# Variables: REVS (git revisions or "."), WL (workloads "rw bs iodepth [fsync]" separated by |;
# default the four writes), RT (seconds per run, default 5), ROUNDS (default 3), SIZE_MIB
# (default 1024), DIR (where the image lives, default /var/tmp, the disk), WARM (1: before each
# server starts, the image's cached pages are dropped and the file read whole with cat, as a
# just-written image sits in the page cache; default 1), PEER (0: no nbdkit-luks), SETTLE (1:
# `sync` and 2 s between workloads, so that one workload's dirty pages are not written back
# during the next).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
export PATH=/usr/local/go/bin:$HOME/go/bin:$PATH
REVS=${REVS:-HEAD~1 .}; RT=${RT:-5}; ROUNDS=${ROUNDS:-3}; SIZE_MIB=${SIZE_MIB:-1024}
DIR=${DIR:-/var/tmp}; WARM=${WARM:-1}; PEER=${PEER:-1}; SETTLE=${SETTLE:-0}
WL=${WL:-write 1M 8|randwrite 4k 32|randwrite 4k 32 32}
for t in fio nbdkit qemu-img python3; do command -v $t >/dev/null || { echo "bench-ab: $t missing (make deps)" >&2; exit 1; }; done
W=$(mktemp -d "$DIR/sealdisk-ab.XXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
  rm -rf "$W"
}
trap cleanup EXIT
i=0; LABELS=()
for r in $REVS; do
  i=$((i + 1)); l="$i:$r"; LABELS+=("$l")
  mkdir -p "$W/src$i" "$W/bin"
  if [ "$r" = . ]; then
    go build -o "$W/bin/sd$i" ./cmd/sealdisk
  else
    git archive "$r" | tar -x -C "$W/src$i"
    (cd "$W/src$i" && go build -o "$W/bin/sd$i" ./cmd/sealdisk)
  fi
done
S=$W/bin/sd1
cd "$W"
$S vendor init --dir v >/dev/null; $S psp init --dir p --vendor v >/dev/null
$S provider keygen --dir k >/dev/null; $S psp trust add --dir p k/provider.pub
echo fw > fw
head -c $((SIZE_MIB << 20)) /dev/urandom > raw
$S seal --in raw --out vm.img --chip p/chip.crt --vendor-root v/vendor.crt --provider-key k/provider.key --firmware fw 2>/dev/null
if [ "$PEER" = 1 ]; then
  head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > pass
  for try in 1 2 3 4 5; do # qemu-img's key-slot timing fails now and then on a busy machine
    qemu-img create -f luks --object secret,id=s0,file=pass -o key-secret=s0,cipher-alg=aes-256,cipher-mode=xts,iter-time=10 \
      luks.img "${SIZE_MIB}M" >/dev/null 2>&1 && break
    [ "$try" = 5 ] && { echo "bench-ab: qemu-img could not create the LUKS image" >&2; exit 1; }
  done
  qemu-img convert -n --object secret,id=s0,file=pass -f raw raw --target-image-opts driver=luks,key-secret=s0,file.filename=luks.img
fi
rm raw; sync
printf 'psp:\n  dir: %s/p\nnbd:\n  listen: ["unix:%s/s.sock"]\nvms:\n  - name: vm\n    image: %s/vm.img\n    firmware: %s/fw\n' "$W" "$W" "$W" "$W" > serve.yaml
cat > parse.py <<'PY'
import json, sys
label, wl, c0, c1, tck = sys.argv[1:]
raw = sys.stdin.read()  # fio's nbd engine prints a line before the JSON
j = json.loads(raw[raw.index("{"):])["jobs"][0]
s = j["read"] if "read" in wl else j["write"]
p = s["clat_ns"]["percentile"]; gib = s["io_bytes"] / 2**30
cpu = (int(c1) - int(c0)) / int(tck)
print(f"{label:14s} {wl:22s} {s['bw_bytes']/1e6:8.1f} MB/s {s['iops']:8.0f} IOPS p50 {p['50.000000']/1000:7.0f} p99 {p['99.000000']/1000:7.0f} us cpu {cpu/gib if gib else 0:6.2f} s/GiB", flush=True)
PY
TCK=$(getconf CLK_TCK)
IFS='|' read -ra WLS <<<"$WL"
one() { # LABEL URI PID
  local w rw bs qd fs extra c0 c1 res
  for w in "${WLS[@]}"; do
    read -r rw bs qd fs <<<"$w"; extra=(); [ -n "${fs:-}" ] && extra=(--fsync="$fs")
    [ "$SETTLE" = 1 ] && { sync; sleep 2; }
    c0=$(awk '{print $14+$15}' /proc/"$3"/stat)
    res=$(fio --name=x --ioengine=nbd --uri="$2" --rw="$rw" --bs="$bs" --iodepth="$qd" "${extra[@]}" \
      --size="${SIZE_MIB}m" --runtime="$RT" --time_based --output-format=json 2>/dev/null)
    c1=$(awk '{print $14+$15}' /proc/"$3"/stat)
    python3 parse.py "$1" "$rw-$bs-qd$qd${fs:+-fsync$fs}" "$c0" "$c1" "$TCK" <<<"$res"
  done
}
warm() { # FILE: drop its pages, then read it whole (large folios, as after seal or cp)
  python3 -c "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)" "$1"
  cat "$1" > /dev/null
}
if [ "$PEER" = 1 ]; then
  nbdkit -f -U "$W/l.sock" --filter=luks file luks.img passphrase=+pass 2>nbdkit.log & NK=$!; PIDS+=("$NK")
fi
echo "# bench-ab $(date -u +%FT%TZ) $(df -T "$W" | awk 'NR==2{print $2}') at $DIR, RT=$RT ROUNDS=$ROUNDS SIZE_MIB=$SIZE_MIB WARM=$WARM"
for _ in $(seq "$ROUNDS"); do
  for i in "${!LABELS[@]}"; do
    [ "$WARM" = 1 ] && warm vm.img
    rm -f s.sock; "$W/bin/sd$((i + 1))" serve --config serve.yaml 2>"serve$i.log" & P=$!; PIDS+=("$P")
    for _ in $(seq 100); do [ -S s.sock ] && break; sleep 0.1; done
    one "${LABELS[$i]}" "nbd+unix:///vm?socket=$W/s.sock" "$P"
    kill "$P"; wait "$P" 2>/dev/null || true
  done
  if [ "$PEER" = 1 ]; then
    [ "$WARM" = 1 ] && warm luks.img
    one nbdkit-luks "nbd+unix:///?socket=$W/l.sock" "$NK"
  fi
done
