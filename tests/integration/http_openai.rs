//! The OpenAI-compatible endpoints of the real server: `/v1/models`, completions and chat
//! (plain and streaming), `model` as `<base>:<adapter>`, the adapter name or the base name,
//! OpenAI's error shape, and `--api-key`.

use serde_json::{json, Value};

use crate::common::fixture;
use crate::http::{ids_of, Reference, Server, ADAPTERS};

#[tokio::test]
async fn models_lists_the_base_then_every_adapter() {
    let s = Server::tiny(&["--served-model-name", "tiny"]).await;
    let (status, models) = s.get("/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    let data = models["data"].as_array().unwrap();
    assert_eq!(data[0]["id"], "tiny");
    assert_eq!(data[0]["max_model_len"], 256);
    assert!(data[0]["parent"].is_null());
    let adapters: Vec<&str> = data[1..].iter().map(|m| m["id"].as_str().unwrap()).collect();
    let mut want = ADAPTERS.to_vec();
    want.sort();
    assert_eq!(adapters, want);
    for m in &data[1..] {
        assert_eq!(m["parent"], "tiny");
        assert_eq!(m["object"], "model");
        assert!(m["root"].as_str().unwrap().contains("tiny/adapters/"));
    }
    let (status, m) = s.get("/v1/models/tiny:qv_r2").await;
    assert_eq!((status, &m["parent"]), (200, &json!("tiny")));
    let (status, m) = s.get("/v1/models/other").await;
    assert_eq!(status, 404);
    assert_eq!(m["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn completions_pick_the_adapter_from_the_model_name() {
    let s = Server::tiny(&[]).await;
    let r = Reference::load();
    let prompt = r.prompt(4);
    let (_, native) = s
        .post(
            "/generate",
            &json!({"input_ids": prompt, "lora_path": "attn_r4",
                    "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": true}}),
        )
        .await;
    r.check_greedy("llama+attn_r4", 4, &ids_of(&native));
    let bodies = [
        json!({"model": "llama:attn_r4"}),
        json!({"model": "attn_r4"}),
        json!({"model": "llama", "lora_path": "attn_r4"}),
    ];
    for extra in bodies {
        let mut body = json!({"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": true});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, out) = s.post("/v1/completions", &body).await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(out["object"], "text_completion");
        assert_eq!(out["model"], extra["model"]);
        assert!(out["id"].as_str().unwrap().starts_with("cmpl-"));
        let choice = &out["choices"][0];
        assert_eq!(choice["text"], native["text"], "{extra}");
        assert_eq!(choice["finish_reason"], "length");
        assert_eq!(out["usage"]["prompt_tokens"], prompt.len());
        assert_eq!(out["usage"]["completion_tokens"], 16);
        assert_eq!(out["usage"]["total_tokens"], prompt.len() + 16);
    }
    // The base model differs from the adapter.
    let (_, base) = s
        .post(
            "/v1/completions",
            &json!({"model": "llama", "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": true}),
        )
        .await;
    assert_ne!(base["choices"][0]["text"], native["text"]);

    // Several prompts x n samples: indices run prompt-major; logprobs are parallel lists.
    let (status, out) = s
        .post(
            "/v1/completions",
            &json!({"model": "llama:qv_r2", "prompt": ["The fox.", "Once upon a time"], "n": 2,
                    "max_tokens": 3, "temperature": 0, "logprobs": 2, "echo": true}),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    let choices = out["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    assert_eq!(choices[0]["text"], choices[1]["text"], "greedy samples agree");
    assert!(
        choices[2]["text"]
            .as_str()
            .unwrap()
            .starts_with("Once upon a time"),
        "echo"
    );
    let lp = &choices[0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 3);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    assert_eq!(lp["text_offset"][0], "The fox.".len());
}

#[tokio::test]
async fn completions_stream_in_openai_chunks_with_usage() {
    let s = Server::tiny(&[]).await;
    let body = json!({"model": "llama:mlp_r8_rslora", "prompt": "Once upon a time", "max_tokens": 8,
                      "temperature": 0, "ignore_eos": true, "n": 2});
    let (_, plain) = s.post("/v1/completions", &body).await;
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (chunks, done) = s.post_sse("/v1/completions", &streamed).await;
    assert!(done);
    let ids: std::collections::HashSet<&str> = chunks.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1, "one id for the whole stream");
    for index in 0..2 {
        let text: String = chunks
            .iter()
            .flat_map(|c| c["choices"].as_array().unwrap())
            .filter(|ch| ch["index"] == index)
            .map(|ch| ch["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, plain["choices"][index]["text"].as_str().unwrap());
        let last = chunks
            .iter()
            .flat_map(|c| c["choices"].as_array().unwrap())
            .rfind(|ch| ch["index"] == index)
            .unwrap();
        assert_eq!(last["finish_reason"], "length");
    }
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], plain["usage"]);
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c["usage"].is_null()));
}

#[tokio::test]
async fn chat_with_the_default_model_plain_and_streaming() {
    let s = Server::smollm(&[]).await;
    let (_, models) = s.get("/v1/models").await;
    let model = models["data"][0]["id"].as_str().unwrap().to_string();
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 24,
        "temperature": 0,
    });
    let (status, out) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["object"], "chat.completion");
    let msg = &out["choices"][0]["message"];
    assert_eq!(msg["role"], "assistant");
    let answer = msg["content"].as_str().unwrap();
    assert!(answer.contains("Paris"), "{answer}");
    assert_eq!(out["choices"][0]["finish_reason"], "stop");
    assert!(
        !answer.contains("<|im_end|>"),
        "the eos token is trimmed: {answer:?}"
    );

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (chunks, done) = s.post_sse("/v1/chat/completions", &streamed).await;
    assert!(done);
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, answer);
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");

    // Content given as text parts works like a string.
    let parts = json!({
        "model": model,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}],
        "max_tokens": 24, "temperature": 0,
    });
    let (_, out) = s.post("/v1/chat/completions", &parts).await;
    assert_eq!(out["choices"][0]["message"]["content"], answer);

    // Chat log-probs: one entry per token with its top alternatives.
    let mut lp = body.clone();
    lp["logprobs"] = json!(true);
    lp["top_logprobs"] = json!(2);
    let (_, out) = s.post("/v1/chat/completions", &lp).await;
    let content = out["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len(),
        out["usage"]["completion_tokens"].as_u64().unwrap() as usize
    );
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    assert!(content[0]["bytes"].is_array());
}

#[tokio::test]
async fn chat_with_tiny_adapters_uses_the_template() {
    let s = Server::tiny(&[]).await;
    let body = |model: &str| {
        json!({"model": model, "messages": [{"role": "user", "content": "2 + 2?"}], "max_tokens": 6,
               "temperature": 0, "ignore_eos": true})
    };
    let (status, base) = s.post("/v1/chat/completions", &body("llama")).await;
    assert_eq!(status, 200, "{base}");
    let (_, adapted) = s.post("/v1/chat/completions", &body("llama:all_r16")).await;
    assert_eq!(adapted["usage"]["prompt_tokens"], base["usage"]["prompt_tokens"]);
    assert_eq!(adapted["usage"]["completion_tokens"], 6);
    // The same conversation through /generate with the rendered template gives the same text.
    let (_, out) = s
        .post(
            "/generate",
            &json!({"text": "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n",
                    "lora_path": "all_r16",
                    "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": true}}),
        )
        .await;
    assert_eq!(
        out["meta_info"]["prompt_tokens"],
        adapted["usage"]["prompt_tokens"]
    );
    assert_eq!(out["text"], adapted["choices"][0]["message"]["content"]);
}

#[tokio::test]
async fn unknown_models_and_bad_requests_use_openai_errors() {
    let s = Server::tiny(&[]).await;
    for model in ["other", "llama:nope", "other:qv_r2"] {
        let (status, out) = s
            .post(
                "/v1/completions",
                &json!({"model": model, "prompt": "hi", "max_tokens": 1}),
            )
            .await;
        assert_eq!(status, 404, "{model}: {out}");
        assert_eq!(out["error"]["code"], "model_not_found");
        assert_eq!(out["error"]["type"], "invalid_request_error");
        assert_eq!(out["error"]["param"], "model");
        let (status, _) = s
            .post(
                "/v1/chat/completions",
                &json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await;
        assert_eq!(status, 404);
    }
    let (status, out) = s
        .post(
            "/v1/completions",
            &json!({"model": "llama", "prompt": "hi", "max_tokens": 1, "temperature": -2}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(out["error"]["param"], "temperature");
    assert!(out["error"]["message"].as_str().unwrap().contains("temperature"));
    let (status, out) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}],
                    "model_extra": 1}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        out["error"]["message"].as_str().unwrap().contains("model_extra"),
        "{out}"
    );
}

#[tokio::test]
async fn api_key_guards_every_endpoint_but_health_and_metrics() {
    let s = Server::tiny(&["--api-key", "sk-test"]).await;
    let c = s.client();
    for path in ["/health", "/metrics"] {
        assert_eq!(c.get(s.url(path)).send().await.unwrap().status(), 200, "{path}");
    }
    let gen = json!({"text": "hi", "sampling_params": {"max_new_tokens": 1}});
    let r = c.post(s.url("/generate")).json(&gen).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().contains("API key"),
        "{body}"
    );
    let r = c
        .get(s.url("/v1/models"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "authentication_error");
    for path in ["/get_server_info", "/get_model_info", "/health_generate"] {
        assert_eq!(c.get(s.url(path)).send().await.unwrap().status(), 401, "{path}");
    }
    let path = fixture("tiny/adapters/qv_r2").display().to_string();
    let r = c
        .post(s.url("/load_lora_adapter"))
        .json(&json!({"lora_name": "x", "lora_path": path}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // With the key everything works.
    let r = c
        .post(s.url("/generate"))
        .bearer_auth("sk-test")
        .json(&gen)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(s.url("/v1/models"))
        .bearer_auth("sk-test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, info) = {
        let r = c
            .get(s.url("/get_server_info"))
            .bearer_auth("sk-test")
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    };
    assert!(!info.to_string().contains("sk-test"), "the key is never echoed");
}
