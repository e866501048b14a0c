#!/usr/bin/env bash
# Builds bench_gpu at another git revision as target/release/examples/bench_gpu_base, for
# same-call A/B timings on the GPU machine (timings from different calls differ by up to
# 0.3 ms per step). Then build this tree as usual and carry both binaries:
#   scripts/gpu/build-baseline.sh 585e2bf && scripts/gpu/build.sh
#   (on the GPU machine) scripts/gpu/run.sh attention   # runs bench_gpu_base first when present
set -euo pipefail
cd "$(dirname "$0")/../.."
rev=${1:?usage: scripts/gpu/build-baseline.sh <git revision>}
root=$PWD
tmp=$(mktemp -d)
git worktree add -q --detach "$tmp/baseline" "$rev"
trap 'git worktree remove --force "$tmp/baseline"; rm -rf "$tmp"' EXIT
(cd "$tmp/baseline" && CARGO_TARGET_DIR="$root/target" cargo build --release --locked -p loraplane-server --example bench_gpu)
cp target/release/examples/bench_gpu target/release/examples/bench_gpu_base
# The baseline's kernel sources are embedded in what was just built: make the next build of
# this tree compile its own again.
touch kernels/src/*.cu kernels/src/lib.rs
echo "target/release/examples/bench_gpu_base: bench_gpu at $(git rev-parse --short "$rev")"
