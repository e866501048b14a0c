#!/usr/bin/env bash
# Client compatibility tests: the official `openai` Python client and SGLang's documented
# `requests` flows against a loraplane-server on 127.0.0.1 (a free port) serving the tiny
# fixture model with its four adapters, and a bounded, seeded fuzz of its HTTP API. Installs openai, requests and pytest into a venv under
# the cargo target directory, builds the server (unless LORAPLANE_SERVER_BIN names one), runs
# pytest, stops the server.
#
#   tests/python/run.sh [--release] [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/../.."

target=${CARGO_TARGET_DIR:-target}
# LORAPLANE_SERVER_BIN names a server binary that is already built: scripts/test.sh passes the
# one `cargo test --workspace` just made. Building here with `-p loraplane-server` would resolve
# features for the server alone and so recompile every dependency, doubling the disk CI needs.
bin=${LORAPLANE_SERVER_BIN:-}
cargo_flags=(--locked -p loraplane-server --profile test)
profile=debug
if [[ "${1:-}" == "--release" ]]; then
  profile=release
  cargo_flags=(--locked -p loraplane-server --release)
  bin=
  shift
fi
venv=$target/pyenv
if [[ ! -x $venv/bin/python ]]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "openai>=1.40" requests pytest
if [[ -z $bin ]]; then
  cargo build "${cargo_flags[@]}" >&2
  bin=$target/$profile/loraplane-server
fi
if [[ ! -x $bin ]]; then
  echo "tests/python/run.sh: no server binary at $bin" >&2
  exit 1
fi

fixtures=tests/fixtures/tiny
logs=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$logs"' EXIT

# Starts the server with the given arguments on a free port (port 0; it logs the address it
# bound) and sets $addr.
start() {
  local log=$logs/$1.log
  shift
  RUST_LOG=info "$bin" --host 127.0.0.1 --port 0 "$@" 2>"$log" &
  pids+=($!)
  addr=
  for _ in $(seq 1 600); do
    addr=$(grep -o 'serving on http://[0-9.:]*' "$log" | head -n 1 | sed 's|serving on http://||' || true)
    [[ -n $addr ]] && return 0
    if ! kill -0 "${pids[-1]}" 2>/dev/null; then
      cat "$log" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "loraplane-server did not start within 60 s" >&2
  cat "$log" >&2
  exit 1
}

# The tiny fixture model with its four adapters: exact comparisons.
start tiny --model-path "$fixtures/llama" \
  --lora-paths "$fixtures/adapters/qv_r2" "$fixtures/adapters/mlp_r8_rslora" \
  "$fixtures/adapters/all_r16" "$fixtures/adapters/attn_r4" --max-loras-per-batch 4
tiny=$addr

# The default model with the example adapters: the documented flows as a user runs them.
model=$(scripts/fetch-default-model.sh)
start default --model-path "$model" --max-loras-per-batch 4 \
  --lora-paths french=examples/adapters/french sql=examples/adapters/sql caps=examples/adapters/caps
default=$addr

LORAPLANE_URL="http://$tiny" LORAPLANE_ADAPTERS="$PWD/$fixtures/adapters" LORAPLANE_MODEL=llama \
  LORAPLANE_DEFAULT_URL="http://$default" LORAPLANE_DEFAULT_MODEL="$(basename "$model" .gguf)" \
  LORAPLANE_EXAMPLES="examples/adapters" \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/python "$@"
