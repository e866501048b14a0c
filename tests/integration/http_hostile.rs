//! Malformed and hostile input against the real server: every case must get a 4xx JSON error
//! that names the problem (SGLang's shape on native endpoints, OpenAI's on `/v1`), nothing may
//! panic, and the server must answer exactly as before afterwards.

use std::time::Duration;

use serde_json::{json, Value};

use crate::http::{ids_of, Server};

/// One hostile request: method, path, raw body, expected status, and a fragment of the message.
struct Case {
    path: &'static str,
    body: Vec<u8>,
    status: u16,
    needle: &'static str,
}

fn case(path: &'static str, body: impl Into<Vec<u8>>, status: u16, needle: &'static str) -> Case {
    Case {
        path,
        body: body.into(),
        status,
        needle,
    }
}

fn j(v: Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

fn cases() -> Vec<Case> {
    let long_prompt: Vec<u32> = vec![5; 300];
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let sp = |v: Value| j(json!({"text": "hi", "sampling_params": v}));
    vec![
        // Syntax, shape and types.
        case("/generate", "{\"text\": ", 400, "not valid JSON"),
        case("/generate", "", 400, "empty"),
        case("/generate", vec![0xff, 0xfe, 0x00], 400, "not valid JSON"),
        case("/generate", deep.clone(), 400, "not valid JSON"),
        case("/generate", "[1, 2]", 400, "JSON object"),
        case(
            "/generate",
            j(json!({})),
            400,
            "`text` or `input_ids` is required",
        ),
        case(
            "/generate",
            j(json!({"text": "a", "input_ids": [1]})),
            400,
            "not both",
        ),
        case("/generate", j(json!({"text": 12})), 400, "`text` must be"),
        case("/generate", j(json!({"text": []})), 400, "empty batch"),
        case(
            "/generate",
            j(json!({"text": ["a", 3]})),
            400,
            "`text[1]` must be a string",
        ),
        case(
            "/generate",
            j(json!({"input_ids": []})),
            400,
            "`input_ids` is empty",
        ),
        case(
            "/generate",
            j(json!({"input_ids": [1, -3]})),
            400,
            "`input_ids[1]`",
        ),
        case(
            "/generate",
            j(json!({"input_ids": [[1], "x"]})),
            400,
            "`input_ids[1]` must be a list",
        ),
        case(
            "/generate",
            j(json!({"input_ids": [1, 100000]})),
            400,
            "outside the vocabulary",
        ),
        case(
            "/generate",
            j(json!({"input_ids": [1, 4294967296u64]})),
            400,
            "`input_ids[1]`",
        ),
        case(
            "/generate",
            j(json!({"input_ids": long_prompt})),
            400,
            "context length",
        ),
        case(
            "/generate",
            j(json!({"text": "hi", "stream": "yes"})),
            400,
            "`stream` must be true or false",
        ),
        case(
            "/generate",
            j(json!({"text": "hi", "sampling_params": [1]})),
            400,
            "`sampling_params[0]` must be an object",
        ),
        case(
            "/generate",
            j(json!({"text": "hi", "typo_field": 1})),
            400,
            "`typo_field`",
        ),
        // Adapters.
        case(
            "/generate",
            j(json!({"text": "hi", "lora_path": "nope"})),
            400,
            "\"nope\" is not loaded",
        ),
        case(
            "/generate",
            j(json!({"text": ["a", "b"], "lora_path": ["qv_r2"]})),
            400,
            "batch has 2 prompts",
        ),
        case(
            "/generate",
            j(json!({"text": "a", "lora_path": ["qv_r2", null]})),
            400,
            "batch has 1 prompts",
        ),
        case(
            "/generate",
            j(json!({"text": "a", "lora_path": 5})),
            400,
            "`lora_path`",
        ),
        // Limits.
        case(
            "/generate",
            sp(json!({"max_new_tokens": -1})),
            400,
            "max_new_tokens",
        ),
        case(
            "/generate",
            sp(json!({"max_new_tokens": 1_000_000_000_000u64})),
            400,
            "context length",
        ),
        case(
            "/generate",
            sp(json!({"max_new_tokens": 1.5})),
            400,
            "max_new_tokens",
        ),
        case("/generate", sp(json!({"temperature": -0.1})), 400, "temperature"),
        case("/generate", sp(json!({"temperature": "hot"})), 400, "temperature"),
        case("/generate", sp(json!({"top_p": 0})), 400, "top_p"),
        case("/generate", sp(json!({"top_p": 1.01})), 400, "top_p"),
        case("/generate", sp(json!({"top_k": -5})), 400, "top_k"),
        case("/generate", sp(json!({"min_p": 2})), 400, "min_p"),
        case("/generate", sp(json!({"n": 17})), 400, "n"),
        case("/generate", sp(json!({"n": 0})), 400, "n"),
        case("/generate", sp(json!({"stop": vec!["ok"; 100]})), 400, "stop"),
        case("/generate", sp(json!({"stop": [""]})), 400, "stop"),
        case(
            "/generate",
            sp(json!({"stop_token_ids": [999999]})),
            400,
            "outside the vocabulary",
        ),
        case(
            "/generate",
            sp(json!({"regex": "a+"})),
            400,
            "sampling_params.regex",
        ),
        case(
            "/generate",
            j(json!({"text": "hi", "return_logprob": true, "top_logprobs_num": 100000})),
            400,
            "top_logprobs_num",
        ),
        case(
            "/generate",
            j(json!({"text": "hi", "return_logprob": true, "logprob_start_len": -5})),
            400,
            "logprob_start_len",
        ),
        case(
            "/generate",
            j(json!({"text": "hi", "return_logprob": true, "logprob_start_len": 50})),
            400,
            "logprob_start_len",
        ),
        // Adapter management.
        case("/load_lora_adapter", "{", 400, "not valid JSON"),
        case(
            "/load_lora_adapter",
            j(json!({"lora_name": 3, "lora_path": "/x"})),
            400,
            "lora_name",
        ),
        case(
            "/load_lora_adapter",
            j(json!({"lora_name": "e", "lora_path": "/etc"})),
            400,
            "/etc",
        ),
        case(
            "/load_lora_adapter",
            j(json!({"lora_name": "", "lora_path": "/x"})),
            400,
            "lora_name",
        ),
        case("/unload_lora_adapter", j(json!({})), 400, "lora_name"),
        case(
            "/unload_lora_adapter",
            j(json!({"lora_name": "nope"})),
            400,
            "not loaded",
        ),
        // OpenAI.
        case("/v1/completions", "{", 400, "not valid JSON"),
        case(
            "/v1/completions",
            j(json!({"model": "llama"})),
            400,
            "`prompt` is required",
        ),
        case(
            "/v1/completions",
            j(json!({"model": "llama", "prompt": {}})),
            400,
            "`prompt`",
        ),
        case(
            "/v1/completions",
            j(json!({"model": "llama", "prompt": "hi", "max_tokens": -1})),
            400,
            "max_tokens",
        ),
        case(
            "/v1/completions",
            j(json!({"model": "llama", "prompt": "hi", "logprobs": 99})),
            400,
            "logprobs",
        ),
        case(
            "/v1/completions",
            j(json!({"model": "llama", "prompt": "hi", "n": 100})),
            400,
            "n",
        ),
        case(
            "/v1/completions",
            j(json!({"model": "llama", "prompt": "hi", "suffix": "x"})),
            400,
            "suffix",
        ),
        case(
            "/v1/completions",
            j(json!({"model": "nope", "prompt": "hi"})),
            404,
            "does not exist",
        ),
        case(
            "/v1/completions",
            j(json!({"model": "llama", "prompt": [1, 100000]})),
            400,
            "vocabulary",
        ),
        case(
            "/v1/chat/completions",
            j(json!({"model": "llama"})),
            400,
            "`messages` is required",
        ),
        case(
            "/v1/chat/completions",
            j(json!({"model": "llama", "messages": "hi"})),
            400,
            "`messages` must be",
        ),
        case(
            "/v1/chat/completions",
            j(json!({"model": "llama", "messages": []})),
            400,
            "empty",
        ),
        case(
            "/v1/chat/completions",
            j(json!({"model": "llama", "messages": [{"content": "hi"}]})),
            400,
            "role",
        ),
        case(
            "/v1/chat/completions",
            j(
                json!({"model": "llama", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            ),
            400,
            "only text",
        ),
        case(
            "/v1/chat/completions",
            j(json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3})),
            400,
            "logprobs",
        ),
        case(
            "/v1/chat/completions",
            j(
                json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}),
            ),
            400,
            "tools",
        ),
        case(
            "/v1/chat/completions",
            j(
                json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}),
            ),
            400,
            "max_tokens",
        ),
        case(
            "/v1/chat/completions",
            j(
                json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}], "stream": true, "top_p": 0}),
            ),
            400,
            "top_p",
        ),
    ]
}

#[tokio::test]
async fn hostile_input_gets_clear_4xx_json_and_the_server_keeps_serving() {
    let s = Server::tiny(&[]).await;
    let probe = json!({"input_ids": [292, 296, 81, 90, 16], "lora_path": "qv_r2",
                       "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": true}});
    let (_, before) = s.post("/generate", &probe).await;
    for c in cases() {
        let r = s
            .client()
            .post(s.url(c.path))
            .header("content-type", "application/json")
            .body(c.body.clone())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let shown = String::from_utf8_lossy(&c.body[..c.body.len().min(120)]).to_string();
        assert_eq!(status, c.status, "{} {shown}: {text}", c.path);
        let body: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{} {shown}: not JSON: {text}", c.path));
        let message = if c.path.starts_with("/v1/") {
            for key in ["message", "type", "param", "code"] {
                assert!(
                    body["error"].get(key).is_some(),
                    "OpenAI shape needs error.{key}: {text}"
                );
            }
            body["error"]["message"].as_str().unwrap().to_string()
        } else if c.path.contains("lora_adapter") {
            assert_eq!(body["success"], false, "{text}");
            body["error_message"].as_str().unwrap().to_string()
        } else {
            body["error"]["message"].as_str().unwrap().to_string()
        };
        assert!(
            message.contains(c.needle),
            "{} {shown}: expected {:?} in {message:?}",
            c.path,
            c.needle
        );
    }

    // Oversized bodies, unknown routes and wrong methods are JSON too.
    // Its own client: the server answers 413 before reading the body and closes that connection.
    let big = vec![b'a'; 17 * 1024 * 1024];
    let one_shot = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let r = one_shot.post(s.url("/generate")).body(big).send().await.unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
    let (status, body) = s.get("/no/such/endpoint").await;
    assert_eq!(status, 404);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/no/such/endpoint"));
    let (status, body) = s.get("/v1/nothing").await;
    assert_eq!(status, 404);
    assert!(body["error"]["type"].is_string());
    let (status, _) = s.get("/generate").await;
    assert_eq!(status, 405);

    // A burst of bad and good requests at once.
    let mut tasks = Vec::new();
    for i in 0..24 {
        let client = s.client().clone();
        let url = s.url("/generate");
        let body = if i % 2 == 0 {
            json!({"text": ["x"], "lora_path": [1]})
        } else {
            probe.clone()
        };
        tasks.push(tokio::spawn(async move {
            client
                .post(url)
                .json(&body)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let status = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(status, if i % 2 == 0 { 400 } else { 200 });
    }

    let (status, after) = s.post("/generate", &probe).await;
    assert_eq!(status, 200);
    assert_eq!(
        ids_of(&after),
        ids_of(&before),
        "the server answers exactly as before"
    );
    assert!(!s.log().contains("panicked"), "{}", s.log());
}
