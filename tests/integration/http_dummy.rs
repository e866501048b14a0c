//! `--load-format dummy` end to end on the CPU: random weights from a config alone or a preset
//! name, a server without a tokenizer (token ids in, ids out, as SGLang's
//! `--skip-tokenizer-init`), and `dummy://` adapters from the command line and at run time.

use serde_json::{json, Value};

use crate::common::fixture;
use crate::http::{run_to_exit, Server};

/// A directory holding only the tiny model's config.json: no tokenizer, no weights.
fn config_only_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("tiny/llama/config.json"), dir.path().join("config.json")).unwrap();
    dir
}

fn message(body: &Value) -> String {
    body["error"]["message"].as_str().unwrap_or_default().to_string()
}

/// Greedy ids and output log-probs of `prompt` under each adapter of `adapters` in one batch.
async fn batch(s: &Server, prompt: &[u32], adapters: &[Option<&str>]) -> Vec<(Vec<u32>, Vec<f64>)> {
    let body = json!({
        "input_ids": vec![prompt; adapters.len()],
        "lora_path": adapters,
        "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": true},
        "return_logprob": true,
    });
    let (status, out) = s.post("/generate", &body).await;
    assert_eq!(status, 200, "{out}");
    out.as_array()
        .unwrap()
        .iter()
        .map(|o| {
            // No tokenizer, no text: SGLang's shape with --skip-tokenizer-init.
            assert!(o.get("text").is_none(), "{o}");
            let ids: Vec<u32> = serde_json::from_value(o["output_ids"].clone()).unwrap();
            let lps = o["meta_info"]["output_token_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    assert_eq!(t[2], Value::Null, "{t}");
                    t[0].as_f64().unwrap()
                })
                .collect();
            (ids, lps)
        })
        .collect()
}

#[tokio::test]
async fn a_config_alone_serves_token_ids_with_dummy_adapters() {
    let dir = config_only_dir();
    let s = Server::start(&[
        "--model-path",
        dir.path().to_str().unwrap(),
        "--load-format",
        "dummy",
        "--max-loras-per-batch",
        "3",
        "--lora-paths",
        "a=dummy://?rank=4",
        "b=dummy://?rank=8&targets=q_proj,v_proj&seed=5",
    ])
    .await;
    assert!(s.log().contains("serving token ids only"), "{}", s.log());
    let prompt = [5, 17, 42, 99, 3];
    let out = batch(&s, &prompt, &[None, Some("a"), Some("b")]).await;
    for (ids, lps) in &out {
        assert_eq!((ids.len(), lps.len()), (4, 4));
        assert!(ids.iter().all(|&t| t < 384), "{ids:?}");
    }
    // Each adapter moves the log-probs: its delta is applied.
    for i in 1..3 {
        let moved = (0..4)
            .map(|t| (out[i].1[t] - out[0].1[t]).abs())
            .fold(0.0, f64::max);
        assert!(
            moved > 1e-4,
            "adapter {i} left the log-probs as the base's: {out:?}"
        );
    }
    // A request alone gives what it gave in the mixed batch.
    let alone = batch(&s, &prompt, &[Some("b")]).await;
    assert_eq!(alone[0].0, out[2].0);
    for (x, y) in alone[0].1.iter().zip(&out[2].1) {
        assert!((x - y).abs() < 1e-4, "{alone:?} vs {out:?}");
    }

    // Streaming without a tokenizer: cumulative ids, no text, then [DONE].
    let (events, done) = s
        .post_sse(
            "/generate",
            &json!({"input_ids": prompt, "lora_path": "a", "stream": true,
                    "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": true}}),
        )
        .await;
    assert!(done && !events.is_empty());
    assert!(events.iter().all(|e| e.get("text").is_none()), "{events:?}");
    let last: Vec<u32> = serde_json::from_value(events.last().unwrap()["output_ids"].clone()).unwrap();
    assert_eq!(last, out[1].0);

    // What needs a tokenizer is refused with a 400 that says what to send instead.
    let refusals = [
        ("/generate", json!({"text": "hi"}), "`input_ids`"),
        (
            "/generate",
            json!({"input_ids": [1, 2], "sampling_params": {"stop": ["x"]}}),
            "`stop_token_ids`",
        ),
        (
            "/generate",
            json!({"input_ids": [1, 2], "return_logprob": true, "return_text_in_logprobs": true}),
            "token ids in the log-probs",
        ),
        (
            "/v1/completions",
            json!({"model": "x", "prompt": [1, 2]}),
            "/generate with `input_ids`",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "x", "messages": [{"role": "user", "content": "hi"}]}),
            "/generate with `input_ids`",
        ),
    ];
    for (path, body, instead) in refusals {
        let (status, out) = s.post(path, &body).await;
        let m = message(&out);
        assert_eq!(status, 400, "{path} {body}: {out}");
        assert!(
            m.contains("tokenizer") && m.contains(instead),
            "{path} {body}: {m}"
        );
    }
    let (status, _) = s.get("/health_generate").await;
    assert_eq!(status, 200);
    let (_, info) = s.get("/get_server_info").await;
    assert_eq!(
        (&info["load_format"], &info["skip_tokenizer_init"]),
        (&json!("dummy"), &json!(true))
    );
    let (_, info) = s.get("/get_model_info").await;
    assert_eq!(info["tokenizer_path"], Value::Null);

    // dummy:// adapters load at run time too, and a bad one is refused with its reason.
    let (status, out) = s
        .post(
            "/load_lora_adapter",
            &json!({"lora_name": "c", "lora_path": "dummy://?rank=2&seed=9"}),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(batch(&s, &prompt, &[Some("c")]).await[0].0.len(), 4);
    let (status, out) = s
        .post(
            "/load_lora_adapter",
            &json!({"lora_name": "d", "lora_path": "dummy://?rank=0"}),
        )
        .await;
    assert_eq!(status, 400, "{out}");
    let m = out["error_message"].as_str().unwrap();
    assert!(
        m.contains("dummy://?rank=0") && m.contains("from 1 to 1024"),
        "{m}"
    );
}

/// With a tokenizer beside the config, text works as usual on random weights; the
/// --skip-tokenizer-init flag turns it off.
#[tokio::test]
async fn a_config_file_with_a_tokenizer_beside_it_serves_text_unless_skipped() {
    let config = fixture("tiny/llama/config.json");
    let config = config.to_str().unwrap();
    let s = Server::start(&["--model-path", config, "--load-format", "dummy"]).await;
    let body = json!({"text": "Hello", "sampling_params": {"max_new_tokens": 3, "temperature": 0, "ignore_eos": true}});
    let (status, out) = s.post("/generate", &body).await;
    assert_eq!(status, 200, "{out}");
    assert!(out["text"].is_string(), "{out}");
    let (_, info) = s.get("/get_model_info").await;
    assert_eq!(info["model_path"], json!(config));
    drop(s);
    let s = Server::start(&[
        "--model-path",
        config,
        "--load-format",
        "dummy",
        "--skip-tokenizer-init",
    ])
    .await;
    let (status, out) = s.post("/generate", &body).await;
    assert_eq!(status, 400, "{out}");
    assert!(message(&out).contains("`input_ids`"), "{out}");
}

/// A preset name is enough for a dummy model; an unknown one lists the presets.
#[tokio::test]
async fn a_preset_name_serves_that_shape() {
    let s = Server::start(&[
        "--model-path",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "--load-format",
        "dummy",
    ])
    .await;
    let (_, models) = s.get("/v1/models").await;
    assert_eq!(models["data"][0]["id"], "SmolLM2-135M", "{models}");
    let body = json!({"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2, "temperature": 0, "ignore_eos": true}});
    let (status, out) = s.post("/generate", &body).await;
    assert_eq!(status, 200, "{out}");
    assert!(out["output_ids"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t.as_u64().unwrap() < 49152));
    drop(s);
    let (status, err) = run_to_exit(&["--model-path", "Llama-9B", "--load-format", "dummy"]);
    assert!(!status.success());
    assert!(
        err.contains("not a preset name") && err.contains("Llama-3.1-8B"),
        "{err}"
    );
    // Without --load-format dummy a preset name is just a missing path.
    let (status, err) = run_to_exit(&["--model-path", "Llama-3.1-8B"]);
    assert!(!status.success());
    assert!(err.contains("no such file or directory"), "{err}");
}

/// `--skip-tokenizer-init` on a real model does not read its tokenizer: a model directory whose
/// tokenizer.json is broken still serves token ids (and without the flag stops start-up).
#[tokio::test]
async fn skip_tokenizer_init_never_reads_the_tokenizer_of_a_real_model() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture(&format!("tiny/llama/{f}")), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("tokenizer.json"), "not json").unwrap();
    let model = dir.path().to_str().unwrap();
    let (status, stderr) = run_to_exit(&["--model-path", model]);
    assert_ne!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("tokenizer"), "{stderr}");
    let s = Server::start(&["--model-path", model, "--skip-tokenizer-init"]).await;
    let out = batch(&s, &[5, 17, 42], &[None]).await;
    assert_eq!(out[0].0.len(), 4);
}
