"""Client compatibility: the official `openai` Python client against loraplane's /v1 endpoints,
and the `requests` flows of SGLang's LoRA serving docs against the native endpoints.

Run through tests/python/run.sh, which starts the server with the tiny fixture model
(served as "llama") and its adapters qv_r2, mlp_r8_rslora, all_r16 and attn_r4, and sets
LORAPLANE_URL and LORAPLANE_ADAPTERS.
"""

import json
import os

import openai
import pytest
import requests

URL = os.environ.get("LORAPLANE_URL", "http://127.0.0.1:30000")
ADAPTER_DIR = os.environ.get("LORAPLANE_ADAPTERS", "tests/fixtures/tiny/adapters")
BASE = os.environ.get("LORAPLANE_MODEL", "llama")
TIMEOUT = 60

# Greedy, and past the tiny model's eos tokens so every answer has the same length.
GREEDY = {"temperature": 0}
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=f"{URL}/v1", api_key="EMPTY", timeout=TIMEOUT, max_retries=0)


def native_text(prompt, lora, max_new_tokens):
    r = requests.post(
        f"{URL}/generate",
        json={
            "text": prompt,
            "lora_path": lora,
            "sampling_params": {"max_new_tokens": max_new_tokens, **GREEDY, **NO_EOS},
        },
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    return r.json()["text"]


def test_models_list_has_the_base_and_every_adapter(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == BASE
    for name in ["qv_r2", "mlp_r8_rslora", "all_r16", "attn_r4"]:
        assert name in ids


@pytest.mark.parametrize("model", [f"{BASE}:qv_r2", "qv_r2"])
def test_completion_with_an_adapter_matches_native_generate(client, model):
    out = client.completions.create(
        model=model, prompt="The fox.", max_tokens=8, extra_body=NO_EOS, **GREEDY
    )
    assert out.model == model
    assert out.choices[0].text == native_text("The fox.", "qv_r2", 8)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8


def test_base_model_and_lora_path_extra_body(client):
    base = client.completions.create(
        model=BASE, prompt="Once upon a time", max_tokens=8, extra_body=NO_EOS, **GREEDY
    )
    assert base.choices[0].text == native_text("Once upon a time", None, 8)
    adapted = client.completions.create(
        model=BASE,
        prompt="Once upon a time",
        max_tokens=8,
        extra_body={"lora_path": "all_r16", **NO_EOS},
        **GREEDY,
    )
    assert adapted.choices[0].text == native_text("Once upon a time", "all_r16", 8)


def test_completion_streaming_equals_plain(client):
    kwargs = dict(model=f"{BASE}:mlp_r8_rslora", prompt="def add(a, b):", max_tokens=10, extra_body=NO_EOS)
    plain = client.completions.create(**kwargs, **GREEDY)
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}, **GREEDY)
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage.completion_tokens == 10


def test_completion_logprobs(client):
    out = client.completions.create(
        model=f"{BASE}:attn_r4", prompt="The fox.", max_tokens=4, logprobs=2, extra_body=NO_EOS, **GREEDY
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert all(x <= 0 for x in lp.token_logprobs)


def test_chat_plain_and_streaming(client):
    kwargs = dict(
        model=f"{BASE}:all_r16",
        messages=[{"role": "user", "content": "2 + 2?"}],
        max_tokens=6,
        extra_body=NO_EOS,
    )
    plain = client.chat.completions.create(**kwargs, **GREEDY)
    msg = plain.choices[0].message
    assert msg.role == "assistant"
    assert plain.usage.completion_tokens == 6
    stream = client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_chat_n_and_seed(client):
    kwargs = dict(
        model=f"{BASE}:qv_r2",
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=8,
        n=3,
        seed=1234,
        temperature=1.0,
        extra_body=NO_EOS,
    )
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def test_chat_logprobs(client):
    out = client.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        extra_body=NO_EOS,
        **GREEDY,
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 3
    assert all(len(t.top_logprobs) == 2 for t in content)


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model=f"{BASE}:missing", prompt="hi", max_tokens=1)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_bad_parameters_are_bad_requests(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=BASE, prompt="hi", max_tokens=1, temperature=-1)
    assert "temperature" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=BASE, messages=[], max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=BASE, prompt="hi", max_tokens=100000)


# --- SGLang's documented flows, with requests -------------------------------------------------


def test_docs_batch_with_an_adapter_and_the_base_model():
    json_data = {
        "text": ["List 3 countries and their capitals.", "List 3 countries and their capitals."],
        "sampling_params": {"max_new_tokens": 32, "temperature": 0},
        # The first input uses an adapter, the second the base model.
        "lora_path": ["qv_r2", None],
    }
    response = requests.post(URL + "/generate", json=json_data, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    out = response.json()
    assert isinstance(out, list) and len(out) == 2
    for o in out:
        assert set(o) >= {"text", "output_ids", "meta_info"}
        assert o["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    single = requests.post(
        URL + "/generate",
        json={"text": "List 3 countries and their capitals.", "sampling_params": {"max_new_tokens": 32, "temperature": 0},
              "lora_path": "qv_r2"},
        timeout=TIMEOUT,
    ).json()
    assert single["text"] == out[0]["text"]


def test_docs_dynamic_loading_unloading_and_pinning():
    lora_a = os.path.join(ADAPTER_DIR, "attn_r4")
    lora_b = os.path.join(ADAPTER_DIR, "mlp_r8_rslora")
    response = requests.post(URL + "/load_lora_adapter", json={"lora_name": "dyn0", "lora_path": lora_a}, timeout=TIMEOUT)
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["success"] is True and body["error_message"] == ""
    assert body["loaded_adapters"]["dyn0"] == lora_a

    first = native_text("Once upon a time", "dyn0", 8)
    assert first == native_text("Once upon a time", "attn_r4", 8)

    # Replace dyn0 with a different adapter: unload, then load under the same name.
    response = requests.post(URL + "/unload_lora_adapter", json={"lora_name": "dyn0"}, timeout=TIMEOUT)
    assert response.status_code == 200 and "dyn0" not in response.json()["loaded_adapters"]
    response = requests.post(
        URL + "/load_lora_adapter",
        json={"lora_name": "dyn0", "lora_path": lora_b, "pinned": True},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.json()
    assert native_text("Once upon a time", "dyn0", 8) == native_text("Once upon a time", "mlp_r8_rslora", 8)

    # A failed load answers success: false with the reason.
    response = requests.post(
        URL + "/load_lora_adapter", json={"lora_name": "bad", "lora_path": "/nonexistent"}, timeout=TIMEOUT
    )
    assert response.status_code == 400
    assert response.json()["success"] is False and response.json()["error_message"]

    response = requests.post(URL + "/unload_lora_adapter", json={"lora_name": "dyn0"}, timeout=TIMEOUT)
    assert response.status_code == 200
    gone = requests.post(
        URL + "/generate", json={"text": "hi", "lora_path": "dyn0"}, timeout=TIMEOUT
    )
    assert gone.status_code == 400 and "dyn0" in gone.json()["error"]["message"]


def test_docs_streaming_generate():
    r = requests.post(
        URL + "/generate",
        json={"text": "Once upon a time", "sampling_params": {"max_new_tokens": 8, **GREEDY, **NO_EOS},
              "lora_path": "all_r16", "stream": True},
        stream=True,
        timeout=TIMEOUT,
    )
    prev, text = 0, ""
    for chunk in r.iter_lines(decode_unicode=False):
        chunk = chunk.decode("utf-8")
        if chunk and chunk.startswith("data:"):
            if chunk == "data: [DONE]":
                break
            output = json.loads(chunk[5:].strip())["text"]
            assert output.startswith(text)
            text = output
            prev = len(output)
    assert prev > 0
    assert text == native_text("Once upon a time", "all_r16", 8)


def test_server_and_model_info():
    info = requests.get(URL + "/get_model_info", timeout=TIMEOUT).json()
    assert info["is_generation"] is True
    server = requests.get(URL + "/get_server_info", timeout=TIMEOUT).json()
    assert server["enable_lora"] is True
    assert requests.get(URL + "/health", timeout=TIMEOUT).status_code == 200
    assert requests.get(URL + "/health_generate", timeout=TIMEOUT).status_code == 200
