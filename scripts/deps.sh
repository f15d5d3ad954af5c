#!/bin/bash
# Installs the Debian packages and Go tools sealdisk's tests drive, only when missing.
set -euo pipefail
export PATH=/usr/local/go/bin:${HOME:-/root}/go/bin:$PATH
# go install puts tools in $(go env GOPATH)/bin, which may not be ~/go/bin
export PATH=$PATH:$(go env GOPATH)/bin
pkgs=(qemu-utils qemu-system-x86 nbdkit libnbd-bin python3-libnbd fio fuse3 gocryptfs
      busybox-static e2fsprogs bc linux-image-amd64 cryptsetup-bin
      ceph-mon ceph-osd ceph-common librbd-dev librados-dev uuid-runtime qemu-block-extra
      nbd-client socat kmod ovmf systemd libvirt-daemon-system libvirt-clients)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "deps: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v staticcheck >/dev/null; then
  echo "deps: installing staticcheck"
  go install honnef.co/go/tools/cmd/staticcheck@v0.8.2
fi
