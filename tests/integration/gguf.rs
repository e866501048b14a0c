//! GGUF loading against independent references: gguf-py's dequantization, transformers'
//! tokenization of the SmolLM2 GGUF, and an HF llama checkpoint converted the way llama.cpp does.
//!
//! Fixtures are made by the scripts in `scripts/fixtures/`; the SmolLM2 file by
//! `scripts/fetch-default-model.sh`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use loraplane_server::model::gguf::{load_gguf, GgufFile};
use loraplane_server::model::{Architecture, ModelConfig};
use loraplane_server::Tensor;
use safetensors::{Dtype, SafeTensors};

fn fixture(name: &str) -> PathBuf {
    crate::common::fixture(&format!("gguf/{name}"))
}

/// All f32 tensors of a safetensors file.
fn read_safetensors(path: &Path) -> HashMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "{name}");
            let data = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, Tensor::new(view.shape().to_vec(), data))
        })
        .collect()
}

fn assert_bit_equal(name: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape, want.shape, "{name}: shape");
    for (i, (a, b)) in got.data.iter().zip(&want.data).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{name}[{i}]: got {a}, want {b}");
    }
}

#[test]
fn gguf_dequantization_matches_gguf_py_bit_for_bit() {
    let file = GgufFile::open(&fixture("quants.gguf")).unwrap();
    let expected = read_safetensors(&fixture("quants_expected.safetensors"));
    assert_eq!(file.tensors.len(), expected.len());
    let mut types = Vec::new();
    for info in &file.tensors {
        let want = expected
            .get(&info.name)
            .unwrap_or_else(|| panic!("no expected values for {}", info.name));
        let got = file.dequantize(info).unwrap();
        assert_bit_equal(&info.name, &got, want);
        types.push(info.ggml_type.name());
    }
    for t in [
        "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K",
    ] {
        assert!(types.contains(&t), "fixture lacks a {t} tensor");
    }
}

#[derive(serde::Deserialize)]
struct TokenizationFixture {
    cases: Vec<TokenizationCase>,
}

#[derive(serde::Deserialize)]
struct TokenizationCase {
    text: String,
    ids: Vec<u32>,
}

#[test]
fn smollm2_gguf_loads_with_config_tokenizer_and_hf_layout() {
    let path = crate::common::default_gguf();
    let start = Instant::now();
    let m = load_gguf(&path).unwrap();
    let elapsed = start.elapsed();
    eprintln!("loaded {} in {:.2?}", path.display(), elapsed);
    assert!(elapsed.as_secs_f64() < 20.0, "loading SmolLM2 took {elapsed:.2?}");

    let c = &m.config;
    assert_eq!(c.arch, Architecture::Llama);
    assert_eq!(c.hidden_size, 576);
    assert_eq!(c.num_layers, 30);
    assert_eq!(c.num_heads, 9);
    assert_eq!(c.num_kv_heads, 3);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.vocab_size, 49152);
    assert_eq!(c.intermediate_size, 1536);
    assert_eq!(c.max_position_embeddings, 8192);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert!(c.tie_word_embeddings);
    assert!(!c.attention_bias);
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.eos_token_ids, vec![2]);
    assert_eq!(
        (m.bos_token_id, m.eos_token_id, m.add_bos_token),
        (Some(1), Some(2), false)
    );
    assert!(m.chat_template.as_deref().unwrap().contains("<|im_start|>"));

    // 3 top-level tensors (embeddings, final norm; lm_head tied) + 9 per layer.
    assert_eq!(m.tensors.len(), 2 + 9 * 30);
    assert!(!m.tensors.contains_key("lm_head.weight"));
    let shape = |n: &str| {
        m.tensors
            .get(n)
            .unwrap_or_else(|| panic!("missing {n}"))
            .shape
            .clone()
    };
    assert_eq!(shape("model.embed_tokens.weight"), vec![49152, 576]);
    assert_eq!(shape("model.layers.0.self_attn.q_proj.weight"), vec![576, 576]);
    assert_eq!(shape("model.layers.0.self_attn.k_proj.weight"), vec![192, 576]);
    assert_eq!(shape("model.layers.29.mlp.down_proj.weight"), vec![576, 1536]);
    assert_eq!(shape("model.norm.weight"), vec![576]);
    assert!(m.tensors.values().all(Tensor::all_finite));

    let text = std::fs::read_to_string(fixture("smollm2_tokenization.json")).unwrap();
    let fixture: TokenizationFixture = serde_json::from_str(&text).unwrap();
    assert!(fixture.cases.len() >= 8);
    for case in &fixture.cases {
        let enc = m.tokenizer.encode(case.text.as_str(), false).unwrap();
        assert_eq!(enc.get_ids(), case.ids.as_slice(), "encoding {:?}", case.text);
        let back = m.tokenizer.decode(&case.ids, false).unwrap();
        assert_eq!(back, case.text, "decoding {:?}", case.ids);
    }
    assert_eq!(m.tokenizer.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(m.tokenizer.decode(&[1, 4093, 2], true).unwrap(), "user");
}

#[test]
fn hf_llama_converted_to_gguf_loads_back_exactly() {
    let hf_dir = fixture("tiny_llama_hf");
    let m = load_gguf(&fixture("tiny_llama.gguf")).unwrap();

    // Every field of the config read from GGUF metadata agrees with config.json.
    let hf_config = ModelConfig::from_hf_file(&hf_dir.join("config.json")).unwrap();
    assert_eq!(m.config, hf_config);
    assert!(m.config.attention_bias && !m.config.tie_word_embeddings);
    assert_eq!(
        (m.config.num_heads, m.config.num_kv_heads, m.config.head_dim),
        (2, 1, 16)
    );

    let hf = read_safetensors(&hf_dir.join("model.safetensors"));
    let mut names: Vec<_> = m.tensors.keys().cloned().collect();
    let mut hf_names: Vec<_> = hf.keys().cloned().collect();
    names.sort();
    hf_names.sort();
    assert_eq!(names, hf_names);
    for (name, want) in &hf {
        assert_bit_equal(name, &m.tensors[name], want);
    }

    let reference = tokenizers::Tokenizer::from_file(hf_dir.join("tokenizer.json")).unwrap();
    for text in [
        "The quick brown fox jumps over the lazy dog.",
        "What is the capital of France?",
        "In 2024 there were 366 days; 12345 + 67890.",
        "Café naïve façade 日本 🙂",
        "  leading spaces,\ttabs\n\nand newlines  ",
        "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n",
        "call <tool> now<|endoftext|>",
    ] {
        let want = reference.encode(text, false).unwrap();
        let got = m.tokenizer.encode(text, false).unwrap();
        assert_eq!(got.get_ids(), want.get_ids(), "encoding {text:?}");
        assert_eq!(m.tokenizer.decode(got.get_ids(), false).unwrap(), text);
        assert_eq!(
            m.tokenizer.decode(got.get_ids(), true).unwrap(),
            reference.decode(want.get_ids(), true).unwrap(),
            "decoding {text:?} without special tokens"
        );
    }
    assert_eq!(m.tokenizer.get_vocab_size(true), m.config.vocab_size);
    assert_eq!(
        (m.bos_token_id, m.eos_token_id, m.add_bos_token),
        (Some(0), Some(2), false)
    );
    assert!(m
        .chat_template
        .as_deref()
        .unwrap()
        .contains("add_generation_prompt"));
}
