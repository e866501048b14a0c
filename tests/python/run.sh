#!/usr/bin/env bash
# Client compatibility tests: the official `openai` Python client and SGLang's documented
# `requests` flows against a loraplane-server on 127.0.0.1 (a free port) serving the tiny
# fixture model with its four adapters. Installs openai, requests and pytest into a venv under
# the cargo target directory, builds the server, runs pytest, stops the server.
#
#   tests/python/run.sh [--release] [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/../.."

profile=debug
cargo_flags=(--locked -p loraplane-server)
if [[ "${1:-}" == "--release" ]]; then
  profile=release
  cargo_flags+=(--release)
  shift
fi
target=${CARGO_TARGET_DIR:-target}
venv=$target/pyenv
if [[ ! -x $venv/bin/python ]]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "openai>=1.40" requests pytest
cargo build "${cargo_flags[@]}" >&2
bin=$target/$profile/loraplane-server

fixtures=tests/fixtures/tiny
log=$(mktemp)
RUST_LOG=info "$bin" --model-path "$fixtures/llama" --host 127.0.0.1 --port 0 \
  --lora-paths "$fixtures/adapters/qv_r2" "$fixtures/adapters/mlp_r8_rslora" \
  "$fixtures/adapters/all_r16" "$fixtures/adapters/attn_r4" \
  --max-loras-per-batch 4 2>"$log" &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -f "$log"' EXIT

# The server logs the address it bound (port 0 picks a free one).
addr=
for _ in $(seq 1 600); do
  addr=$(grep -o 'serving on http://[0-9.:]*' "$log" | head -n 1 | sed 's|serving on http://||' || true)
  [[ -n $addr ]] && break
  if ! kill -0 "$server" 2>/dev/null; then
    cat "$log" >&2
    exit 1
  fi
  sleep 0.1
done
if [[ -z $addr ]]; then
  echo "loraplane-server did not start within 60 s" >&2
  cat "$log" >&2
  exit 1
fi

LORAPLANE_URL="http://$addr" LORAPLANE_ADAPTERS="$PWD/$fixtures/adapters" LORAPLANE_MODEL=llama \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/python "$@"
