#!/usr/bin/env bash
# Starts this host's libvirtd (and virtlogd) for `stratus up --compute qemu:///system`, unless
# one already answers. Debian 12 has no modular daemons; in a container without systemd they
# are started by hand. QEMU runs as root so it can read the guests' disks wherever the
# data directory is.
set -euo pipefail
if virsh -c qemu:///system version >/dev/null 2>&1; then
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if ! grep -q '^user = "root"' /etc/libvirt/qemu.conf; then
  printf '\n# Added by Stratus scripts/libvirtd.sh\nuser = "root"\ngroup = "root"\n' \
    | $sudo tee -a /etc/libvirt/qemu.conf >/dev/null
fi
$sudo mkdir -p /var/log/libvirt/qemu /run/libvirt
pgrep -x virtlogd >/dev/null || $sudo virtlogd -d
pgrep -x libvirtd >/dev/null || $sudo libvirtd -d
for _ in $(seq 1 50); do
  virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
  sleep 0.2
done
echo "libvirtd did not come up" >&2
exit 1
