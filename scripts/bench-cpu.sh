#!/usr/bin/env bash
# CPU benchmark of the engine on the default model: prefill and decode throughput with 0, 1 and
# several distinct rank-16 adapters (all seven targets) in the batch. Prints a Markdown table.
# Usage: scripts/bench-cpu.sh [PROMPT_TOKENS=128] [DECODE_TOKENS=32]
set -euo pipefail
cd "$(dirname "$0")/.."
model=$(scripts/fetch-default-model.sh)
cargo build --release --locked -p loraplane-server --example bench_cpu >&2
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
exec target/release/examples/bench_cpu "$model" "${1:-128}" "${2:-32}"
