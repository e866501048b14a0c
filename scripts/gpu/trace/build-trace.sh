#!/usr/bin/env bash
# Builds scripts/gpu/trace/libkernel_trace.so here (for `run.sh timeline` on the GPU machine):
# CUPTI's headers and library from the nvidia-cuda-cupti wheel (13.0, the GPU machine's driver
# generation), the CUDA headers from the nvidia-cuda-runtime and nvidia-cuda-crt wheels. Carry
# both .so files (run.sh timeline names them).
set -euo pipefail
cd "$(dirname "$0")"
w=${TMPDIR:-/tmp}/loraplane-cupti
if [[ ! -f $w/nvidia/cu13/lib/libcupti.so.13 ]]; then
  mkdir -p "$w"
  pip download -q --no-deps -d "$w" "nvidia-cuda-cupti==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*"
  for whl in "$w"/*.whl; do python3 -m zipfile -e "$whl" "$w"; done
fi
inc=$w/nvidia/cu13
gcc -O2 -Wall -shared -fPIC -I"$inc/include" kernel_trace.c -L"$inc/lib" -l:libcupti.so.13 \
  -Wl,-rpath,'$ORIGIN' -o libkernel_trace.so
cp "$inc/lib/libcupti.so.13" .
ls -la libkernel_trace.so libcupti.so.13
