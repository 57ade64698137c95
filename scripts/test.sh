#!/usr/bin/env bash
# Runs the whole Stratus test suite: formatting, lints, unit, integration and end-to-end tests
# (real etcd, the real stratus binary, real kubectl and client libraries).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests run the real stratus binary: build it first (cargo test alone builds
# only test targets).
cargo build --workspace --bins --locked
cargo test --workspace --locked --no-fail-fast
