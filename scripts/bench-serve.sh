#!/usr/bin/env bash
# Serving benchmark on this machine (loopback only, bounded): the default model with 8 random
# rank-16 adapters on all seven targets, --max-loras-per-batch 4, and 1/4/16/64 concurrent
# streaming clients, each sending REQUESTS_PER_CLIENT requests of MAX_NEW tokens.
# Usage: scripts/bench-serve.sh [LEVELS=1,4,16,64] [REQUESTS_PER_CLIENT=4] [MAX_NEW=32]
set -euo pipefail
cd "$(dirname "$0")/.."
model=$(scripts/fetch-default-model.sh)
cargo build --release --locked -p loraplane-server --bin loraplane-server --example loadgen >&2
work=$(mktemp -d)
trap 'kill "${server:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
target/release/examples/loadgen dummy-adapters "$model" "$work" 8 16 >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
names=(); paths=()
for i in $(seq 0 7); do names+=("dummy$i"); paths+=("dummy$i=$work/dummy$i"); done
target/release/loraplane-server --model-path "$model" --host 127.0.0.1 --port "$port" \
  --lora-paths "${paths[@]}" --max-loras-per-batch 4 --max-running-requests 64 >"$work/server.log" 2>&1 &
server=$!
for _ in $(seq 1 240); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 0.5
done
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "model: $(basename "$model"), 8 adapters (rank 16, all 7 targets), --max-loras-per-batch 4"
(IFS=,; target/release/examples/loadgen run "http://127.0.0.1:$port" "${names[*]}" "${1:-1,4,16,64}" "${2:-4}" "${3:-32}")
curl -s "http://127.0.0.1:$port/metrics" | grep -E '^loraplane_lora_(adapter_evictions|slot_(hits|misses))' || true
