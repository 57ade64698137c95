#!/usr/bin/env bash
# Builds the tiny test guest that Stratus boots with QEMU direct kernel boot:
#   scripts/build-guest.sh OUTDIR  ->  OUTDIR/vmlinuz, OUTDIR/initrd.img, OUTDIR/disk.qcow2,
#                                      OUTDIR/SHA256SUMS
#
# The guest is Debian 12's cloud kernel plus a busybox-only initramfs. Its /init
# reads the NoCloud config drive (ISO9660, label "cidata"), sets the hostname and
# prints one line on the serial console,
#   STRATUS-GUEST-READY hostname=<hostname> instance-id=<id>
# (or "STRATUS-GUEST-READY hostname=none" when no drive shows up), then runs DHCP
# on every NIC in the background, at boot and on each one plugged in later, and prints
# "STRATUS-GUEST-DHCP <iface> <ip>" for each lease it takes. The first lease's classless
# static routes (option 121, which Stratus's DHCP servers send with the route to
# 169.254.169.254) are installed, and
# the guest then reads its metadata as cloud-init's OpenStack datasource does (GET
# http://169.254.169.254/openstack/latest/meta_data.json, retried while nothing
# answers) and prints what it was told:
#   STRATUS-GUEST-METADATA uuid=<uuid> name=<name> hostname=<hostname>
#   STRATUS-GUEST-METADATA-KEY <keypair name> <public key>   (one line a key)
# or "STRATUS-GUEST-METADATA none" when the service never answered. An ACPI
# power-button press (virsh shutdown, QEMU's system_powerdown) prints
# "STRATUS-GUEST-POWEROFF" and powers the guest off.
# Tests wait for these lines instead of for a full distribution to boot, which
# keeps a VM test to seconds even under TCG.
#
# Everything comes from Debian packages fetched with apt-get download and unpacked
# with dpkg-deb -x: nothing is installed on the host for the guest's sake, so the
# host's own kernel and busybox (if any) don't matter.
set -euo pipefail

usage() { echo "usage: $0 OUTDIR" >&2; exit 2; }
{ [ $# -eq 1 ] && [ -n "$1" ]; } || usage
outdir=$1
self=$(readlink -f "$0")

# One build at a time per OUTDIR (tests running side by side all ask for the guest): the
# others wait here, then find it built.
mkdir -p -- "$outdir"
exec 9>"$outdir/.build.lock"
flock 9

# Idempotent: outputs newer than this script were built by this same recipe.
# Only the output paths go to stdout, so callers can capture them.
if [ -f "$outdir/vmlinuz" ] && [ -f "$outdir/initrd.img" ] && [ -f "$outdir/disk.qcow2" ] \
    && [ "$outdir/vmlinuz" -nt "$self" ] && [ "$outdir/initrd.img" -nt "$self" ]; then
  if [ ! -f "$outdir/SHA256SUMS" ]; then
    (cd "$outdir" && sha256sum vmlinuz initrd.img disk.qcow2 >SHA256SUMS)
  fi
  echo "$outdir/vmlinuz"
  echo "$outdir/initrd.img"
  echo "$outdir/disk.qcow2"
  exit 0
fi

# apt-get is the only thing that needs root; everything else runs as the caller.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}
apt_updated=0
apt_update_once() {
  if [ "$apt_updated" -eq 0 ]; then
    as_root apt-get update -qq
    apt_updated=1
  fi
}

# Host tools beyond Debian's essential set. GNU cpio (not busybox's) because it can
# record every file as root:root (--owner=0:0) when a non-root user builds the image.
packages=(cpio)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "build-guest: installing ${missing[*]}" >&2
  apt_update_once
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# linux-image-cloud-amd64 is only a metapackage; the real kernel (with a versioned
# name like linux-image-6.1.0-NN-cloud-amd64) is its dependency. The cloud flavour
# is used because it is small and has the virtio drivers Stratus guests need.
resolve_kernel_pkg() {
  { apt-cache depends linux-image-cloud-amd64 2>/dev/null || true; } \
    | sed -n 's/^ *Depends: <\{0,1\}\(linux-image-[0-9][^ >]*-cloud-amd64\)>\{0,1\}$/\1/p' \
    | head -n1
}
kernel_pkg=$(resolve_kernel_pkg)
if [ -z "$kernel_pkg" ]; then
  # A fresh machine may have no package lists yet.
  apt_update_once
  kernel_pkg=$(resolve_kernel_pkg)
fi
[ -n "$kernel_pkg" ] || { echo "build-guest: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
kver=${kernel_pkg#linux-image-}

mkdir -p "$work/debs"
download() {
  # As root apt's _apt sandbox user cannot write into our private temp dir; it
  # would fall back to downloading unsandboxed with a warning, so say so upfront.
  local opts=()
  [ "$(id -u)" -ne 0 ] || opts=(-o APT::Sandbox::User=root)
  (cd "$work/debs" && apt-get download -qq "${opts[@]}" "$@")
}
if ! download "$kernel_pkg" busybox-static; then
  # Stale package lists point at versions the mirror no longer has.
  apt_update_once
  download "$kernel_pkg" busybox-static
fi
dpkg-deb -x "$(find "$work/debs" -name "${kernel_pkg}_*.deb" | head -n1)" "$work/kernel"
dpkg-deb -x "$(find "$work/debs" -name 'busybox-static_*.deb' | head -n1)" "$work/busybox"
bb=$work/busybox/bin/busybox
[ -x "$bb" ] || { echo "build-guest: busybox-static has no bin/busybox" >&2; exit 1; }
[ -f "$work/kernel/boot/vmlinuz-$kver" ] || { echo "build-guest: $kernel_pkg has no /boot/vmlinuz-$kver" >&2; exit 1; }
moddir=$work/kernel/lib/modules/$kver

# The .deb ships no modules.dep (the kernel package's postinst runs depmod on
# install), so generate it on the unpacked tree with busybox's depmod.
"$bb" depmod -b "$work/kernel" "$kver"

# Modules /init needs. Debian builds all of these as modules (see
# boot/config-*: CONFIG_VIRTIO_PCI=m, VIRTIO_BLK=m, VIRTIO_NET=m, ISO9660_FS=m,
# ACPI_BUTTON=m, INPUT_EVDEV=m); the serial console, devtmpfs and initramfs gzip
# support are built in. Anything listed in modules.builtin is skipped, so a later
# kernel that builds one in still works.
wanted=(
  virtio_pci  # q35 attaches virtio devices over PCI(e)
  virtio_blk  # the NoCloud drive is a virtio disk
  isofs       # ...holding an ISO9660 filesystem
  virtio_net  # the NIC for DHCP
  button      # turns the ACPI power button (virsh shutdown) into an input event
  evdev       # ...which busybox acpid reads from /dev/input/event*
)
declare -A path_of=() deps_of=() builtin=()
while IFS= read -r line; do
  p=${line%%:*}
  n=${p##*/}; n=${n%%.ko*}; n=${n//-/_}
  path_of[$n]=$p
  deps_of[$p]=${line#*:}
done <"$moddir/modules.dep"
while IFS= read -r p; do
  n=${p##*/}; n=${n%%.ko*}; n=${n//-/_}
  builtin[$n]=1
done <"$moddir/modules.builtin"

# Depth-first so every module comes after its dependencies: /init can then insmod
# the list in order without needing modprobe's dependency handling.
declare -A seen=()
load_order=()
visit() {
  local p=$1 d
  [ -z "${seen[$p]:-}" ] || return 0
  seen[$p]=1
  for d in ${deps_of[$p]:-}; do visit "$d"; done
  load_order+=("$p")
}
for n in "${wanted[@]}"; do
  if [ -n "${path_of[$n]:-}" ]; then
    visit "${path_of[$n]}"
  elif [ -z "${builtin[$n]:-}" ]; then
    echo "build-guest: module $n is neither built in nor in $kernel_pkg" >&2
    exit 1
  fi
done

stage=$work/initramfs
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,root,mnt/cidata,etc/acpi/PWRF,var/log}
cp "$bb" "$stage/bin/busybox"
# Applet symlinks at build time rather than "busybox --install" at boot, because
# the kernel needs /bin/sh already to run /init's #! line.
while IFS= read -r applet; do
  [ "$applet" = bin/busybox ] || ln -sf /bin/busybox "$stage/$applet"
done < <("$bb" --list-full)

# Debian 12 ships uncompressed modules (CONFIG_MODULE_COMPRESS_NONE); other
# kernels may not, so decompress here: busybox insmod then needs no decompressor,
# and the whole image is gzip'd anyway.
: >"$stage/etc/modules.load"
for p in "${load_order[@]}"; do
  src=$moddir/$p
  dst=lib/modules/$kver/${p%.ko*}.ko
  mkdir -p "$stage/${dst%/*}"
  case $p in
    *.ko) cp "$src" "$stage/$dst" ;;
    *.ko.xz) "$bb" xzcat "$src" >"$stage/$dst" ;;
    *.ko.gz) "$bb" zcat "$src" >"$stage/$dst" ;;
    *.ko.zst) zstd -q -d -c "$src" >"$stage/$dst" ;;
    *) echo "build-guest: unknown module format: $p" >&2; exit 1 ;;
  esac
  echo "/$dst" >>"$stage/etc/modules.load"
done

cat >"$stage/init" <<'INIT'
#!/bin/sh
# PID 1 of the Stratus test guest. Must never exit: the kernel panics if it does.
PATH=/sbin:/usr/sbin:/bin:/usr/bin
export PATH

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The kernel's built-in initramfs has /dev/console, so stdio is normally the
# console already; reopen it in case it was not.
[ -t 1 ] || exec </dev/console >/dev/console 2>&1
# Firmware leaves escape codes without a newline on the serial line; start our
# output on a fresh line so every marker begins a line.
echo
ip link set lo up 2>/dev/null

while read -r mod; do
  insmod "$mod" || echo "stratus-init: insmod $mod failed"
done </etc/modules.load

# Power button first, so a shutdown request during the rest of boot still works.
# busybox acpid maps KEY_POWER to /etc/acpi/PWRF/00000080.
if [ -e /dev/input/event0 ]; then
  acpid -c /etc/acpi -l /dev/null -p /run/acpid.pid
fi

# NoCloud: an ISO9660 filesystem labelled cidata. Read the volume descriptor
# directly instead of relying on blkid, which busybox does not have.
find_cidata() {
  for sysdev in /sys/class/block/*; do
    node=/dev/${sysdev##*/}
    [ -b "$node" ] || continue
    [ "$(dd if="$node" bs=1 skip=32769 count=5 2>/dev/null)" = CD001 ] || continue
    label=$(dd if="$node" bs=1 skip=32808 count=32 2>/dev/null | tr -d ' ' | tr A-Z a-z)
    if [ "$label" = cidata ]; then
      echo "$node"
      return 0
    fi
  done
  return 1
}

# Value of a top-level "key: value" line; accepts YAML (quoted or not) and JSON.
md_get() {
  tr -d '\r' <"$2" \
    | sed -n "s/^[[:space:]]*\"\{0,1\}$1\"\{0,1\}[[:space:]]*:[[:space:]]*//p" \
    | head -n1 \
    | sed -e 's/[[:space:]]*,\{0,1\}[[:space:]]*$//' -e 's/^"\(.*\)"$/\1/' -e "s/^'\(.*\)'\$/\1/"
}

# Drivers probe while insmod runs, so the drive is usually there at once; the
# wait covers slow TCG hosts. stratus.cidata_wait=N on the kernel cmdline overrides.
wait_s=5
for arg in $(cat /proc/cmdline); do
  case $arg in stratus.cidata_wait=*) wait_s=${arg#*=} ;; esac
done
cidata=
tries=$((wait_s * 5))
while [ "$tries" -gt 0 ]; do
  cidata=$(find_cidata) && break
  tries=$((tries - 1))
  sleep 0.2
done

hn=none
iid=
if [ -n "$cidata" ] && mount -t iso9660 -o ro "$cidata" /mnt/cidata; then
  md=/mnt/cidata/meta-data
  hn=$(md_get local-hostname "$md" 2>/dev/null)
  iid=$(md_get instance-id "$md" 2>/dev/null)
  # Hostname and id come from the user: keep the marker one parseable line.
  hn=$(printf '%s' "$hn" | tr -cd 'A-Za-z0-9.-' | cut -c1-63)
  iid=$(printf '%s' "$iid" | tr -c 'A-Za-z0-9._:/@+=-' '_')
  [ -n "$hn" ] || hn=localhost
  [ -n "$iid" ] || iid=none
  hostname "$hn"
  keys=$(cat /mnt/cidata/user-data /mnt/cidata/meta-data 2>/dev/null \
    | grep -cE '(ssh-(rsa|dss|ed25519)|ecdsa-sha2-nistp[0-9]+|sk-[a-z0-9-]+@openssh\.com) AAAA')
  printf 'STRATUS-GUEST-KEYS count=%s\n' "$keys"
  printf 'STRATUS-GUEST-READY hostname=%s instance-id=%s\n' "$hn" "$iid"
else
  printf 'STRATUS-GUEST-READY hostname=none\n'
fi

# DHCP after the marker and in the background: a guest without a NIC or without
# a DHCP server must still report ready promptly. Every NIC gets its own udhcpc, at
# boot and whenever one is plugged in (hot-plug); an interface replaced by another of
# the same name (a new ifindex: unplugged and plugged in again) gets a new one.
dhcp_on() {
  ip link set "$1" up 2>/dev/null
  if [ "$hn" = none ]; then
    udhcpc -f -R -i "$1" -O staticroutes -s /etc/udhcpc.script >/dev/null 2>&1 &
  else
    # Send the hostname so the DHCP server can register it in DNS.
    udhcpc -f -R -i "$1" -O staticroutes -s /etc/udhcpc.script -x "hostname:$hn" >/dev/null 2>&1 &
  fi
  echo "$!" >"/run/dhcp.$1.pid"
  echo "$2" >"/run/dhcp.$1.ifindex"
}
watch_nics() {
  while true; do
    for d in /sys/class/net/*; do
      n=${d##*/}
      [ "$n" != lo ] && [ -e "$d/ifindex" ] || continue
      idx=$(cat "$d/ifindex" 2>/dev/null)
      pid=$(cat "/run/dhcp.$n.pid" 2>/dev/null)
      if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
          && [ "$(cat "/run/dhcp.$n.ifindex" 2>/dev/null)" = "$idx" ]; then
        continue
      fi
      [ -z "$pid" ] || kill "$pid" 2>/dev/null
      dhcp_on "$n" "$idx"
    done
    sleep 1
  done
}
watch_nics </dev/null >/dev/null 2>&1 &
echo "$!" >/run/nicwatch.pid

# stratus.shell on the cmdline gives a root shell on the console for debugging.
if grep -qw stratus.shell /proc/cmdline; then
  while true; do setsid cttyhack sh; sleep 1; done
fi
while true; do sleep 3600; done
INIT

cat >"$stage/etc/udhcpc.script" <<'DHCP'
#!/bin/sh
# udhcpc event hook: configure the interface and announce the lease once.
event=$1
case $event in
  deconfig)
    ip -4 addr flush dev "$interface"
    ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" ${broadcast:+broadcast "$broadcast"}
    # Routes and DNS come from the first interface to take a lease: a NIC plugged in
    # later gets its address, not the guest's default route.
    mkdir /run/primary 2>/dev/null && echo "$interface" >/run/primary/iface
    if [ "$(cat /run/primary/iface 2>/dev/null)" != "$interface" ]; then
      :
    elif [ -n "$staticroutes" ]; then
      # RFC 3442: a client given classless static routes ignores the router option;
      # the routes carry the default route themselves. A gateway of 0.0.0.0 is on-link.
      set -- $staticroutes
      while [ $# -ge 2 ]; do
        if [ "$2" = 0.0.0.0 ]; then
          ip route replace "$1" dev "$interface"
        else
          ip route replace "$1" via "$2" dev "$interface"
        fi
        shift 2
      done
    else
      for r in $router; do
        ip route replace default via "$r" dev "$interface"
        break
      done
    fi
    if [ "$(cat /run/primary/iface 2>/dev/null)" = "$interface" ]; then
      : >/etc/resolv.conf
      for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
    fi
    if [ "$event" = bound ]; then
      printf 'STRATUS-GUEST-DHCP %s %s\n' "$interface" "$ip" >/dev/console
      # Once per boot, however often the lease is taken anew.
      if mkdir /run/metadata 2>/dev/null; then
        /etc/metadata.sh </dev/null >/dev/console 2>&1 &
      fi
    fi
    ;;
esac
exit 0
DHCP

cat >"$stage/etc/metadata.sh" <<'META'
#!/bin/sh
# Reads the metadata service once and prints what it says of this guest. busybox's
# wget with a numeric address needs neither DNS nor NSS, which a static build lacks;
# its -T crashes in Debian's static build (a write through a null pointer once
# connected), so the applet timeout bounds each try instead.
url=http://169.254.169.254/openstack/latest/meta_data.json
out=/run/metadata/meta_data.json
tries=90
while ! timeout 10 wget -q -O "$out" "$url" 2>/dev/null; do
  tries=$((tries - 1))
  if [ "$tries" -le 0 ]; then
    echo 'STRATUS-GUEST-METADATA none'
    exit 0
  fi
  sleep 2
done
# A small JSON walk (busybox has no JSON tool): the top-level string members and the
# members of public_keys. Whatever the service sent, each printed value is one line of
# harmless characters.
tr -d '\r' <"$out" | tr '\n' ' ' | awk '
function clean(v) { gsub(/[^A-Za-z0-9+\/=@._: -]/, "_", v); return substr(v, 1, 1024) }
{
  s = $0; n = length(s); depth = 0; key = ""; top = ""
  for (i = 1; i <= n; i++) {
    c = substr(s, i, 1)
    if (c == "\"") {
      v = ""
      for (i++; i <= n; i++) {
        c = substr(s, i, 1)
        if (c == "\\") { i++; v = v substr(s, i, 1); continue }
        if (c == "\"") break
        v = v c
      }
      j = i + 1
      while (j <= n && substr(s, j, 1) == " ") j++
      if (substr(s, j, 1) == ":") {
        key = v
        if (depth == 1) top = v
        i = j
      } else if (depth == 1) {
        md[key] = clean(v)
      } else if (depth == 2 && top == "public_keys") {
        nkeys++
        keys[nkeys] = clean(key) " " clean(v)
      }
    } else if (c == "{" || c == "[") {
      depth++
    } else if (c == "}" || c == "]") {
      depth--
    }
  }
}
END {
  printf "STRATUS-GUEST-METADATA uuid=%s name=%s hostname=%s\n", md["uuid"], md["name"], md["hostname"]
  for (k = 1; k <= nkeys; k++) printf "STRATUS-GUEST-METADATA-KEY %s\n", keys[k]
}'
META

cat >"$stage/etc/acpi/PWRF/00000080" <<'PWR'
#!/bin/sh
# Power button: stop DHCP (releasing the leases), drop the config drive, power off.
# poweroff -f because PID 1 is a plain shell that would ignore busybox poweroff's signal.
echo STRATUS-GUEST-POWEROFF >/dev/console
[ -f /run/nicwatch.pid ] && kill "$(cat /run/nicwatch.pid)" 2>/dev/null
for f in /run/dhcp.*.pid; do
  [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null
done
sleep 0.5
umount /mnt/cidata 2>/dev/null
sync
poweroff -f
PWR
chmod 0755 "$stage/init" "$stage/etc/udhcpc.script" "$stage/etc/metadata.sh" "$stage/etc/acpi/PWRF/00000080"

# newc + gzip is what every kernel can unpack (CONFIG_RD_GZIP=y). Sorted so the
# archive layout does not depend on readdir order; with one fixed time on every file
# and no inode or device numbers (--reproducible), the same packages give the same
# bytes.
find "$stage" -exec touch -h -d @0 {} +
mkdir -p -- "$outdir"
tmp_initrd=$(mktemp "$outdir/.initrd.img.XXXXXX")
tmp_kernel=$(mktemp "$outdir/.vmlinuz.XXXXXX")
trap 'rm -rf "$work"; rm -f "$tmp_initrd" "$tmp_kernel"' EXIT
(cd "$stage" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
  | cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) \
  | gzip -9 -n >"$tmp_initrd"
cp "$work/kernel/boot/vmlinuz-$kver" "$tmp_kernel"
chmod 0644 "$tmp_initrd" "$tmp_kernel"
# Rename into place so a concurrent reader never sees a half-written file.
mv -f "$tmp_kernel" "$outdir/vmlinuz"
mv -f "$tmp_initrd" "$outdir/initrd.img"
# The guest runs from its initramfs; a Server still boots "from an image" (Glance's model:
# a disk image whose kernel_id/ramdisk_id name the kernel and initramfs), so an empty disk
# stands in for the root file system.
if [ ! -f "$outdir/disk.qcow2" ]; then
  qemu-img create -q -f qcow2 "$outdir/disk.qcow2" 64M
fi
(cd "$outdir" && sha256sum vmlinuz initrd.img disk.qcow2 >SHA256SUMS.tmp && mv -f SHA256SUMS.tmp SHA256SUMS)

echo "build-guest: kernel $kver, modules: $(printf '%s ' "${load_order[@]##*/}")" >&2
echo "$outdir/vmlinuz"
echo "$outdir/initrd.img"
echo "$outdir/disk.qcow2"
