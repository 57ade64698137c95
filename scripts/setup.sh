#!/usr/bin/env bash
# Installs everything Stratus needs to build, run and test on Debian 12, then builds it.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  etcd-server etcd-client       # the store
  protobuf-compiler libprotobuf-dev # etcd-client's build needs protoc and its well-known .proto files
  libvirt-dev libvirt-daemon-system qemu-system-x86 qemu-utils  # compute
  dnsmasq-base nftables iproute2 # network
  lvm2                          # storage
  cpio genisoimage              # the test guest's initramfs; config drives
  python3-kubernetes            # e2e: the Python kubernetes client
  pkg-config ca-certificates curl
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# etcd-server's package may start a system etcd on the default ports; Stratus starts its own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl stop etcd || true
fi

if ! command -v kubectl >/dev/null 2>&1; then
  echo "setup: kubectl (1.27 or newer) is required and is not on PATH" >&2
  exit 1
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: a Rust toolchain (cargo) is required: see https://rustup.rs" >&2
  exit 1
fi
