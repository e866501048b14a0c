#!/usr/bin/env bash
# Runs loraplane's whole test suite on a CPU-only machine (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-default-model.sh >/dev/null
cargo test --workspace --locked
tests/python/run.sh
