#!/usr/bin/env bash
# Carries the default model (98 MB) to the GPU machine, whose device calls upload at most 64 MiB
# each: split it here, then stash one part per back-to-back call there, then join.
#   here:  scripts/gpu/model-parts.sh split      -> target/gpu-upload/smollm2.part00, 01, 02
#   there: scripts/gpu/model-parts.sh stash      (one call per part, carrying that part)
#   there: scripts/gpu/model-parts.sh join       -> models/SmolLM2-135M-Instruct.Q4_1.gguf (checked)
# The GPU machine keeps /tmp while it stays warm (about 30 s between calls).
set -euo pipefail
cd "$(dirname "$0")/../.."
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha=$(sed -n 's/^SHA256="\(.*\)"$/\1/p' scripts/fetch-default-model.sh)
stash=/tmp/loraplane-model-parts
case ${1:-} in
  split)
    model=$(scripts/fetch-default-model.sh)
    rm -rf target/gpu-upload && mkdir -p target/gpu-upload
    split -b 32M -d "$model" target/gpu-upload/smollm2.part
    ls -l target/gpu-upload ;;
  stash)
    mkdir -p "$stash" && cp target/gpu-upload/smollm2.part* "$stash"/
    ls -l "$stash" ;;
  join)
    mkdir -p models "$stash"
    cp target/gpu-upload/smollm2.part* "$stash"/ 2>/dev/null || true
    cat "$stash"/smollm2.part* >"models/$name"
    echo "$sha  models/$name" | sha256sum -c - ;;
  *) echo "usage: $0 split|stash|join" >&2; exit 2 ;;
esac
