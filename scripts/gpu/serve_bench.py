#!/usr/bin/env python3
"""The server binary under load on the GPU: Llama-3.1-8B's shape from the preset name
(--load-format dummy, no files) with 64 dummy rank-16 adapters on all seven targets
(dummy://), driven over HTTP by concurrent clients on 127.0.0.1.

Each configuration (1 to 256 clients) sends CLIENTS requests at once (one /generate each: a
128-token prompt of random ids, greedy, ignore_eos, NEW output tokens) and times them to the
last answer. Output tok/s is every generated token over that wall time, so it includes the
prefill of all prompts, the scheduler, sampling and HTTP; compare it with bench_gpu's decode
steps (engine only). The KV cache is sized from the GPU's memory (--mem-fraction-static's
default); the run prints its capacity and, at the end, how many requests were preempted. The
number of requests and tokens is fixed, so the run is bounded. Standard library only.

usage: scripts/gpu/serve_bench.py [path/to/loraplane-server]
"""
import json
import os
import random
import sys
import threading
import time
import urllib.request

import server_proc

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/loraplane-server")
ADAPTERS = 64
PROMPT = 128
NEW = int(os.environ.get("LORAPLANE_SERVE_BENCH_NEW", "256"))
# Extra server flags, e.g. "--disable-overlap-schedule" to time steps run one at a time.
EXTRA = os.environ.get("LORAPLANE_SERVE_EXTRA", "").split()


def post(addr, body):
    req = urllib.request.Request(f"http://{addr}/generate", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def step_totals(addr):
    """(forward steps so far, seconds inside them) from the server's step histogram."""
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
    got = {}
    for line in text.splitlines():
        for key in ("loraplane_forward_step_seconds_sum", "loraplane_forward_step_seconds_count"):
            if line.startswith(key + " "):
                got[key] = float(line.split()[-1])
    return got["loraplane_forward_step_seconds_count"], got["loraplane_forward_step_seconds_sum"]


def burst(addr, clients, adapter_of, new, seed):
    """`clients` requests at once; returns (wall seconds, generated tokens, mean e2e latency)."""
    rng = random.Random(seed)
    bodies = [{
        "input_ids": [rng.randrange(1, 128000) for _ in range(PROMPT)],
        "lora_path": adapter_of(i),
        "sampling_params": {"max_new_tokens": new, "temperature": 0, "ignore_eos": True},
    } for i in range(clients)]
    outs, errors = [None] * clients, []
    start = threading.Barrier(clients + 1)

    def client(i):
        start.wait()
        try:
            outs[i] = post(addr, bodies[i])
        except Exception as e:  # reported below, never swallowed
            errors.append(f"request {i}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.time()
    for t in threads:
        t.join()
    wall = time.time() - t0
    if errors:
        raise SystemExit("\n".join(errors[:5]))
    tokens = sum(len(o["output_ids"]) for o in outs)
    if tokens != clients * new:
        raise SystemExit(f"expected {clients * new} tokens, got {tokens}")
    latency = sum(o["meta_info"]["e2e_latency"] for o in outs) / clients
    return wall, tokens, latency


def main():
    names = [f"a{i}" for i in range(ADAPTERS)]
    args = [BIN, "--model-path", "Llama-3.1-8B", "--load-format", "dummy", "--device", "cuda",
            "--max-lora-rank", "16", "--max-loras-per-batch", str(ADAPTERS), "--max-running-requests", "256",
            "--lora-paths"] + [f"{n}=dummy://?rank=16" for n in names] + EXTRA
    t0 = time.time()
    proc, addr = server_proc.start(args, timeout=900)
    try:
        info = json.loads(urllib.request.urlopen(f"http://{addr}/get_server_info", timeout=10).read())
        print(f"server up in {time.time() - t0:.0f} s: {info.get('device')} {info.get('dtype')}, "
              f"lora backend {info.get('lora_backend')}, {ADAPTERS} dummy rank-16 adapters, "
              f"cuda graphs up to batch {info.get('cuda_graph_max_bs')}, overlap schedule "
              f"{'off' if info.get('disable_overlap_schedule') else 'on'}; KV cache {info.get('max_total_tokens')} "
              f"tokens (--mem-fraction-static {info.get('mem_fraction_static')}), context length "
              f"{info.get('context_length')}")
        # Warm-up: every adapter into its slot, graphs captured.
        burst(addr, 64, lambda i: names[i], 8, 0)
        configs = [
            ("64 clients, base model", 64, lambda i: None),
            ("64 clients, 1 adapter", 64, lambda i: names[0]),
            ("64 clients, 8 distinct adapters", 64, lambda i: names[i % 8]),
            ("64 clients, 64 distinct adapters", 64, lambda i: names[i]),
            ("8 clients, 8 distinct adapters", 8, lambda i: names[i]),
            ("1 client, 1 adapter", 1, lambda i: names[0]),
            ("256 clients, base model", 256, lambda i: None),
            ("256 clients, 1 adapter", 256, lambda i: names[0]),
            ("256 clients, 64 distinct adapters", 256, lambda i: names[i % ADAPTERS]),
        ]
        rows = []
        for label, clients, adapter_of in configs:
            for r in range(2):
                steps0, inside0 = step_totals(addr)
                wall, tokens, latency = burst(addr, clients, adapter_of, NEW, 1 + r)
                steps1, inside1 = step_totals(addr)
                steps, inside = steps1 - steps0, inside1 - inside0
                rows.append((label, r + 1, clients, wall, tokens, latency))
                # The engine thread's time between forward passes (scheduling, token events) is
                # the wall time per step that the forward passes do not account for.
                print(f"{label} (round {r + 1}): {tokens} tokens in {wall:.2f} s = {tokens / wall:.0f} tok/s, "
                      f"mean request latency {latency:.2f} s; {steps:.0f} forward passes, "
                      f"{inside / steps * 1e3:.2f} ms each, {(wall - inside) / steps * 1e3:.2f} ms between",
                      flush=True)
        print(f"\n| configuration ({PROMPT}-token prompts, {NEW} new tokens each) | round | output tok/s "
              f"| wall s | ms per output token of one request |\n|---|---|---|---|---|")
        for label, r, clients, wall, tokens, latency in rows:
            print(f"| {label} | {r} | {tokens / wall:.0f} | {wall:.2f} | {latency / NEW * 1e3:.2f} |")
        metrics = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
        for line in metrics.splitlines():
            if line.startswith(("loraplane_requests_preempted_total", "loraplane_kv_cache_capacity_tokens")):
                print(line)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
