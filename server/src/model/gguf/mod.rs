//! GGUF model files: parsing, dequantization and conversion to the HF layout.
//!
//! [`load_gguf`] reads a llama-architecture GGUF (as written by llama.cpp's converter) and returns
//! what the HF safetensors loader would: a [`ModelConfig`], f32 tensors under their HF names and in
//! the HF layout, and a tokenizer. In particular the q/k projection rows, which llama.cpp's
//! converter reorders for its rotary embedding, are put back in HF order, so LoRA adapters trained
//! against the HF weights apply unchanged.
//!
//! The lower layers are public for tools and tests: [`GgufFile`] (container parsing, memory-mapped)
//! and [`dequant`] (ggml encodings to f32).

pub mod dequant;
pub mod parse;
pub mod tokenizer;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use rayon::prelude::*;

pub use parse::{GgmlType, GgufFile, TensorInfo, Value};

use crate::error::Result;
use crate::model::config::{Architecture, ModelConfig};
use crate::tensor::Tensor;

/// A model loaded from a GGUF file, in the same form as one loaded from an HF directory.
pub struct GgufModel {
    /// Shape and hyper-parameters, from the `llama.*` metadata.
    pub config: ModelConfig,
    /// Every weight as f32, under its HF name (`model.layers.0.self_attn.q_proj.weight`) and in
    /// the HF layout (a linear weight is `[out_features, in_features]`).
    pub tensors: HashMap<String, Tensor>,
    /// The tokenizer built from the file's vocabulary.
    pub tokenizer: tokenizers::Tokenizer,
    /// `tokenizer.chat_template`, if the file has one.
    pub chat_template: Option<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_token_id: Option<u32>,
    /// Whether prompts should start with BOS (`tokenizer.ggml.add_bos_token`, default false).
    pub add_bos_token: bool,
}

impl fmt::Debug for GgufModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufModel")
            .field("config", &self.config)
            .field("tensors", &self.tensors.len())
            .field("vocab", &self.tokenizer.get_vocab_size(true))
            .field("chat_template", &self.chat_template.as_ref().map(|t| t.len()))
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_id", &self.eos_token_id)
            .field("add_bos_token", &self.add_bos_token)
            .finish()
    }
}

/// Loads a llama-architecture GGUF file: config, weights dequantized to f32 under HF names, and
/// tokenizer.
pub fn load_gguf(path: &Path) -> Result<GgufModel> {
    let file = GgufFile::open(path)?;
    let tokenizer = tokenizer::build_tokenizer(&file)?;
    let vocab_size = tokenizer.get_vocab_size(true);
    let bos_token_id = token_id(&file, "tokenizer.ggml.bos_token_id", vocab_size)?;
    let eos_token_id = token_id(&file, "tokenizer.ggml.eos_token_id", vocab_size)?;
    let eot_token_id = token_id(&file, "tokenizer.ggml.eot_token_id", vocab_size)?;
    let chat_template = match file.get("tokenizer.chat_template") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => {
            return Err(file.error(format_args!(
                "tokenizer.chat_template must be a string, found {}",
                v.type_name()
            )))
        }
    };
    let add_bos_token = match file.get("tokenizer.ggml.add_bos_token") {
        None => false,
        Some(v) => v.as_bool().ok_or_else(|| {
            file.error(format_args!(
                "tokenizer.ggml.add_bos_token must be a bool, found {}",
                v.type_name()
            ))
        })?,
    };

    let mut eos_token_ids: Vec<u32> = eos_token_id.into_iter().collect();
    if let Some(eot) = eot_token_id {
        if !eos_token_ids.contains(&eot) {
            eos_token_ids.push(eot);
        }
    }
    let config = llama_config(&file, vocab_size, bos_token_id, eos_token_ids)?;
    let plan = plan_tensors(&file, &config)?;

    let tensors = plan
        .into_par_iter()
        .map(|(info, hf_name, permute_heads)| {
            let mut t = file.dequantize(info)?;
            if let Some(n_head) = permute_heads {
                t = unpermute_qk(&t, n_head)
                    .map_err(|e| file.error(format_args!("tensor {}: {e}", info.name)))?;
            }
            Ok((hf_name, t))
        })
        .collect::<Result<HashMap<_, _>>>()?;

    Ok(GgufModel {
        config,
        tensors,
        tokenizer,
        chat_template,
        bos_token_id,
        eos_token_id,
        add_bos_token,
    })
}

fn token_id(file: &GgufFile, key: &str, vocab_size: usize) -> Result<Option<u32>> {
    let Some(v) = file.get(key) else {
        return Ok(None);
    };
    match v.as_u64() {
        Some(id) if (id as usize) < vocab_size => Ok(Some(id as u32)),
        _ => Err(file.error(format_args!(
            "{key} = {v:?} is not a token id (vocabulary of {vocab_size})"
        ))),
    }
}

fn required_u64(file: &GgufFile, key: &str) -> Result<u64> {
    optional_u64(file, key)?.ok_or_else(|| file.error(format_args!("missing metadata key {key}")))
}

fn optional_u64(file: &GgufFile, key: &str) -> Result<Option<u64>> {
    match file.get(key) {
        None => Ok(None),
        Some(Value::Array(_)) => Err(file.error(format_args!(
            "{key} is an array (per-layer values are not supported)"
        ))),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| file.error(format_args!("{key} must be a non-negative integer, found {v:?}"))),
    }
}

fn optional_f32(file: &GgufFile, key: &str) -> Result<Option<f32>> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(|x| Some(x as f32))
            .ok_or_else(|| file.error(format_args!("{key} must be a number, found {v:?}"))),
    }
}

fn llama_config(
    file: &GgufFile,
    vocab_size: usize,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
) -> Result<ModelConfig> {
    let arch = match file.get("general.architecture") {
        None => return Err(file.error("missing metadata key general.architecture")),
        Some(v) => v
            .as_str()
            .ok_or_else(|| file.error(format_args!("general.architecture must be a string, found {v:?}")))?,
    };
    if arch != "llama" {
        return Err(file.error(format_args!(
            "GGUF architecture {arch:?} is not supported (only \"llama\")"
        )));
    }
    let key = |k: &str| format!("llama.{k}");
    let usize_of = |k: &str| -> Result<usize> { Ok(required_u64(file, &key(k))? as usize) };
    if let Some(n) = optional_u64(file, &key("expert_count"))? {
        if n > 0 {
            return Err(file.error(format_args!(
                "mixture-of-experts llama models ({n} experts) are not supported"
            )));
        }
    }
    if file.tensor_info("rope_freqs.weight").is_some() {
        return Err(file.error(
            "the file has a rope_freqs.weight tensor (llama3-style RoPE frequency scaling baked in by llama.cpp); this is not supported yet",
        ));
    }
    match file.get(&key("rope.scaling.type")) {
        None => {}
        Some(Value::String(s)) if s == "none" => {}
        Some(v) => {
            return Err(file.error(format_args!(
                "RoPE scaling llama.rope.scaling.type = {v:?} is not supported"
            )))
        }
    }

    let hidden_size = usize_of("embedding_length")?;
    let num_layers = usize_of("block_count")?;
    let intermediate_size = usize_of("feed_forward_length")?;
    let num_heads = usize_of("attention.head_count")?;
    let num_kv_heads = optional_u64(file, &key("attention.head_count_kv"))?.map_or(num_heads, |n| n as usize);
    let max_position_embeddings = usize_of("context_length")?;
    let rms_norm_eps = optional_f32(file, &key("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| file.error("missing metadata key llama.attention.layer_norm_rms_epsilon"))?;
    let rope_theta = optional_f32(file, &key("rope.freq_base"))?.unwrap_or(10000.0);
    if hidden_size == 0 || num_layers == 0 || num_heads == 0 || intermediate_size == 0 {
        return Err(file.error(
            "llama.embedding_length, block_count, feed_forward_length and attention.head_count must be positive",
        ));
    }
    if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
        return Err(file.error(format_args!(
            "llama.attention.head_count ({num_heads}) must be a multiple of llama.attention.head_count_kv ({num_kv_heads})"
        )));
    }
    let key_length = optional_u64(file, &key("attention.key_length"))?.map(|n| n as usize);
    let value_length = optional_u64(file, &key("attention.value_length"))?.map(|n| n as usize);
    let rope_dims = optional_u64(file, &key("rope.dimension_count"))?.map(|n| n as usize);
    let head_dim = key_length.or(rope_dims).unwrap_or(hidden_size / num_heads);
    if let Some(v) = value_length {
        if v != head_dim {
            return Err(file.error(format_args!(
                "llama.attention.value_length {v} differs from the key length {head_dim} (not supported)"
            )));
        }
    }
    if let Some(r) = rope_dims {
        if r != head_dim {
            return Err(file.error(format_args!(
                "llama.rope.dimension_count {r} differs from the head size {head_dim} (partial RoPE is not supported)"
            )));
        }
    }
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(file.error(format_args!(
            "head size {head_dim} must be even and positive for RoPE"
        )));
    }
    if let Some(n) = optional_u64(file, &key("vocab_size"))? {
        if n as usize != vocab_size {
            return Err(file.error(format_args!(
                "llama.vocab_size {n} differs from the {vocab_size} tokens of the tokenizer"
            )));
        }
    }
    Ok(ModelConfig {
        arch: Architecture::Llama,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps,
        rope_theta,
        rope_scaling: None,
        max_position_embeddings,
        sliding_window: None,
        tie_word_embeddings: file.tensor_info("output.weight").is_none(),
        attention_bias: file.tensor_info("blk.0.attn_q.bias").is_some(),
        bos_token_id,
        eos_token_ids,
    })
}

/// Which q/k head count, if any, a tensor's rows were permuted with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Permute {
    None,
    Q,
    K,
}

/// The HF name of a llama GGUF tensor name, and whether its rows need un-permuting.
fn hf_name(gguf: &str) -> Option<(String, Permute)> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = top {
        return Some((n.to_string(), Permute::None));
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty()
        || !layer.bytes().all(|c| c.is_ascii_digit())
        || (layer.len() > 1 && layer.starts_with('0'))
    {
        return None;
    }
    let (module, param) = rest.rsplit_once('.')?;
    let (hf, permute) = match module {
        "attn_norm" => ("input_layernorm", Permute::None),
        "ffn_norm" => ("post_attention_layernorm", Permute::None),
        "attn_q" => ("self_attn.q_proj", Permute::Q),
        "attn_k" => ("self_attn.k_proj", Permute::K),
        "attn_v" => ("self_attn.v_proj", Permute::None),
        "attn_output" => ("self_attn.o_proj", Permute::None),
        "ffn_gate" => ("mlp.gate_proj", Permute::None),
        "ffn_up" => ("mlp.up_proj", Permute::None),
        "ffn_down" => ("mlp.down_proj", Permute::None),
        _ => return None,
    };
    let norm = matches!(module, "attn_norm" | "ffn_norm");
    match param {
        "weight" => {}
        "bias" if !norm => {}
        _ => return None,
    }
    Some((format!("model.layers.{layer}.{hf}.{param}"), permute))
}

/// Maps every tensor to its HF name, checks names and shapes against `config`, and returns
/// `(info, hf_name, q/k head count to un-permute with)`.
fn plan_tensors<'a>(
    file: &'a GgufFile,
    config: &ModelConfig,
) -> Result<Vec<(&'a TensorInfo, String, Option<usize>)>> {
    let mut expected: HashMap<String, Vec<usize>> = HashMap::new();
    let (h, q, kv, i, v) = (
        config.hidden_size,
        config.q_dim(),
        config.kv_dim(),
        config.intermediate_size,
        config.vocab_size,
    );
    expected.insert("model.embed_tokens.weight".into(), vec![v, h]);
    expected.insert("model.norm.weight".into(), vec![h]);
    if !config.tie_word_embeddings {
        expected.insert("lm_head.weight".into(), vec![v, h]);
    }
    for l in 0..config.num_layers {
        let p = format!("model.layers.{l}.");
        let mut add = |n: &str, s: Vec<usize>| expected.insert(format!("{p}{n}"), s);
        add("input_layernorm.weight", vec![h]);
        add("post_attention_layernorm.weight", vec![h]);
        add("self_attn.q_proj.weight", vec![q, h]);
        add("self_attn.k_proj.weight", vec![kv, h]);
        add("self_attn.v_proj.weight", vec![kv, h]);
        add("self_attn.o_proj.weight", vec![h, q]);
        add("mlp.gate_proj.weight", vec![i, h]);
        add("mlp.up_proj.weight", vec![i, h]);
        add("mlp.down_proj.weight", vec![h, i]);
        if config.attention_bias {
            add("self_attn.q_proj.bias", vec![q]);
            add("self_attn.k_proj.bias", vec![kv]);
            add("self_attn.v_proj.bias", vec![kv]);
        }
    }
    // Optional tensors: an output projection bias.
    let optional: HashMap<String, Vec<usize>> = (0..config.num_layers)
        .map(|l| (format!("model.layers.{l}.self_attn.o_proj.bias"), vec![h]))
        .collect();

    let mut plan = Vec::with_capacity(file.tensors.len());
    for info in &file.tensors {
        let (name, permute) = hf_name(&info.name)
            .ok_or_else(|| file.error(format_args!("unexpected tensor {:?} in a llama model", info.name)))?;
        let want = expected
            .remove(&name)
            .or_else(|| optional.get(&name).cloned())
            .ok_or_else(|| {
                file.error(format_args!(
                    "unexpected tensor {:?} ({name}) for a llama model with {} layers{}",
                    info.name,
                    config.num_layers,
                    if name.ends_with("bias") {
                        " and no q bias in layer 0"
                    } else {
                        ""
                    }
                ))
            })?;
        let shape = info.shape();
        if shape != want {
            return Err(file.error(format_args!(
                "tensor {:?} ({name}) has shape {shape:?}, expected {want:?} from the metadata",
                info.name
            )));
        }
        if !dequant::is_supported(info.ggml_type) {
            return Err(file.error(format_args!(
                "tensor {:?} has ggml type {} which is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)",
                info.name, info.ggml_type
            )));
        }
        let heads = match permute {
            Permute::None => None,
            Permute::Q => Some(config.num_heads),
            Permute::K => Some(config.num_kv_heads),
        };
        plan.push((info, name, heads));
    }
    if let Some(missing) = expected.keys().min() {
        return Err(file.error(format_args!(
            "missing tensor {missing} ({} expected tensors missing in all)",
            expected.len()
        )));
    }
    Ok(plan)
}

/// Shared index math of [`permute_qk`] and [`unpermute_qk`]: for each HF row, the GGUF row holding it.
fn qk_row_map(rows: usize, n_head: usize) -> std::result::Result<Vec<usize>, String> {
    if n_head == 0 || !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) {
        return Err(format!(
            "{rows} rows cannot be split into {n_head} heads of even size"
        ));
    }
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    // HF row `h*hd + i*half + j` (i: which rotary half, j: position in it) is GGUF row `h*hd + 2j + i`.
    Ok((0..rows)
        .map(|r| {
            let (h, k) = (r / head_dim, r % head_dim);
            let (i, j) = (k / half, k % half);
            h * head_dim + 2 * j + i
        })
        .collect())
}

fn gather_rows(t: &Tensor, src_of: impl Fn(usize) -> usize + Sync) -> Tensor {
    let rows = t.shape.first().copied().unwrap_or(1);
    let cols = if t.shape.is_empty() {
        1
    } else {
        t.shape[1..].iter().product()
    };
    let mut data = vec![0f32; t.data.len()];
    if cols > 0 {
        data.par_chunks_mut(cols).enumerate().for_each(|(r, out)| {
            let s = src_of(r);
            out.copy_from_slice(&t.data[s * cols..(s + 1) * cols]);
        });
    }
    debug_assert_eq!(data.len(), rows * cols);
    Tensor::new(t.shape.clone(), data)
}

/// Undoes llama.cpp's q/k row permutation: `t` (rows = output features; a weight `[out, in]` or a
/// bias `[out]`) in GGUF order, `n_head` heads (query heads for q, key/value heads for k).
///
/// llama.cpp's HF-to-GGUF converter views the rows of each head as `[2, head_dim / 2]` (the two
/// rotary halves) and transposes that to `[head_dim / 2, 2]`, interleaving the halves.
pub fn unpermute_qk(t: &Tensor, n_head: usize) -> std::result::Result<Tensor, String> {
    let rows = t.shape.first().copied().ok_or("cannot permute a scalar")?;
    let map = qk_row_map(rows, n_head)?;
    Ok(gather_rows(t, |hf_row| map[hf_row]))
}

/// Applies llama.cpp's q/k row permutation (HF order to GGUF order); the inverse of [`unpermute_qk`].
pub fn permute_qk(t: &Tensor, n_head: usize) -> std::result::Result<Tensor, String> {
    let rows = t.shape.first().copied().ok_or("cannot permute a scalar")?;
    let map = qk_row_map(rows, n_head)?;
    let mut inverse = vec![0; rows];
    for (hf_row, &gguf_row) in map.iter().enumerate() {
        inverse[gguf_row] = hf_row;
    }
    Ok(gather_rows(t, |gguf_row| inverse[gguf_row]))
}

#[cfg(test)]
mod tests {
    use super::parse::tests::Builder;
    use super::*;

    #[test]
    fn permutation_matches_llama_cpp_and_round_trips() {
        // Two heads of size 4, two columns: HF rows are [h0: a0 a1 b0 b1, h1: ...] where a/b are
        // the rotary halves; llama.cpp interleaves them to [a0 b0 a1 b1].
        let rows = 8;
        let cols = 2;
        let hf = Tensor::new(vec![rows, cols], (0..rows * cols).map(|x| x as f32).collect());
        let g = permute_qk(&hf, 2).unwrap();
        let order: Vec<f32> = (0..rows).map(|r| g.row(r)[0] / cols as f32).collect();
        assert_eq!(order, vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        assert_eq!(unpermute_qk(&g, 2).unwrap(), hf);

        // Larger, non-symmetric: 3 heads of 8, and a 1-D bias.
        let hf = Tensor::new(vec![24, 5], (0..120).map(|x| (x * 7 % 31) as f32).collect());
        for heads in [1, 3] {
            let g = permute_qk(&hf, heads).unwrap();
            assert_ne!(g, hf);
            assert_eq!(unpermute_qk(&g, heads).unwrap(), hf);
        }
        let bias = Tensor::new(vec![24], (0..24).map(|x| x as f32).collect());
        assert_eq!(unpermute_qk(&permute_qk(&bias, 3).unwrap(), 3).unwrap(), bias);
        assert!(unpermute_qk(&bias, 5).is_err());
        assert!(unpermute_qk(&Tensor::new(vec![6, 1], vec![0.0; 6]), 2).is_err());
    }

    #[test]
    fn maps_names_to_hf() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight", Permute::None),
            ("output.weight", "lm_head.weight", Permute::None),
            ("output_norm.weight", "model.norm.weight", Permute::None),
            (
                "blk.12.attn_norm.weight",
                "model.layers.12.input_layernorm.weight",
                Permute::None,
            ),
            (
                "blk.0.ffn_norm.weight",
                "model.layers.0.post_attention_layernorm.weight",
                Permute::None,
            ),
            (
                "blk.3.attn_q.weight",
                "model.layers.3.self_attn.q_proj.weight",
                Permute::Q,
            ),
            (
                "blk.3.attn_q.bias",
                "model.layers.3.self_attn.q_proj.bias",
                Permute::Q,
            ),
            (
                "blk.3.attn_k.weight",
                "model.layers.3.self_attn.k_proj.weight",
                Permute::K,
            ),
            (
                "blk.3.attn_v.bias",
                "model.layers.3.self_attn.v_proj.bias",
                Permute::None,
            ),
            (
                "blk.3.attn_output.weight",
                "model.layers.3.self_attn.o_proj.weight",
                Permute::None,
            ),
            (
                "blk.1.ffn_gate.weight",
                "model.layers.1.mlp.gate_proj.weight",
                Permute::None,
            ),
            (
                "blk.1.ffn_up.weight",
                "model.layers.1.mlp.up_proj.weight",
                Permute::None,
            ),
            (
                "blk.1.ffn_down.weight",
                "model.layers.1.mlp.down_proj.weight",
                Permute::None,
            ),
        ];
        for (g, hf, p) in cases {
            assert_eq!(hf_name(g), Some((hf.to_string(), p)), "{g}");
        }
        for bad in [
            "rope_freqs.weight",
            "blk.x.attn_q.weight",
            "blk.01.attn_q.weight",
            "blk.0.attn_norm.bias",
            "blk.0.ffn_gate_inp.weight",
        ] {
            assert_eq!(hf_name(bad), None, "{bad}");
        }
    }

    /// A complete tiny llama GGUF: hidden 8, 2 heads of 4, 1 kv head, 1 layer, intermediate 16.
    fn tiny_llama() -> Builder {
        let mut b = Builder::new();
        b.kv_str("general.architecture", "llama")
            .kv_u32("llama.block_count", 1)
            .kv_u32("llama.context_length", 64)
            .kv_u32("llama.embedding_length", 8)
            .kv_u32("llama.feed_forward_length", 16)
            .kv_u32("llama.attention.head_count", 2)
            .kv_u32("llama.attention.head_count_kv", 1)
            .kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
            .kv_str("tokenizer.ggml.model", "gpt2")
            .kv_str_array("tokenizer.ggml.tokens", &["a", "b", "ab", "<e>"])
            .kv_i32_array("tokenizer.ggml.token_type", &[1, 1, 1, 3])
            .kv_str_array("tokenizer.ggml.merges", &["a b"])
            .kv_u32("tokenizer.ggml.eos_token_id", 3);
        let f = |n: usize| (0..n).map(|x| x as f32).collect::<Vec<_>>();
        b.f32_tensor("token_embd.weight", &[8, 4], &f(32))
            .f32_tensor("output_norm.weight", &[8], &f(8))
            .f32_tensor("blk.0.attn_norm.weight", &[8], &f(8))
            .f32_tensor("blk.0.ffn_norm.weight", &[8], &f(8))
            .f32_tensor("blk.0.attn_q.weight", &[8, 8], &f(64))
            .f32_tensor("blk.0.attn_k.weight", &[8, 4], &f(32))
            .f32_tensor("blk.0.attn_v.weight", &[8, 4], &f(32))
            .f32_tensor("blk.0.attn_output.weight", &[8, 8], &f(64))
            .f32_tensor("blk.0.ffn_gate.weight", &[8, 16], &f(128))
            .f32_tensor("blk.0.ffn_up.weight", &[8, 16], &f(128))
            .f32_tensor("blk.0.ffn_down.weight", &[16, 8], &f(128));
        b
    }

    fn load(b: &Builder) -> Result<GgufModel> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, b.build()).unwrap();
        load_gguf(&path)
    }

    #[test]
    fn loads_a_tiny_llama() {
        let m = load(&tiny_llama()).unwrap();
        let c = &m.config;
        assert_eq!(
            (
                c.hidden_size,
                c.num_heads,
                c.num_kv_heads,
                c.head_dim,
                c.vocab_size
            ),
            (8, 2, 1, 4, 4)
        );
        assert_eq!(c.rope_theta, 10000.0);
        assert!(c.tie_word_embeddings && !c.attention_bias);
        assert_eq!(c.eos_token_ids, vec![3]);
        assert_eq!(m.tensors.len(), 11);
        assert!(!m.add_bos_token);
        let k = &m.tensors["model.layers.0.self_attn.k_proj.weight"];
        assert_eq!(k.shape, vec![4, 8]);
        // GGUF rows [r0 r1 r2 r3] are HF rows [r0 r2 r1 r3] for one head of 4.
        assert_eq!(k.row(1)[0], 16.0);
        assert_eq!(m.tensors["model.layers.0.self_attn.v_proj.weight"].row(1)[0], 8.0);
    }

    fn load_err(b: &Builder) -> String {
        let e = load(b).unwrap_err().to_string();
        assert!(e.contains("m.gguf"), "error does not name the file: {e}");
        e
    }

    #[test]
    fn refuses_unsupported_models() {
        let mut b = Builder::new();
        b.kv_str("general.architecture", "qwen2")
            .kv_str("tokenizer.ggml.model", "gpt2")
            .kv_str_array("tokenizer.ggml.tokens", &["a"])
            .kv_str_array("tokenizer.ggml.merges", &[]);
        let e = load_err(&b);
        assert!(e.contains("\"qwen2\"") && e.contains("not supported"), "{e}");

        let mut b = tiny_llama();
        b.f32_tensor("rope_freqs.weight", &[2], &[1.0, 1.0]);
        assert!(load_err(&b).contains("rope_freqs"));

        let mut b = tiny_llama();
        b.f32_tensor("blk.0.mystery.weight", &[2], &[1.0, 1.0]);
        assert!(load_err(&b).contains("unexpected tensor \"blk.0.mystery.weight\""));

        let mut b = tiny_llama();
        b.f32_tensor("blk.1.attn_norm.weight", &[8], &[0.0; 8]);
        assert!(load_err(&b).contains("unexpected tensor \"blk.1.attn_norm.weight\""));

        let mut b = tiny_llama();
        b.kv_u32("llama.expert_count", 8);
        assert!(load_err(&b).contains("mixture-of-experts"));
    }

    #[test]
    fn refuses_bad_shapes_types_and_missing_tensors() {
        let mut b = tiny_llama();
        b.kv_u32("llama.vocab_size", 5);
        assert!(load_err(&b).contains("llama.vocab_size 5"));

        let mut b = Builder::new();
        let full = tiny_llama().build();
        let f = GgufFile::from_bytes(full, Path::new("x")).unwrap();
        for (k, v) in &f.metadata {
            if k != "llama.feed_forward_length" {
                copy_kv(&mut b, k, v);
            }
        }
        b.kv_u32("llama.feed_forward_length", 12);
        for t in &f.tensors {
            b.tensor(&t.name, &t.dims, t.ggml_type.id(), f.tensor_bytes(t).to_vec());
        }
        let e = load_err(&b);
        assert!(
            e.contains("ffn_gate.weight") && e.contains("expected [12, 8]"),
            "{e}"
        );

        // Missing tensor: drop the last one.
        let mut b = Builder::new();
        for (k, v) in &f.metadata {
            copy_kv(&mut b, k, v);
        }
        for t in &f.tensors[..f.tensors.len() - 1] {
            b.tensor(&t.name, &t.dims, t.ggml_type.id(), f.tensor_bytes(t).to_vec());
        }
        assert!(load_err(&b).contains("missing tensor model.layers.0.mlp.down_proj.weight"));

        // An unsupported quantization, named with its tensor.
        let mut b = Builder::new();
        for (k, v) in &f.metadata {
            copy_kv(&mut b, k, v);
        }
        for t in &f.tensors {
            if t.name == "blk.0.ffn_down.weight" {
                b.tensor(&t.name, &t.dims, 28, vec![0; 128 * 8]);
            } else {
                b.tensor(&t.name, &t.dims, t.ggml_type.id(), f.tensor_bytes(t).to_vec());
            }
        }
        let e = load_err(&b);
        assert!(
            e.contains("blk.0.ffn_down.weight") && e.contains("F64") && e.contains("not supported"),
            "{e}"
        );
    }

    /// Re-encodes the simple metadata values the tiny model uses.
    fn copy_kv(b: &mut Builder, k: &str, v: &Value) {
        match v {
            Value::U32(x) => b.kv_u32(k, *x),
            Value::F32(x) => b.kv_f32(k, *x),
            Value::String(s) => b.kv_str(k, s),
            Value::Array(a) if a.iter().all(|x| x.as_str().is_some()) && !a.is_empty() => {
                let items: Vec<&str> = a.iter().map(|x| x.as_str().unwrap()).collect();
                b.kv_str_array(k, &items)
            }
            Value::Array(a) => {
                let items: Vec<i32> = a.iter().map(|x| x.as_i64().unwrap() as i32).collect();
                b.kv_i32_array(k, &items)
            }
            other => panic!("copy_kv: {other:?}"),
        };
    }
}
