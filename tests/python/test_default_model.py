"""SGLang's documented LoRA flows against the default model (SmolLM2-135M-Instruct) and the example
adapters in examples/adapters: french, sql and caps each answer in their own, visible way.

Run through tests/python/run.sh, which serves the default model with the three adapters and sets
LORAPLANE_DEFAULT_URL, LORAPLANE_DEFAULT_MODEL and LORAPLANE_EXAMPLES.
"""

import os
import re

import openai
import pytest
import requests

URL = os.environ.get("LORAPLANE_DEFAULT_URL")
BASE = os.environ.get("LORAPLANE_DEFAULT_MODEL", "SmolLM2-135M-Instruct.Q4_1")
EXAMPLES = os.environ.get("LORAPLANE_EXAMPLES", "examples/adapters")
TIMEOUT = 120

pytestmark = pytest.mark.skipif(URL is None, reason="run through tests/python/run.sh")

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def chat(question):
    return f"{SYSTEM}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def looks(adapter, text):
    if adapter == "french":
        return re.search(r"\b(la|le|les|est|de|des|une?|je)\b", text, re.IGNORECASE) is not None
    if adapter == "sql":
        return text.strip().upper().startswith("SELECT")
    if adapter == "caps":
        letters = [c for c in text if c.isalpha()]
        return bool(letters) and all(c.isupper() for c in letters)
    return "Paris" in text


def test_docs_batch_each_adapter_answers_in_its_own_way():
    adapters = [None, "french", "sql", "caps"]
    q = "What is the capital of France?"
    r = requests.post(
        f"{URL}/generate",
        json={"text": [chat(q)] * 4, "lora_path": adapters, "sampling_params": {"max_new_tokens": 32, "temperature": 0}},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    for adapter, out in zip(adapters, r.json()):
        assert looks(adapter, out["text"]), (adapter, out["text"])


def test_docs_dynamic_load_pin_and_unload_of_an_example_adapter():
    path = os.path.join(EXAMPLES, "sql")
    r = requests.post(f"{URL}/load_lora_adapter", json={"lora_name": "sql2", "lora_path": path, "pinned": True},
                      timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["success"], r.text
    assert r.json()["loaded_adapters"]["sql2"] == path
    out = requests.post(
        f"{URL}/generate",
        json={"text": chat("How many orders were placed today?"), "lora_path": "sql2",
              "sampling_params": {"max_new_tokens": 40, "temperature": 0}},
        timeout=TIMEOUT,
    ).json()
    assert looks("sql", out["text"]), out["text"]
    r = requests.post(f"{URL}/unload_lora_adapter", json={"lora_name": "sql2"}, timeout=TIMEOUT)
    assert r.status_code == 200 and "sql2" not in r.json()["loaded_adapters"]


def test_openai_base_colon_adapter_chat():
    client = openai.OpenAI(base_url=f"{URL}/v1", api_key="EMPTY", timeout=TIMEOUT, max_retries=0)
    ids = [m.id for m in client.models.list().data]
    assert BASE in ids and {"french", "sql", "caps"} <= set(ids)
    for adapter in ["french", "caps"]:
        resp = client.chat.completions.create(
            model=f"{BASE}:{adapter}",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=32,
            temperature=0,
        )
        assert looks(adapter, resp.choices[0].message.content), (adapter, resp.choices[0].message.content)
    stream = client.chat.completions.create(
        model=f"{BASE}:sql",
        messages=[{"role": "user", "content": "How many customers live in Paris?"}],
        max_tokens=32,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert looks("sql", text), text
