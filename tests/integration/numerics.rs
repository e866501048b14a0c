//! The CPU engine against the PEFT/transformers float32 reference (`scripts/reference/`).
//!
//! Tolerance: log-probabilities within 1e-4 (absolute) at every position; greedy continuations
//! equal wherever the reference's top-2 logit margin exceeds 1e-3.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::common::{fixture, max_abs_diff, read_safetensors, RefTensor};
use loraplane_server::adapter::LoraAdapter;
use loraplane_server::backend::cpu::log_softmax;
use loraplane_server::engine::generate::{generate_greedy, GenRequest};
use loraplane_server::engine::{KvCache, SeqCache};
use loraplane_server::model::llama::{LogitsWanted, SeqInput};
use loraplane_server::model::loader::load_model;
use loraplane_server::model::weights::load_hf_weights;
use loraplane_server::model::{LlamaModel, ModelConfig};

const TOL: f64 = 1e-4;
const MARGIN: f64 = 1e-3;
const ADAPTERS: [&str; 4] = ["qv_r2", "mlp_r8_rslora", "all_r16", "attn_r4"];

struct Reference {
    tensors: HashMap<String, RefTensor>,
    json: serde_json::Value,
}

impl Reference {
    fn load() -> Self {
        let tensors = read_safetensors(&fixture("tiny/reference.safetensors"));
        let text = std::fs::read_to_string(fixture("tiny/reference.json")).unwrap();
        Self {
            tensors,
            json: serde_json::from_str(&text).unwrap(),
        }
    }
    fn get(&self, name: &str) -> &RefTensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("reference has no {name}"))
    }
    fn num_prompts(&self) -> usize {
        self.json["prompts"].as_array().unwrap().len()
    }
    fn prompt(&self, p: usize) -> Vec<u32> {
        self.get(&format!("prompt.{p}")).ids()
    }
}

/// A tiny fixture model, straight from config.json and safetensors.
fn model(name: &str) -> LlamaModel {
    let dir = fixture(&format!("tiny/{name}"));
    let config = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    LlamaModel::from_tensors(config, load_hf_weights(&dir).unwrap())
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

fn adapters(m: &LlamaModel) -> Vec<Arc<LoraAdapter>> {
    ADAPTERS
        .iter()
        .map(|n| {
            let dir: PathBuf = fixture(&format!("tiny/adapters/{n}"));
            Arc::new(LoraAdapter::load(n, &dir, m.config()).unwrap())
        })
        .collect()
}

fn case_name(base: &str, adapter: Option<&LoraAdapter>) -> String {
    match adapter {
        Some(a) => format!("{base}+{}", a.name),
        None => base.to_string(),
    }
}

/// Runs `seqs` as ONE forward pass with full prompt logits; returns log-probs per sequence.
fn one_pass(m: &LlamaModel, prompts: &[(Vec<u32>, Option<Arc<LoraAdapter>>)]) -> Vec<Vec<f32>> {
    let total: usize = prompts.iter().map(|p| p.0.len()).sum();
    let mut kv = KvCache::new(m.config(), total + 16 * prompts.len(), 16);
    let mut caches = vec![SeqCache::default(); prompts.len()];
    for (c, (p, _)) in caches.iter_mut().zip(prompts) {
        kv.reserve(c, p.len()).unwrap();
    }
    let inputs: Vec<SeqInput<'_>> = prompts
        .iter()
        .zip(&caches)
        .map(|((p, a), c)| SeqInput {
            tokens: p,
            cache: c,
            adapter: a.as_deref(),
            logits: LogitsWanted::All,
        })
        .collect();
    let vocab = m.config().vocab_size;
    m.forward(&mut kv, &inputs)
        .unwrap()
        .into_iter()
        .map(|l| l.chunks_exact(vocab).flat_map(log_softmax).collect())
        .collect()
}

#[test]
fn one_mixed_batch_of_base_and_all_adapters_matches_peft() {
    let r = Reference::load();
    let m = model("llama");
    let ads = adapters(&m);
    // Every prompt under the base model and under every adapter, interleaved so that adapters
    // form several non-adjacent segments, all in a single forward pass.
    let mut batch = Vec::new();
    for p in 0..r.num_prompts() {
        batch.push((r.prompt(p), None));
        for a in &ads {
            batch.push((r.prompt(p), Some(a.clone())));
        }
    }
    let got = one_pass(&m, &batch);
    let mut worst = 0.0f64;
    for ((prompt, adapter), lp) in batch.iter().zip(&got) {
        let p = (0..r.num_prompts()).find(|&p| &r.prompt(p) == prompt).unwrap();
        let case = case_name("llama", adapter.as_deref());
        let want = r.get(&format!("logprobs.{case}.{p}"));
        let d = max_abs_diff(lp, &want.data);
        assert!(d < TOL, "{case} prompt {p}: max |Δ logprob| = {d:e}");
        worst = worst.max(d);
    }
    eprintln!(
        "mixed batch of {} sequences: max |Δ logprob| = {worst:e}",
        batch.len()
    );
}

#[test]
fn peft_adapter_names_batch_rows_match() {
    let r = Reference::load();
    let m = model("llama");
    let ads = adapters(&m);
    let rows = r.json["mixed_rows"].as_array().unwrap();
    let batch: Vec<_> = rows
        .iter()
        .map(|row| {
            let adapter = row["adapter"]
                .as_str()
                .map(|n| ads.iter().find(|a| a.name == n).unwrap().clone());
            (r.prompt(row["prompt"].as_u64().unwrap() as usize), adapter)
        })
        .collect();
    let got = one_pass(&m, &batch);
    for (i, lp) in got.iter().enumerate() {
        let d = max_abs_diff(lp, &r.get(&format!("mixed.{i}")).data);
        assert!(d < TOL, "mixed row {i}: max |Δ logprob| = {d:e}");
    }
}

#[test]
fn decode_steps_after_prefill_match_and_greedy_continuations_equal() {
    let r = Reference::load();
    let mut m = model("llama");
    let ads = adapters(&m);
    let vocab = m.config().vocab_size;
    let mut cases: Vec<Option<Arc<LoraAdapter>>> = vec![None];
    cases.extend(ads.iter().cloned().map(Some));
    // Prefill the first half of every prompt for every case in one batch, then feed the rest one
    // token per step for all sequences together, checking each step's distribution.
    let mut seqs = Vec::new();
    for a in &cases {
        for p in 0..r.num_prompts() {
            seqs.push((p, a.clone(), r.prompt(p)));
        }
    }
    let mut kv = KvCache::new(m.config(), 4096, 4);
    let mut caches = vec![SeqCache::default(); seqs.len()];
    let split: Vec<usize> = seqs.iter().map(|s| (s.2.len() / 2).max(1)).collect();
    let mut step = 0;
    loop {
        let mut idx = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            let pos = if step == 0 { 0 } else { split[i] + step - 1 };
            let end = if step == 0 { split[i] } else { pos + 1 };
            if end <= s.2.len() {
                kv.reserve(&mut caches[i], end).unwrap();
                idx.push((i, pos, end));
            }
        }
        if idx.is_empty() {
            break;
        }
        let inputs: Vec<SeqInput<'_>> = idx
            .iter()
            .map(|&(i, pos, end)| SeqInput {
                tokens: &seqs[i].2[pos..end],
                cache: &caches[i],
                adapter: seqs[i].1.as_deref(),
                logits: LogitsWanted::All,
            })
            .collect();
        let out = m.forward(&mut kv, &inputs).unwrap();
        drop(inputs);
        for (&(i, pos, end), logits) in idx.iter().zip(out) {
            caches[i].len = end;
            let (p, a, _) = &seqs[i];
            let want = r.get(&format!("logprobs.{}.{p}", case_name("llama", a.as_deref())));
            let got: Vec<f32> = logits.chunks_exact(vocab).flat_map(log_softmax).collect();
            let d = max_abs_diff(&got, &want.data[pos * vocab..end * vocab]);
            assert!(d < TOL, "step {step} seq {i}: max |Δ logprob| = {d:e}");
        }
        step += 1;
    }

    // Greedy continuations through the batched generator (one prefill, batched decode).
    let reqs: Vec<GenRequest> = seqs
        .iter()
        .map(|(_, a, prompt)| GenRequest {
            prompt: prompt.clone(),
            adapter: a.clone(),
            max_new_tokens: 16,
            stop_token_ids: vec![],
            prompt_logprobs: false,
        })
        .collect();
    let outs = generate_greedy(&mut m, &mut kv, &reqs).unwrap();
    for ((p, a, _), out) in seqs.iter().zip(outs) {
        let case = case_name("llama", a.as_deref());
        check_greedy(&r, &case, *p, &out.tokens);
    }
}

/// Greedy tokens must equal the reference up to the first step whose margin is too thin to call.
fn check_greedy(r: &Reference, case: &str, p: usize, got: &[u32]) {
    let want = r.get(&format!("greedy.{case}.{p}")).ids();
    let margin = &r.get(&format!("margin.{case}.{p}")).data;
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        if margin[i] < MARGIN {
            return;
        }
        assert_eq!(
            g, w,
            "{case} prompt {p}: greedy token {i} differs ({got:?} vs {want:?})"
        );
    }
    assert_eq!(got.len(), want.len());
}

/// Base-model variants: Llama 3.1 rope scaling + tied + sharded bf16, Mistral f16, Qwen2 biases.
#[test]
fn model_variants_match_transformers() {
    let r = Reference::load();
    for name in ["llama31", "mistral", "qwen2"] {
        let mut m = model(name);
        let batch: Vec<_> = (0..r.num_prompts()).map(|p| (r.prompt(p), None)).collect();
        let got = one_pass(&m, &batch);
        for (p, lp) in got.iter().enumerate() {
            let d = max_abs_diff(lp, &r.get(&format!("logprobs.{name}.{p}")).data);
            assert!(d < TOL, "{name} prompt {p}: max |Δ logprob| = {d:e}");
        }
        let mut kv = KvCache::new(m.config(), 2048, 16);
        let reqs: Vec<GenRequest> = (0..r.num_prompts())
            .map(|p| GenRequest {
                prompt: r.prompt(p),
                adapter: None,
                max_new_tokens: 16,
                stop_token_ids: vec![],
                prompt_logprobs: false,
            })
            .collect();
        for (p, out) in generate_greedy(&mut m, &mut kv, &reqs)
            .unwrap()
            .iter()
            .enumerate()
        {
            check_greedy(&r, name, p, &out.tokens);
        }
    }
}

#[test]
fn tokenizer_and_chat_template_match_transformers() {
    let r = Reference::load();
    let m = load_model(&fixture("tiny/llama")).unwrap();
    for (p, prompt) in r.json["prompts"].as_array().unwrap().iter().enumerate() {
        if let Some(text) = prompt["text"].as_str() {
            let ids = m.tokenizer.encode(text, false).unwrap();
            assert_eq!(ids, r.prompt(p), "prompt {p} tokenization");
        }
    }
    for t in r.json["tokenization"].as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        let want: Vec<u32> = t["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            m.tokenizer.encode(text, false).unwrap(),
            want,
            "tokenizing {text:?}"
        );
        assert_eq!(
            m.tokenizer.decode(&want, false).unwrap(),
            t["decoded"].as_str().unwrap()
        );
    }
    let chat = &r.json["chat"];
    let messages: Vec<loraplane_server::model::tokenizer::ChatMessage> =
        serde_json::from_value(chat["messages"].clone()).unwrap();
    let rendered = m.tokenizer.apply_chat_template(&messages, true).unwrap();
    assert_eq!(rendered, chat["rendered"].as_str().unwrap());
}
