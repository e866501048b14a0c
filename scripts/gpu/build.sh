#!/usr/bin/env bash
# Builds, on this (CPU) machine, the GPU binaries that scripts/gpu/run.sh runs on the GPU machine:
# the server and the check and benchmark examples, release, stripped. cudarc loads the CUDA
# libraries at run time, so no CUDA toolkit is needed here.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -p loraplane-server --bin loraplane-server --example gpu_check --example bench_gpu
ls -la target/release/loraplane-server target/release/examples/gpu_check target/release/examples/bench_gpu
