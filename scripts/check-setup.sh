#!/usr/bin/env bash
# Checks that scripts/setup.sh repairs a machine it has set up before: each package named
# below is removed (as apt removes one to satisfy another), setup runs again, and every
# program must be back. It changes the machine's packages, so only CI (CI=true) or someone
# who asks for it (STRATUS_CHECK_SETUP=1) runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${CI:-}" != "true" ] && [ "${STRATUS_CHECK_SETUP:-}" != "1" ]; then
  echo "check-setup: skipped (it removes packages; set STRATUS_CHECK_SETUP=1 to run it here)"
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
# ovs-vswitchd is in sbin.
export PATH="$PATH:/usr/sbin:/sbin"
scripts/setup.sh
# qemu-utils: the package apt removed on a fresh machine; genisoimage, cpio and
# chromium-driver (the dashboard's browser test), openvswitch-switch (the OVS datapath's
# tests), swift-object (the object agent's), swift-proxy and python3-swiftclient (the object
# proxy's): programs that nothing else depends on.
for victim in qemu-utils:qemu-img genisoimage:genisoimage cpio:cpio chromium-driver:chromedriver \
  openvswitch-switch:ovs-vswitchd swift-object:swift-object-server swift-proxy:swift-proxy-server \
  python3-swiftclient:swift; do
  pkg=${victim%%:*} prog=${victim#*:}
  $sudo dpkg --remove --force-depends "$pkg" >/dev/null 2>&1
  if command -v "$prog" >/dev/null 2>&1; then
    echo "check-setup: removing $pkg did not remove $prog; the check proves nothing" >&2
    exit 1
  fi
  scripts/setup.sh >/dev/null
  if ! command -v "$prog" >/dev/null 2>&1; then
    echo "check-setup: setup.sh did not restore $prog ($pkg)" >&2
    exit 1
  fi
  echo "check-setup: $pkg removed; setup.sh restored $prog"
done
echo "check-setup: setup.sh restored each removed package"
