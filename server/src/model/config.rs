//! Architecture-neutral model configuration, read from HF `config.json` or GGUF metadata.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The decoder families loraplane runs. All share the Llama block; they differ in config details.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM` (Llama 2/3/3.1, SmolLM).
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM` (bias on q/k/v).
    Qwen2,
}

/// Llama 3.1 style RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    /// Overall context extension factor.
    pub factor: f32,
    /// Wavelengths longer than `original / low_freq_factor` are fully scaled.
    pub low_freq_factor: f32,
    /// Wavelengths shorter than `original / high_freq_factor` are left alone.
    pub high_freq_factor: f32,
    /// Context length the base frequencies were trained for.
    pub original_max_position_embeddings: usize,
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Decoder family.
    pub arch: Architecture,
    /// Rows of the embedding matrix.
    pub vocab_size: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// Optional llama3 frequency scaling.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// Mistral-style sliding attention window (keys within the last `w` positions).
    pub sliding_window: Option<usize>,
    /// `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub attention_bias: bool,
    /// Beginning-of-sequence token, if the model has one.
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Width of the q projection output.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of the k and v projection outputs.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Weights of the model: every projection, norm and bias, the embedding and, when untied,
    /// the lm_head.
    pub fn num_parameters(&self) -> usize {
        let (h, qd, kvd) = (self.hidden_size, self.q_dim(), self.kv_dim());
        let biases = if self.attention_bias {
            qd + 2 * kvd + if self.arch == Architecture::Qwen2 { 0 } else { h }
        } else {
            0
        };
        let per_layer = h * (qd + 2 * kvd) + qd * h + 3 * h * self.intermediate_size + 2 * h + biases;
        let heads = if self.tie_word_embeddings { 1 } else { 2 };
        per_layer * self.num_layers + heads * self.vocab_size * h + h
    }

    /// Bytes of keys and values one token takes in the KV cache, over every layer, in
    /// `elem_bytes`-byte elements.
    pub fn kv_bytes_per_token(&self, elem_bytes: usize) -> usize {
        2 * self.num_layers * self.kv_dim() * elem_bytes
    }

    /// A two-layer Llama of width 8 (vocab 16, intermediate 12, two heads, one kv head), for
    /// unit tests.
    #[cfg(test)]
    pub(crate) fn tiny_for_tests() -> Self {
        Self::from_hf_json(
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":16,"hidden_size":8,"intermediate_size":12,
            "num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1}"#,
        )
        .expect("valid test config")
    }

    /// Reads `config.json` from an HF model directory.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_hf_json(&text).map_err(|e| Error::Model(format!("{}: {e}", path.display())))
    }

    /// Parses the text of an HF `config.json`.
    pub fn from_hf_json(text: &str) -> std::result::Result<Self, String> {
        let raw: HfConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        raw.into_config()
    }
}

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f32,
    #[serde(default = "default_theta")]
    rope_theta: f32,
    rope_scaling: Option<serde_json::Value>,
    // transformers >= 5 may nest rope settings under `rope_parameters`.
    rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    attention_bias: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<serde_json::Value>,
    mlp_bias: Option<bool>,
}

fn default_eps() -> f32 {
    1e-6
}
fn default_theta() -> f32 {
    10000.0
}
fn default_max_pos() -> usize {
    2048
}

/// Accepts `eos_token_id` as a number or a list of numbers.
pub(crate) fn parse_token_ids(v: &serde_json::Value) -> Vec<u32> {
    match v {
        serde_json::Value::Number(n) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_u64()).map(|n| n as u32).collect(),
        _ => Vec::new(),
    }
}

impl HfConfig {
    fn into_config(self) -> std::result::Result<ModelConfig, String> {
        let arch_name = self
            .architectures
            .first()
            .cloned()
            .or_else(|| self.model_type.clone())
            .unwrap_or_default();
        let arch = match arch_name.as_str() {
            "LlamaForCausalLM" | "llama" => Architecture::Llama,
            "MistralForCausalLM" | "mistral" => Architecture::Mistral,
            "Qwen2ForCausalLM" | "qwen2" => Architecture::Qwen2,
            other => {
                return Err(format!(
                    "unsupported architecture {other:?} (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
                ))
            }
        };
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(format!("unsupported hidden_act {act:?} (only silu)"));
            }
        }
        if self.mlp_bias == Some(true) {
            return Err("mlp_bias=true is not supported".into());
        }
        if self.num_attention_heads == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return Err("hidden_size, num_attention_heads and num_hidden_layers must be positive".into());
        }
        let num_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if num_kv_heads == 0 || !self.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({num_kv_heads})",
                self.num_attention_heads
            ));
        }
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads);
        if !head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {head_dim} must be even for RoPE"));
        }
        let mut rope_theta = self.rope_theta;
        let mut scaling_value = self.rope_scaling.clone();
        if let Some(p) = &self.rope_parameters {
            if let Some(t) = p.get("rope_theta").and_then(|t| t.as_f64()) {
                rope_theta = t as f32;
            }
            if scaling_value.is_none() {
                scaling_value = Some(p.clone());
            }
        }
        let rope_scaling = match scaling_value {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => parse_rope_scaling(&v)?,
        };
        let attention_bias = self.attention_bias.unwrap_or(arch == Architecture::Qwen2);
        Ok(ModelConfig {
            arch,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            // Qwen2 configs carry a window but only use it with use_sliding_window.
            sliding_window: match arch {
                Architecture::Qwen2 if self.use_sliding_window != Some(true) => None,
                _ => self.sliding_window,
            },
            tie_word_embeddings: self.tie_word_embeddings,
            attention_bias,
            bos_token_id: self.bos_token_id,
            eos_token_ids: self
                .eos_token_id
                .as_ref()
                .map(parse_token_ids)
                .unwrap_or_default(),
        })
    }
}

fn parse_rope_scaling(v: &serde_json::Value) -> std::result::Result<Option<Llama3RopeScaling>, String> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let get = |k: &str| num(k).ok_or_else(|| format!("rope_scaling llama3 needs {k}"));
            Ok(Some(Llama3RopeScaling {
                factor: get("factor")? as f32,
                low_freq_factor: get("low_freq_factor")? as f32,
                high_freq_factor: get("high_freq_factor")? as f32,
                original_max_position_embeddings: get("original_max_position_embeddings")? as usize,
            }))
        }
        other => Err(format!(
            "unsupported rope_scaling type {other:?} (supported: llama3)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama31_config_with_rope_scaling() {
        let c = ModelConfig::from_hf_json(
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":128,"hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "rope_theta":500000.0,"eos_token_id":[1,2],
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":8192}}"#,
        )
        .unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.kv_dim(), 32);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert_eq!(c.rope_scaling.unwrap().factor, 8.0);
    }

    #[test]
    fn refuses_unknown_architecture_and_bad_gqa() {
        let e = ModelConfig::from_hf_json(
            r#"{"architectures":["GPT2LMHeadModel"],"vocab_size":1,"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2}"#,
        )
        .unwrap_err();
        assert!(e.contains("GPT2LMHeadModel"), "{e}");
        let e = ModelConfig::from_hf_json(
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":1,"hidden_size":12,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":3,"num_key_value_heads":2}"#,
        )
        .unwrap_err();
        assert!(e.contains("multiple"), "{e}");
    }

    #[test]
    fn qwen2_defaults_to_qkv_bias() {
        let c = ModelConfig::from_hf_json(
            r#"{"architectures":["Qwen2ForCausalLM"],"vocab_size":16,"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2,"tie_word_embeddings":true}"#,
        )
        .unwrap();
        assert!(c.attention_bias && c.tie_word_embeddings);
    }
}
