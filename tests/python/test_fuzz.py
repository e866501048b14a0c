"""Seeded fuzzing of the HTTP API: random and malformed bodies for /generate, the OpenAI
endpoints and adapter loading must get a 2xx or a 4xx whose body is JSON, never a 5xx or a
dropped connection, and the server must keep serving with its adapters unchanged.

Bounded: a fixed number of requests (some from four threads at once) and a wall-clock cap,
against the server tests/python/run.sh starts on 127.0.0.1.
"""

import json
import os
import random
import threading
import time

import requests

URL = os.environ.get("LORAPLANE_URL", "http://127.0.0.1:30000")
REQUESTS = 1200
THREADS = 4
SECONDS = 90

# Values every field may get: wrong types, extremes, odd strings and nested shapes.
VALUES = [
    None, True, False, 0, -1, 1, 2, 2**31, 2**63, -(2**63), 1e308, -1e308, 0.5, 1.5, -0.0, 1e-300,
    "", "x", "qv_r2", "llama:qv_r2", "llama:nope", "../../etc/passwd", "\u0000", "é🙂", "a" * 5000,
    [], [1], ["a"], [None], [[1, 2]], [-5], [2**40], ["qv_r2", None], {}, {"a": 1},
]
FIELDS = {
    "/generate": ["text", "input_ids", "lora_path", "sampling_params", "stream", "return_logprob",
                  "top_logprobs_num", "logprob_start_len", "rid"],
    "/v1/completions": ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream",
                        "logprobs", "echo", "stop", "seed", "frequency_penalty", "presence_penalty"],
    "/v1/chat/completions": ["model", "messages", "max_tokens", "temperature", "top_p", "n",
                             "stream", "logprobs", "top_logprobs", "stop", "seed"],
    # Names and paths that exist nowhere: loading fails, unloading finds nothing.
    "/load_lora_adapter": ["lora_name", "lora_path", "pinned"],
    "/unload_lora_adapter": ["lora_name"],
}
SAMPLING = ["max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids",
            "repetition_penalty", "frequency_penalty", "presence_penalty", "ignore_eos", "n",
            "min_new_tokens"]


def value(rng, depth=0):
    r = rng.random()
    if depth < 2 and r < 0.1:
        return {rng.choice(SAMPLING): value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    if depth < 2 and r < 0.15:
        return [{"role": rng.choice(["user", "system", "assistant", "x", 5]), "content": value(rng, depth + 1)}
                for _ in range(rng.randint(0, 3))]
    return rng.choice(VALUES)


def template(rng, path):
    """A valid body for `path` (load/unload name nothing that exists)."""
    if path == "/generate":
        return {"text": "Hello", "lora_path": rng.choice([None, "qv_r2", "all_r16"]),
                "sampling_params": {"max_new_tokens": 2, "temperature": rng.choice([0, 0.8])}}
    if path == "/v1/completions":
        return {"model": rng.choice(["llama", "llama:qv_r2", "attn_r4"]), "prompt": "Hello", "max_tokens": 2}
    if path == "/v1/chat/completions":
        return {"model": "llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    if path == "/load_lora_adapter":
        return {"lora_name": "fuzz", "lora_path": "/nonexistent/adapter"}
    return {"lora_name": "not_loaded"}


def body(rng):
    """Half the time a valid body with up to two fields (or sampling settings) made odd, else
    random fields; one in twenty is not JSON at all."""
    path = rng.choice(list(FIELDS))
    fields = FIELDS[path]
    if rng.random() < 0.5:
        b = template(rng, path)
        for _ in range(rng.randint(0, 2)):
            if path == "/generate" and rng.random() < 0.5:
                b["sampling_params"][rng.choice(SAMPLING)] = value(rng, 2)
            else:
                b[rng.choice(fields)] = value(rng)
    else:
        b = {k: value(rng) for k in rng.sample(fields, rng.randint(0, len(fields)))}
        # Keep random generations short: the point is the input handling.
        if isinstance(b.get("sampling_params"), dict):
            b["sampling_params"]["max_new_tokens"] = rng.choice([1, 2])
        if path.startswith("/v1"):
            b["max_tokens"] = rng.choice([1, 2])
    if b.get("lora_name") == "qv_r2":
        b["lora_name"] = "not_loaded"  # the served adapters stay as they are
    if rng.random() < 0.05:
        return path, b"{not json"
    return path, json.dumps(b).encode()


def run(seed, count, deadline, failures):
    rng = random.Random(seed)
    for _ in range(count):
        if time.monotonic() > deadline:
            return
        path, data = body(rng)
        try:
            r = requests.post(URL + path, data=data, headers={"Content-Type": "application/json"}, timeout=60)
        except requests.RequestException as e:
            failures.append(f"{path} {data[:200]!r}: {type(e).__name__}: {e}")
            return
        if r.status_code >= 500:
            failures.append(f"{path} {data[:200]!r}: HTTP {r.status_code} {r.text[:200]}")
        elif r.status_code >= 400:
            try:
                r.json()
            except ValueError:
                failures.append(f"{path} {data[:200]!r}: HTTP {r.status_code} body is not JSON: {r.text[:200]}")


def adapters():
    r = requests.get(f"{URL}/v1/models", timeout=30)
    assert r.status_code == 200, r.text
    return sorted(m["id"] for m in r.json()["data"])


def test_random_and_malformed_requests_get_4xx_json_and_the_server_keeps_serving():
    before = adapters()
    deadline = time.monotonic() + SECONDS
    failures = []
    run(1, REQUESTS // 2, deadline, failures)
    threads = [threading.Thread(target=run, args=(100 + i, REQUESTS // 2 // THREADS, deadline, failures))
               for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, "\n".join(failures[:10])
    assert requests.get(f"{URL}/health", timeout=30).status_code == 200
    assert adapters() == before
