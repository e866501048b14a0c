#!/usr/bin/env python3
"""The default model on the GPU: SmolLM2-135M-Instruct (the GGUF) with the example adapters
(examples/adapters: french, sql, caps) served by the real server binary with --device cpu,
--device cuda --dtype float32, --device cuda (bfloat16) and --dtype float16. Every question of
examples/adapters/reference.json is asked of the base model and of each adapter in ONE mixed
greedy /generate batch, and the output ids are compared with PEFT's (the reference, computed in
float32 with transformers + peft) up to the first step whose reference top-1/top-2 logit margin
is below the mode's bound: 0.01 in float32 (as the CPU test does), 1.0 in bfloat16 and 0.5 in
float16 (half-precision weights and activations move logits by a few tenths on this model).
Standard library only.

usage: scripts/gpu/smollm2_check.py path/to/loraplane-server path/to/SmolLM2-135M-Instruct.Q4_1.gguf [only]
(`only`: run just the modes whose label contains it, e.g. `cpu` on a machine without a GPU)
"""
import json
import os
import sys
import time
import urllib.request

import server_proc

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
ADAPTERS = ["french", "sql", "caps"]


def start(binary, gguf, extra):
    args = [binary, "--model-path", gguf, "--lora-paths"]
    args += [f"{a}={ROOT}/examples/adapters/{a}" for a in ADAPTERS] + ["--max-loras-per-batch", "4"]
    return server_proc.start(args + extra)


def generate(addr, ids, loras):
    body = {"input_ids": ids, "lora_path": loras,
            "sampling_params": {"max_new_tokens": 32, "temperature": 0}}
    req = urllib.request.Request(f"http://{addr}/generate", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return [o["output_ids"] for o in json.loads(r.read())]


def main():
    binary, gguf = sys.argv[1], sys.argv[2]
    ref = json.load(open(os.path.join(ROOT, "examples/adapters/reference.json")))
    ids, loras, want = [], [], []
    for q in ref["questions"]:
        for name in ["__base__"] + ADAPTERS:
            out = q["outputs"][name]
            ids.append(q["prompt_ids"])
            loras.append(None if name == "__base__" else name)
            want.append((name, q["question"], out["ids"], out["margins"]))
    failed = False
    for label, extra, bound in [
        ("cpu float32", ["--device", "cpu"], 0.01),
        ("cuda float32", ["--device", "cuda", "--dtype", "float32"], 0.01),
        ("cuda float32, triton, no graphs", ["--device", "cuda", "--dtype", "float32", "--lora-backend", "triton",
                                             "--disable-cuda-graph"], 0.01),
        ("cuda bfloat16", ["--device", "cuda"], 1.0),
        ("cuda float16", ["--device", "cuda", "--dtype", "float16"], 0.5),
    ]:
        if len(sys.argv) > 3 and sys.argv[3] not in label:
            continue
        proc, addr = start(binary, gguf, extra)
        try:
            t0 = time.time()
            got = generate(addr, ids, loras)
            secs = time.time() - t0
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        compared = same = full = 0
        bad = []
        for out, (name, question, ref_ids, margins) in zip(got, want):
            n = next((i for i, m in enumerate(margins) if m < bound), len(ref_ids))
            n = min(n, len(ref_ids), len(out))
            compared += n
            ok = out[:n] == ref_ids[:n]
            same += ok
            full += out == ref_ids
            if not ok:
                bad.append(f"    {name} on {question!r}: got {out[:n]} want {ref_ids[:n]}")
        ok = not bad
        failed |= not ok
        print(f"{'ok ' if ok else 'FAIL'} {label:32} {same}/{len(got)} sequences match PEFT up to the first margin "
              f"< {bound} ({compared} tokens compared), {full}/{len(got)} identical in full, {secs:.1f} s")
        for b in bad:
            print(b)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
