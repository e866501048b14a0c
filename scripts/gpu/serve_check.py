#!/usr/bin/env python3
"""The server end to end on the GPU: the tiny fixture model with its four PEFT adapters served
with --device cpu, --device cuda --dtype float32, --device cuda (bfloat16) and --dtype float16,
the same mixed greedy /generate batch (base + every adapter, twice each) sent to each; f32 GPU
output ids must equal the CPU's, half precision is reported. Runs with 2 device slots for 4
adapters exercise slot eviction and reload on the GPU, synchronous and with
--enable-lora-overlap-loading (also with one adapter pinned in 3 slots). Then sampling on the GPU: two identical
requests with temperature 0.8 and seed 7 must return identical text, and a batch mixing greedy,
sampled and repetition-penalised requests (all sampled on the device) must complete, and
greedy requests' top-5 log-probs (returned by the device) must match the CPU's. Last,
--load-format dummy: the same random model from a config alone on the CPU and on the GPU
(f32 continuations identical, with dummy:// adapters), and Llama-3.1-8B from its preset name;
and the KV cache sized from --mem-fraction-static (a prompt longer than 32,768 tokens, the
capacity's change with the fraction, a refusal when nothing is left). Standard library only (runs on the GPU machine as is).

usage: scripts/gpu/serve_check.py [path/to/loraplane-server]
"""
import json
import os
import subprocess
import sys
import urllib.request

import server_proc

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/loraplane-server")
TINY = os.path.join(ROOT, "tests/fixtures/tiny")
ADAPTERS = ["qv_r2", "mlp_r8_rslora", "all_r16", "attn_r4"]
PROMPTS = ["The quick brown fox", "Once upon a time", "A B C D E F", "hello world, this is"]


def start(extra, pin_first=False):
    args = [BIN, "--model-path", f"{TINY}/llama", "--lora-paths"]
    paths = [f"{TINY}/adapters/{a}" for a in ADAPTERS]
    if pin_first:
        paths[0] = json.dumps({"lora_name": ADAPTERS[0], "lora_path": paths[0], "pinned": True})
    return server_proc.start(args + paths + extra, timeout=120)


def post(addr, path, body):
    req = urllib.request.Request(f"http://{addr}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def mixed(addr, key, prompts, names):
    """Greedy output ids of every prompt (`key`: "text" or "input_ids") under the base model and
    every adapter of `names`, in one /generate batch; and each sequence's adapter."""
    items, loras = [], []
    for p in prompts:
        for a in [None] + names:
            items.append(p)
            loras.append(a)
    out = post(addr, "/generate", {
        key: items, "lora_path": loras,
        "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True},
    })
    return [o["output_ids"] for o in out], loras


def batch(addr):
    return mixed(addr, "text", PROMPTS, ADAPTERS)


def run(label, extra, pin_first=False):
    proc, addr = start(extra, pin_first)
    try:
        ids, loras = batch(addr)
        info = json.loads(urllib.request.urlopen(f"http://{addr}/get_server_info", timeout=10).read())
        metrics = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
        def total(prefix):
            return sum(float(l.split()[-1]) for l in metrics.splitlines()
                       if l.startswith(prefix + "{") and 'pool="device"' in l)
        evictions = total("loraplane_lora_adapter_evictions_total")
        loads = total("loraplane_lora_adapter_loads_total")
        print(f"{label:32} device={info.get('device')} dtype={info.get('dtype')} "
              f"overlap={info.get('enable_lora_overlap_loading')} sequences={len(ids)} "
              f"device-slot loads={loads:.0f} evictions={evictions:.0f}")
        return ids, loras
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def sampling(label, extra):
    """Seeded sampling reproduces; greedy, device-sampled and host-sampled requests share a batch."""
    proc, addr = start(extra)
    try:
        seeded = {"text": PROMPTS[0], "sampling_params": {
            "max_new_tokens": 24, "temperature": 0.8, "seed": 7, "ignore_eos": True}}
        a, b = post(addr, "/generate", seeded), post(addr, "/generate", seeded)
        same = a["output_ids"] == b["output_ids"] and a["text"] == b["text"]
        print(f"  {'ok ' if same else 'FAIL'} {label}: temperature 0.8, seed 7 twice: "
              f"{'identical' if same else 'different'} text ({len(a['output_ids'])} tokens)")
        if not same:
            print(f"    first {a['output_ids']}\n    second {b['output_ids']}")
        kinds = [
            ("greedy", {"temperature": 0}),
            ("T=0.8 seed", {"temperature": 0.8, "seed": 11}),
            ("T=1.2 top_k=20 top_p=0.9 min_p=0.05", {"temperature": 1.2, "top_k": 20, "top_p": 0.9, "min_p": 0.05}),
            ("repetition_penalty=1.2", {"temperature": 0.8, "repetition_penalty": 1.2}),
        ]
        texts, loras, params, names = [], [], [], []
        for i, p in enumerate(PROMPTS):
            for j, (name, kind) in enumerate(kinds):
                texts.append(p)
                loras.append(([None] + ADAPTERS)[(i + j) % (len(ADAPTERS) + 1)])
                params.append({"max_new_tokens": 16, "ignore_eos": True, **kind})
                names.append(name)
        out = post(addr, "/generate", {"text": texts, "lora_path": loras, "sampling_params": params})
        done = [len(o["output_ids"]) == 16 and (o["meta_info"].get("finish_reason") or {}).get("type") == "length"
                for o in out]
        ok = same and len(out) == len(texts) and all(done)
        print(f"  {'ok ' if all(done) and len(out) == len(texts) else 'FAIL'} {label}: mixed batch of "
              f"{len(texts)} (greedy, sampled, penalised; base and adapters): {sum(done)} completed")
        for d, n, l, o in zip(done, names, loras, out):
            if not d:
                print(f"    {n} {l or 'base'}: {o.get('meta_info')}")
        return ok
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def top_logprobs(extra):
    """Each output position's top 5 alternatives ((id, log-prob) pairs) for a greedy batch."""
    proc, addr = start(extra)
    try:
        out = post(addr, "/generate", {
            "text": PROMPTS, "lora_path": [None, ADAPTERS[0], ADAPTERS[2], None],
            "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
            "return_logprob": True, "top_logprobs_num": 5,
        })
        return [[[(t[1], t[0]) for t in pos] for pos in o["meta_info"]["output_top_logprobs"]] for o in out]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def dummy_batch(args, names, prompts):
    """Greedy output ids of every prompt under every adapter of `names` (and the base) in one
    /generate batch of token ids, from a server started with `args`."""
    proc, addr = server_proc.start([BIN] + args, timeout=900)
    try:
        return mixed(addr, "input_ids", prompts, names)[0]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def dummy_models():
    """--load-format dummy: the CPU and the GPU make the same random weights from a config
    alone, and dummy:// adapters the same factors, so f32 continuations must be identical; then
    Llama-3.1-8B's shape from its preset name, with dummy adapters, serves a batch of ids."""
    print("--load-format dummy (a config alone, dummy:// adapters)")
    cfg = os.path.join(TINY, "llama", "config.json")
    lora = ["--lora-paths", "d1=dummy://?rank=4", "d2=dummy://?rank=16&targets=q_proj,v_proj,down_proj&seed=3"]
    prompts = [[5, 17, 42, 99, 3, 7], [1, 2, 3], [300, 200, 100, 50]]
    common = ["--model-path", cfg, "--load-format", "dummy", "--skip-tokenizer-init"] + lora
    cpu = dummy_batch(common + ["--device", "cpu"], ["d1", "d2"], prompts)
    gpu = dummy_batch(common + ["--device", "cuda", "--dtype", "float32"], ["d1", "d2"], prompts)
    same = sum(a == b for a, b in zip(gpu, cpu))
    ok = same == len(cpu) and all(len(o) == 12 for o in cpu)
    print(f"  {'ok ' if ok else 'FAIL'} cuda float32 vs cpu, tiny config: {same}/{len(cpu)} continuations identical")
    if not ok:
        for a, b in zip(gpu, cpu):
            print(f"    gpu {a} cpu {b}")
    names = [f"a{i}" for i in range(8)]
    big = dummy_batch(["--model-path", "meta-llama/Llama-3.1-8B-Instruct", "--load-format", "dummy",
                       "--device", "cuda", "--max-lora-rank", "16", "--max-loras-per-batch", "8",
                       "--lora-paths"] + [f"{n}=dummy://?rank=16" for n in names], names,
                      [[128000 + i, 1000 + i, 2000 + i] for i in range(4)])
    big_ok = len(big) == 36 and all(len(o) == 12 and all(0 <= t < 128256 for t in o) for o in big)
    print(f"  {'ok ' if big_ok else 'FAIL'} cuda bfloat16, Llama-3.1-8B preset with 8 dummy rank-16 adapters: "
          f"{sum(len(o) == 12 for o in big)}/36 sequences of 12 tokens")
    return ok and big_ok


def info_of(addr):
    return json.loads(urllib.request.urlopen(f"http://{addr}/get_server_info", timeout=10).read())


def kv_sizing():
    """The KV cache takes what --mem-fraction-static leaves: Llama-3.1-8B's shape gets far more
    than the CPU's 32,768-token default, serves one request longer than that, and the
    capacity moves with the fraction by the bytes it frees; a fraction with no room left is
    refused at start-up with a message."""
    print("KV cache sized from --mem-fraction-static (Llama-3.1-8B preset, 8 rank-16 slots)")
    base = ["--model-path", "Llama-3.1-8B", "--load-format", "dummy", "--device", "cuda",
            "--enable-lora", "--max-lora-rank", "16", "--max-loras-per-batch", "8"]
    tokens, ok = {}, True
    for fraction in ["0.87", "0.6"]:
        args = base if fraction == "0.87" else base + ["--mem-fraction-static", fraction]
        proc, addr = server_proc.start([BIN] + args, timeout=900)
        try:
            info = info_of(addr)
            tokens[fraction] = info["max_total_tokens"]
            line = f"--mem-fraction-static {info.get('mem_fraction_static')}: {tokens[fraction]} tokens, " \
                   f"context length {info['context_length']}"
            if fraction == "0.87":
                # 40,000 prompt ids and 4 new tokens: more than the old fixed cache allowed.
                out = post(addr, "/generate", {
                    "input_ids": [(7 * i) % 128000 + 1 for i in range(40000)],
                    "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}})
                long_ok = len(out.get("output_ids", [])) == 4 and out["meta_info"]["prompt_tokens"] == 40000
                good = tokens[fraction] > 100000 and info["context_length"] == 131072 and long_ok
                line += f"; a 40,000-token prompt served: {long_ok}"
            else:
                # 0.27 of the GPU at 128 KB a token (32 layers, keys and values of 1,024 bf16).
                total = int(os.popen("nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits")
                            .read().split()[0]) * 2**20
                want = 0.27 * total / (32 * 2 * 1024 * 2)
                moved = tokens["0.87"] - tokens[fraction]
                good = abs(moved - want) <= 0.02 * want
                line += f"; {moved} fewer than at 0.87, expected {want:.0f} (+-2%)"
            ok &= good
            print(f"  {'ok ' if good else 'FAIL'} {line}")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    refused = subprocess.run([BIN] + base + ["--mem-fraction-static", "0.15", "--port", "0"],
                             capture_output=True, text=True, timeout=240)
    good = refused.returncode != 0 and "no room for the KV cache" in refused.stderr
    ok &= good
    print(f"  {'ok ' if good else 'FAIL'} --mem-fraction-static 0.15 (less than the weights): exit "
          f"{refused.returncode}, {refused.stderr.strip().splitlines()[-1] if refused.stderr.strip() else ''}")
    return ok


def main():
    cpu, loras = run("cpu float32", ["--device", "cpu"])
    failed = False
    f32 = ["--device", "cuda", "--dtype", "float32"]
    overlap = ["--enable-lora-overlap-loading"]
    for label, extra, exact, pin_first in [
        ("cuda float32", f32, True, False),
        ("cuda float32, 2 slots (eviction)", f32 + ["--max-loras-per-batch", "2"], True, False),
        ("cuda float32, 2 slots, overlap loading", f32 + ["--max-loras-per-batch", "2"] + overlap, True, False),
        ("cuda float32, 3 slots, 1 pinned, overlap", f32 + ["--max-loras-per-batch", "3"] + overlap, True, True),
        ("cuda bfloat16, 2 slots, overlap loading", ["--device", "cuda", "--max-loras-per-batch", "2"] + overlap,
         False, False),
        ("cuda float32, triton, no graphs", ["--device", "cuda", "--dtype", "float32", "--lora-backend", "triton",
                                              "--disable-cuda-graph"], True, False),
        ("cuda bfloat16", ["--device", "cuda"], False, False),
        ("cuda float16", ["--device", "cuda", "--dtype", "float16"], False, False),
    ]:
        ids, _ = run(label, extra, pin_first)
        same = sum(a == b for a, b in zip(ids, cpu))
        first_tok = sum(a[:1] == b[:1] for a, b in zip(ids, cpu))
        ok = same == len(cpu) if exact else True
        failed |= not ok
        print(f"  {'ok ' if ok else 'FAIL'} {same}/{len(cpu)} continuations identical to the CPU's, "
              f"{first_tok}/{len(cpu)} first tokens")
        if not ok:
            for a, b, l in zip(ids, cpu, loras):
                if a != b:
                    print(f"    {l or 'base'}: gpu {a} cpu {b}")
    failed |= not dummy_models()
    failed |= not kv_sizing()
    print("top log-probs (returned by the device on the GPU)")
    want = top_logprobs(["--device", "cpu"])
    got = top_logprobs(f32)
    ids_equal = all([i for i, _ in a] == [i for i, _ in b] for x, y in zip(got, want) for a, b in zip(x, y))
    # An aborted request returns no positions; that is a failure, not an empty comparison.
    complete = len(got) == len(want) and all(len(x) == len(y) == 6 for x, y in zip(got, want))
    worst = max((abs(lp - lq) for x, y in zip(got, want) for a, b in zip(x, y) for (_, lp), (_, lq) in zip(a, b)),
                default=float("inf"))
    ok = complete and ids_equal and worst <= 1e-4
    failed |= not ok
    print(f"  {'ok ' if ok else 'FAIL'} cuda float32: top-5 ids equal to the CPU's at every position: {ids_equal}, "
          f"largest log-prob difference {worst:.1e} (<= 1e-4), all 6 positions returned: {complete}")
    print("sampling on the GPU")
    for label, extra in [("cuda bfloat16", ["--device", "cuda"]),
                         ("cuda float32", ["--device", "cuda", "--dtype", "float32"])]:
        failed |= not sampling(label, extra)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
