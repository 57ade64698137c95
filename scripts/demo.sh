#!/usr/bin/env bash
# Sets up and runs a whole single-node Stratus cloud with the examples applied.
# Stop it with Ctrl-C; run it again to get the same cloud back (state lives in .stratus/).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked -p stratus
data="${STRATUS_DATA_DIR:-.stratus}"
./target/release/stratus up --data-dir "$data" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; wait $pid || true' INT TERM EXIT
export KUBECONFIG="$data/kubeconfig"
for _ in $(seq 1 100); do
  [ -f "$KUBECONFIG" ] && kubectl get --raw /readyz >/dev/null 2>&1 && break
  sleep 0.2
done
kubectl apply -f examples/
kubectl get stratus -A
echo
echo "Stratus is running. In another shell:  export KUBECONFIG=$PWD/$data/kubeconfig"
echo "Stop it with Ctrl-C."
wait $pid
