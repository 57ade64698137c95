#!/usr/bin/env bash
# Installs everything Stratus needs to build, run and test on Debian 12, then checks that every
# program and module it runs is really there. Safe to run again.
#
# The packages are installed as one set, in one apt transaction: when anything is missing, the
# whole list is handed to apt together, so a package that apt would remove to satisfy another
# (as qemu-system-x86 removes a newer, backported qemu-utils) is put back in the same step.
# Afterwards every required program is looked for; a missing one stops the script with its
# name and the package that provides it.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the project runs, and the Debian package that provides each. One line each:
#   kind  name  package
# kind is `bin` (a program looked up on PATH, or with sbin directories added), `py` (a module
# of /usr/bin/python3, which the e2e tests run), or `pkg` (a package with no program to run:
# libraries and headers a build needs).
required='
bin  etcd                 etcd-server
bin  etcdctl              etcd-client
bin  protoc               protobuf-compiler
pkg  libprotobuf-dev      libprotobuf-dev
pkg  libvirt-dev          libvirt-dev
bin  pkg-config           pkg-config
bin  libvirtd             libvirt-daemon-system
bin  virtlogd             libvirt-daemon-system
bin  virsh                libvirt-clients
bin  qemu-system-x86_64   qemu-system-x86
bin  qemu-img             qemu-utils
bin  dnsmasq              dnsmasq-base
bin  nft                  nftables
bin  conntrack            conntrack
bin  ovs-vswitchd         openvswitch-switch
bin  ovs-vsctl            openvswitch-switch
bin  ovs-ofctl            openvswitch-common
bin  ip                   iproute2
bin  ethtool              ethtool
bin  busybox              busybox-static
bin  lvcreate             lvm2
bin  losetup              mount
bin  mkfs.ext4            e2fsprogs
bin  cpio                 cpio
bin  genisoimage          genisoimage
bin  curl                 curl
pkg  ca-certificates      ca-certificates
py   kubernetes           python3-kubernetes
py   yaml                 python3-yaml
bin  chromium             chromium
bin  chromedriver         chromium-driver
py   selenium             python3-selenium
bin  swift-ring-builder   swift
py   swift                python3-swift
bin  swift-object-server  swift-object
bin  swift-container-server swift-container
bin  swift-account-server swift-account
bin  rsync                rsync
bin  swift-proxy-server   swift-proxy
py   keystonemiddleware   python3-keystonemiddleware
bin  swift                python3-swiftclient
py   boto3                python3-boto3
'

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export PATH="$PATH:/usr/sbin:/sbin"

packages() { awk 'NF { print $3 }' <<<"$required" | sort -u; }

# Prints "name (package)" for each required thing that is not there.
absent() {
  local kind name pkg
  while read -r kind name pkg; do
    [ -n "$kind" ] || continue
    case "$kind" in
      bin) command -v "$name" >/dev/null 2>&1 && continue ;;
      py) /usr/bin/python3 -c "import $name" >/dev/null 2>&1 && continue ;;
      pkg) dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" && continue ;;
    esac
    echo "$name ($pkg)"
  done <<<"$required"
}

missing=$(absent)
if [ -n "$missing" ]; then
  echo "setup: missing: $(echo "$missing" | paste -sd, - | sed 's/,/, /g'); installing the whole set"
  mapfile -t pkgs < <(packages)
  # qemu-system-x86 and qemu-utils come from one source package and must be the same version;
  # a machine may carry a newer qemu-utils (from backports) than any qemu-system-x86 it can
  # install, and apt would then remove qemu-utils. Ask for both at qemu-system-x86's version.
  $sudo apt-get update -qq
  qemu=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ { print $2 }')
  if [ -n "$qemu" ] && [ "$qemu" != "(none)" ]; then
    for i in "${!pkgs[@]}"; do
      case "${pkgs[$i]}" in
        qemu-utils | qemu-system-x86) pkgs[i]="${pkgs[$i]}=$qemu" ;;
      esac
    done
  fi
  # (debconf's note that apt-utils is absent is noise; anything else apt says is kept.)
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    --allow-downgrades "${pkgs[@]}" >/dev/null 2> >(grep -v '^debconf: delaying' >&2)
fi

# etcd-server's package may start a system etcd on the default ports; Stratus starts its own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl stop etcd || true
fi

missing=$(absent)
for tool in kubectl cargo; do
  command -v "$tool" >/dev/null 2>&1 || missing+=$'\n'"$tool (not a Debian package: kubectl 1.27 or newer, and a Rust toolchain from rustup, must be on PATH)"
done
missing=$(sed '/^$/d' <<<"$missing")
if [ -n "$missing" ]; then
  echo "setup: these are still missing after installing:" >&2
  sed 's/^/  - /' <<<"$missing" >&2
  exit 1
fi
echo "setup: every required program is present (qemu-img $(qemu-img --version | awk 'NR==1 { print $3 }'), qemu-system-x86_64 $(qemu-system-x86_64 --version | awk 'NR==1 { print $4 }'))"
