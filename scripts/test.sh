#!/usr/bin/env bash
# Runs the whole Stratus test suite: formatting, lints, unit, integration and end-to-end tests
# (real etcd, the real stratus binary, real kubectl and client libraries).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The storage and object-store tests write real volumes and Swift objects to this disk (Swift
# refuses writes below 1% free): say what it had, so that a failure for want of space is seen
# as one.
disk() { df -h --output=avail,pcent,target / "${TMPDIR:-/tmp}" "$PWD" | sed "s/^/[disk $1] /"; }
disk start
trap 'disk end' EXIT
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests run the real stratus binary: build it first (cargo test alone builds
# only test targets).
cargo build --workspace --bins --locked
disk built
cargo test --workspace --locked --no-fail-fast
