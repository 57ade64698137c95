#!/usr/bin/env bash
# Sets up and runs a whole single-node Stratus cloud with the examples applied, including a
# real (TCG) guest booted by this host's compute agent.
# Stop it with Ctrl-C; run it again to get the same cloud back (state lives in .stratus/).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked -p stratus
scripts/build-guest.sh target/stratus-guest >/dev/null
scripts/libvirtd.sh
data="${STRATUS_DATA_DIR:-.stratus}"
# The test guest's files, for examples/tiny-guest.yaml's Images.
python3 -m http.server --bind 127.0.0.1 8099 --directory target/stratus-guest >/dev/null 2>&1 &
files=$!
# The guest's own file server is the one loopback host image URLs may name here.
./target/release/stratus up --data-dir "$data" --compute qemu:///system \
  --image-url-allow-hosts 127.0.0.1:8099 &
pid=$!
trap 'kill -TERM $pid $files 2>/dev/null || true; wait $pid || true' INT TERM EXIT
export KUBECONFIG="$data/kubeconfig"
for _ in $(seq 1 100); do
  [ -f "$KUBECONFIG" ] && kubectl get --raw /readyz >/dev/null 2>&1 && break
  sleep 0.2
done
kubectl apply -f examples/
kubectl -n demo wait server/tiny-1 --for=jsonpath='{.status.phase}'=Running --timeout=180s
# Its console, up to the address it took by DHCP on the example network.
./target/release/stratus console -n demo tiny-1 --wait-for STRATUS-GUEST-DHCP
kubectl -n demo get server tiny-1 -o wide
kubectl get stratus -A
echo
echo "Stratus is running. In another shell:  export KUBECONFIG=$PWD/$data/kubeconfig"
echo "Stop it with Ctrl-C."
wait $pid
