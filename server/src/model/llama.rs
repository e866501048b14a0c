//! The Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2) over a mixed batch of sequences.
//!
//! One forward pass takes any number of sequences, each with its own new tokens (a prefill chunk
//! or one decode token), its own KV-cache blocks and its own LoRA adapter or none. All rows share
//! the base GEMMs; each adapter adds its low-rank delta on its own contiguous segment of rows
//! (the SGMV scheme of Punica/S-LoRA: a shrink `x Aᵀ` and an expand `· Bᵀ` per segment), so the
//! cost of many adapters is one base pass plus thin per-segment products.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::adapter::{LoraAdapter, LoraTarget};
use crate::backend::cpu;
use crate::engine::{KvCache, SeqCache};
use crate::error::{Error, Result};
use crate::model::{Architecture, ModelConfig};
use crate::tensor::Tensor;

/// Which logits a sequence wants back from a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsWanted {
    /// None (a prefill chunk that is not the last).
    None,
    /// The last new token's (the next-token distribution).
    Last,
    /// Every new token's (prompt log-probs).
    All,
}

/// One sequence's share of a forward pass.
pub struct SeqInput<'a> {
    /// New tokens to run; their positions start at `cache.len`.
    pub tokens: &'a [u32],
    /// The sequence's cache blocks, reserved for `cache.len + tokens.len()` tokens.
    pub cache: &'a SeqCache,
    /// The adapter this sequence runs with; `None` is the base model.
    pub adapter: Option<&'a LoraAdapter>,
    /// Which logits to return.
    pub logits: LogitsWanted,
}

/// A linear layer: weight `[out, in]` and optional bias.
pub(crate) struct Linear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Vec<f32>>,
}

pub(crate) struct Block {
    pub(crate) input_norm: Vec<f32>,
    /// q, k and v stacked along the output dimension: `[q_dim + 2 kv_dim, hidden]`.
    pub(crate) qkv: Linear,
    pub(crate) o: Linear,
    pub(crate) post_norm: Vec<f32>,
    /// gate and up stacked: `[2 * intermediate, hidden]`.
    pub(crate) gate_up: Linear,
    pub(crate) down: Linear,
}

/// A loaded Llama-family model, f32 on the host.
pub struct LlamaModel {
    config: ModelConfig,
    pub(crate) embed: Tensor,
    pub(crate) blocks: Vec<Block>,
    pub(crate) norm: Vec<f32>,
    /// `None` when the output head is tied to the embedding.
    pub(crate) lm_head: Option<Tensor>,
    pub(crate) inv_freq: Vec<f32>,
}

/// A run of consecutive rows that use the same adapter.
struct Segment<'a> {
    start: usize,
    len: usize,
    adapter: &'a LoraAdapter,
}

impl LlamaModel {
    /// Builds the model from HF-named tensors (as the safetensors and GGUF loaders produce).
    pub fn from_tensors(config: ModelConfig, mut tensors: HashMap<String, Tensor>) -> Result<Self> {
        let c = &config;
        let take_opt =
            |tensors: &mut HashMap<String, Tensor>, name: &str, shape: &[usize]| -> Result<Option<Tensor>> {
                match tensors.remove(name) {
                    Some(t) if t.shape != shape => Err(Error::Model(format!(
                        "{name}: shape {:?}, expected {shape:?}",
                        t.shape
                    ))),
                    t => Ok(t),
                }
            };
        let mut take = |name: &str, shape: &[usize]| -> Result<Tensor> {
            take_opt(&mut tensors, name, shape)?.ok_or_else(|| Error::Model(format!("missing tensor {name}")))
        };
        let h = c.hidden_size;
        let embed = take("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let mut bias = |name: &str, n: usize| -> Result<Option<Vec<f32>>> {
                if c.attention_bias {
                    Ok(Some(take(&format!("{p}.self_attn.{name}.bias"), &[n])?.data))
                } else {
                    Ok(None)
                }
            };
            let (qb, kb, vb) = (
                bias("q_proj", c.q_dim())?,
                bias("k_proj", c.kv_dim())?,
                bias("v_proj", c.kv_dim())?,
            );
            let q = take(&format!("{p}.self_attn.q_proj.weight"), &[c.q_dim(), h])?;
            let k = take(&format!("{p}.self_attn.k_proj.weight"), &[c.kv_dim(), h])?;
            let v = take(&format!("{p}.self_attn.v_proj.weight"), &[c.kv_dim(), h])?;
            let o = take(&format!("{p}.self_attn.o_proj.weight"), &[h, c.q_dim()])?;
            // Llama checkpoints with attention_bias also bias o_proj; Qwen2 does not.
            let o_bias = if c.attention_bias && c.arch != Architecture::Qwen2 {
                Some(take(&format!("{p}.self_attn.o_proj.bias"), &[h])?.data)
            } else {
                None
            };
            let gate = take(&format!("{p}.mlp.gate_proj.weight"), &[c.intermediate_size, h])?;
            let up = take(&format!("{p}.mlp.up_proj.weight"), &[c.intermediate_size, h])?;
            let down = take(&format!("{p}.mlp.down_proj.weight"), &[h, c.intermediate_size])?;
            let qkv_bias = match (qb, kb, vb) {
                (Some(q), Some(k), Some(v)) => Some([q, k, v].concat()),
                _ => None,
            };
            blocks.push(Block {
                input_norm: take(&format!("{p}.input_layernorm.weight"), &[h])?.data,
                qkv: Linear {
                    weight: stack_rows(&[q, k, v]),
                    bias: qkv_bias,
                },
                o: Linear {
                    weight: o,
                    bias: o_bias,
                },
                post_norm: take(&format!("{p}.post_attention_layernorm.weight"), &[h])?.data,
                gate_up: Linear {
                    weight: stack_rows(&[gate, up]),
                    bias: None,
                },
                down: Linear {
                    weight: down,
                    bias: None,
                },
            });
        }
        let norm = take("model.norm.weight", &[h])?.data;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            // Some checkpoints omit lm_head even when the config says untied.
            take_opt(&mut tensors, "lm_head.weight", &[c.vocab_size, h])?
        };
        for t in std::iter::once(&embed).chain(lm_head.iter()) {
            if !t.all_finite() {
                return Err(Error::Model(
                    "embedding or lm_head contains NaN or infinite values".into(),
                ));
            }
        }
        let inv_freq = rope_inv_freq(c);
        Ok(Self {
            config,
            embed,
            blocks,
            norm,
            lm_head,
            inv_freq,
        })
    }

    /// Random weights of `config`'s shape (`--load-format dummy` on the CPU): the same values
    /// `CudaModel::dummy` makes on the GPU from the same seed (its `fill_uniform` streams, in
    /// its order), so both devices serve the same dummy model. Biases are zero, norms one.
    pub fn dummy(config: ModelConfig, seed: u64) -> Result<Self> {
        let c = &config;
        let (h, qd, kvd, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let mut stream = seed;
        let mut rand = |rows: usize, cols: usize, fan_in: usize| {
            stream = stream.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let data = uniform(rows * cols, stream, 1.0 / (fan_in as f32).sqrt());
            Tensor::new(vec![rows, cols], data)
        };
        let mut tensors = HashMap::new();
        let mut put = |name: String, t: Tensor| {
            tensors.insert(name, t);
        };
        let ones = |n: usize| Tensor::new(vec![n], vec![1.0; n]);
        let zeros = |n: usize| Tensor::new(vec![n], vec![0.0; n]);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let [q, k, v] = split_rows(rand(qd + 2 * kvd, h, h), [qd, kvd, kvd]);
            let o = rand(h, qd, qd);
            let [gate, up] = split_rows(rand(2 * inter, h, h), [inter, inter]);
            let down = rand(h, inter, inter);
            for (name, t) in [("q_proj", q), ("k_proj", k), ("v_proj", v), ("o_proj", o)] {
                put(format!("{p}.self_attn.{name}.weight"), t);
            }
            for (name, t) in [("gate_proj", gate), ("up_proj", up), ("down_proj", down)] {
                put(format!("{p}.mlp.{name}.weight"), t);
            }
            if c.attention_bias {
                for (name, n) in [("q_proj", qd), ("k_proj", kvd), ("v_proj", kvd), ("o_proj", h)] {
                    put(format!("{p}.self_attn.{name}.bias"), zeros(n));
                }
            }
            put(format!("{p}.input_layernorm.weight"), ones(h));
            put(format!("{p}.post_attention_layernorm.weight"), ones(h));
        }
        put("model.embed_tokens.weight".into(), rand(c.vocab_size, h, 1));
        if !c.tie_word_embeddings {
            put("lm_head.weight".into(), rand(c.vocab_size, h, h));
        }
        put("model.norm.weight".into(), ones(h));
        Self::from_tensors(config, tensors)
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Runs one forward pass over `seqs`, writing their new keys and values into `kv`.
    ///
    /// Returns, per sequence, the logits it asked for as `rows * vocab` values. Sequences that
    /// share an adapter should be adjacent so they form one LoRA segment (any order is correct).
    pub fn forward(&self, kv: &mut KvCache, seqs: &[SeqInput<'_>]) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let (h, qd, kvd, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let total: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        // Row bookkeeping: each row's sequence, absolute position and cache slot.
        let mut positions = Vec::with_capacity(total);
        let mut slots = Vec::with_capacity(total);
        let mut seq_rows = Vec::with_capacity(seqs.len());
        for s in seqs {
            check_seq_input(c, kv, s, 0)?;
            seq_rows.push(positions.len());
            for i in 0..s.tokens.len() {
                positions.push(s.cache.len + i);
                slots.push(kv.slot(s.cache, s.cache.len + i));
            }
        }
        let segments = lora_segments(seqs);
        let rotations = self.rotations(&positions);

        let mut x = vec![0.0f32; total * h];
        for (row, t) in seqs.iter().flat_map(|s| s.tokens.iter()).enumerate() {
            x[row * h..(row + 1) * h].copy_from_slice(self.embed.row(*t as usize));
        }
        let mut normed = vec![0.0f32; total * h];
        let qkv_w = qd + 2 * kvd;
        let mut qkv = vec![0.0f32; total * qkv_w];
        let mut attn = vec![0.0f32; total * qd];
        let mut gate_up = vec![0.0f32; total * 2 * inter];
        let mut act = vec![0.0f32; total * inter];
        let mut scratch = Vec::new();

        for (li, b) in self.blocks.iter().enumerate() {
            cpu::rms_norm(&mut normed, &x, &b.input_norm, h, c.rms_norm_eps);
            linear(&mut qkv, &normed, &b.qkv, total);
            let targets = [
                (LoraTarget::QProj, 0),
                (LoraTarget::KProj, qd),
                (LoraTarget::VProj, qd + kvd),
            ];
            for (t, off) in targets {
                apply_lora(&mut qkv, qkv_w, off, &normed, h, &segments, li, t, &mut scratch);
            }
            for (row, rot) in rotations.chunks_exact(c.head_dim).enumerate() {
                let r = &mut qkv[row * qkv_w..(row + 1) * qkv_w];
                rope(&mut r[..qd + kvd], rot);
                kv.write(li, slots[row], &r[qd..qd + kvd], &r[qd + kvd..]);
            }
            self.attention(&mut attn, &qkv, kv, li, seqs, &seq_rows);
            linear_acc(&mut x, &attn, &b.o, total);
            apply_lora(
                &mut x,
                h,
                0,
                &attn,
                qd,
                &segments,
                li,
                LoraTarget::OProj,
                &mut scratch,
            );

            cpu::rms_norm(&mut normed, &x, &b.post_norm, h, c.rms_norm_eps);
            linear(&mut gate_up, &normed, &b.gate_up, total);
            apply_lora(
                &mut gate_up,
                2 * inter,
                0,
                &normed,
                h,
                &segments,
                li,
                LoraTarget::GateProj,
                &mut scratch,
            );
            apply_lora(
                &mut gate_up,
                2 * inter,
                inter,
                &normed,
                h,
                &segments,
                li,
                LoraTarget::UpProj,
                &mut scratch,
            );
            cpu::silu_mul(&mut act, &gate_up, inter);
            linear_acc(&mut x, &act, &b.down, total);
            apply_lora(
                &mut x,
                h,
                0,
                &act,
                inter,
                &segments,
                li,
                LoraTarget::DownProj,
                &mut scratch,
            );
        }

        // Logits only for the rows that asked for them.
        let mut wanted_rows = Vec::new();
        for (s, &first) in seqs.iter().zip(&seq_rows) {
            let n = s.tokens.len();
            match s.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last if n > 0 => wanted_rows.push(first + n - 1),
                LogitsWanted::Last => {}
                LogitsWanted::All => wanted_rows.extend(first..first + n),
            }
        }
        let mut final_in = vec![0.0f32; wanted_rows.len() * h];
        for (i, &r) in wanted_rows.iter().enumerate() {
            cpu::rms_norm(
                &mut final_in[i * h..(i + 1) * h],
                &x[r * h..(r + 1) * h],
                &self.norm,
                h,
                c.rms_norm_eps,
            );
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let vocab = c.vocab_size;
        let mut logits = vec![0.0f32; wanted_rows.len() * vocab];
        cpu::matmul_nt(
            &mut logits,
            vocab,
            &final_in,
            h,
            &head.data,
            wanted_rows.len(),
            vocab,
            h,
            1.0,
            false,
        );

        let mut out = Vec::with_capacity(seqs.len());
        let mut next = 0;
        for s in seqs {
            let rows = match s.logits {
                LogitsWanted::None => 0,
                LogitsWanted::Last => usize::from(!s.tokens.is_empty()),
                LogitsWanted::All => s.tokens.len(),
            };
            out.push(logits[next * vocab..(next + rows) * vocab].to_vec());
            next += rows;
        }
        Ok(out)
    }

    /// Per row, the RoPE `[cos; head_dim/2, sin; head_dim/2]` for its position: computed once
    /// per forward pass and shared by every layer.
    fn rotations(&self, positions: &[usize]) -> Vec<f32> {
        let half = self.inv_freq.len();
        let mut out = vec![0.0f32; positions.len() * 2 * half];
        for (row, &pos) in out.chunks_exact_mut(2 * half).zip(positions) {
            let (cos, sin) = row.split_at_mut(half);
            for ((c, s), f) in cos.iter_mut().zip(sin).zip(&self.inv_freq) {
                let angle = (pos as f32 * f) as f64;
                (*c, *s) = (angle.cos() as f32, angle.sin() as f32);
            }
        }
        out
    }

    /// Causal attention of every new row against its sequence's cached keys and values.
    fn attention(
        &self,
        out: &mut [f32],
        qkv: &[f32],
        kv: &KvCache,
        layer: usize,
        seqs: &[SeqInput<'_>],
        seq_rows: &[usize],
    ) {
        let c = &self.config;
        let (d, qd, kvd) = (c.head_dim, c.q_dim(), c.kv_dim());
        let qkv_w = qd + 2 * kvd;
        let group = c.num_heads / c.num_kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let window = c.sliding_window;
        let (keys, values) = kv.layer(layer);
        // One task per (sequence, head); each returns its `[rows, head_dim]` output.
        let tasks: Vec<(usize, usize)> = (0..seqs.len())
            .flat_map(|s| (0..c.num_heads).map(move |hd| (s, hd)))
            .collect();
        let results: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(si, hd)| {
                let s = &seqs[si];
                let n = s.tokens.len();
                let kvh = hd / group;
                let mut res = vec![0.0f32; n * d];
                let mut scores = Vec::new();
                for i in 0..n {
                    let pos = s.cache.len + i;
                    let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                    let row = seq_rows[si] + i;
                    let q = &qkv[row * qkv_w + hd * d..row * qkv_w + (hd + 1) * d];
                    scores.clear();
                    let mut max = f32::NEG_INFINITY;
                    for p in first..=pos {
                        let slot = kv.slot(s.cache, p);
                        let k = &keys[slot * kvd + kvh * d..slot * kvd + (kvh + 1) * d];
                        let dot = q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                        max = max.max(dot);
                        scores.push(dot);
                    }
                    let mut sum = 0.0f32;
                    for sc in scores.iter_mut() {
                        *sc = (*sc - max).exp();
                        sum += *sc;
                    }
                    let o = &mut res[i * d..(i + 1) * d];
                    for (p, w) in (first..=pos).zip(&scores) {
                        let slot = kv.slot(s.cache, p);
                        let v = &values[slot * kvd + kvh * d..slot * kvd + (kvh + 1) * d];
                        let w = w / sum;
                        for (o, v) in o.iter_mut().zip(v) {
                            *o += w * v;
                        }
                    }
                }
                res
            })
            .collect();
        for (&(si, hd), res) in tasks.iter().zip(results) {
            for i in 0..seqs[si].tokens.len() {
                let row = seq_rows[si] + i;
                out[row * qd + hd * d..row * qd + (hd + 1) * d].copy_from_slice(&res[i * d..(i + 1) * d]);
            }
        }
    }
}

/// Refuses a sequence whose cache blocks are not reserved for its new tokens, that runs past
/// the model's context, or that holds a token outside the vocabulary (every backend checks the
/// same things before a forward pass). `pending` is how many tokens the model's last launched
/// step samples: a [`pending_token`](super::pending_token) standing for one of them is taken.
pub(crate) fn check_seq_input(c: &ModelConfig, kv: &KvCache, s: &SeqInput<'_>, pending: usize) -> Result<()> {
    let end = s.cache.len + s.tokens.len();
    if s.cache.blocks.len() * kv.block_size() < end {
        return Err(Error::InvalidRequest(
            "KV cache blocks not reserved for the new tokens".into(),
        ));
    }
    if end > c.max_position_embeddings {
        return Err(Error::InvalidRequest(format!(
            "sequence of {end} tokens exceeds the model's context of {}",
            c.max_position_embeddings
        )));
    }
    let known = |t: u32| (t as usize) < c.vocab_size || super::pending_index(t).is_some_and(|k| k < pending);
    if let Some(t) = s.tokens.iter().find(|&&t| !known(t)) {
        return Err(Error::InvalidRequest(format!(
            "token id {t} is outside the vocabulary (size {})",
            c.vocab_size
        )));
    }
    Ok(())
}

/// Rotates the q and k heads of one row (`[q_dim + kv_dim]`) by `rot` (`[cos; d/2, sin; d/2]`),
/// HF `rotate_half` style.
fn rope(qk: &mut [f32], rot: &[f32]) {
    let half = rot.len() / 2;
    let (cos, sin) = rot.split_at(half);
    for head in qk.chunks_exact_mut(2 * half) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (a[i], b[i]);
            a[i] = x1 * cos[i] - x2 * sin[i];
            b[i] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

/// Concatenates `[n_i, k]` matrices along rows.
fn stack_rows(parts: &[Tensor]) -> Tensor {
    let k = parts[0].cols();
    let rows = parts.iter().map(|p| p.rows()).sum();
    let data = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
    Tensor::new(vec![rows, k], data)
}

/// Splits a `[sum(rows), k]` matrix into `N` consecutive row blocks.
fn split_rows<const N: usize>(t: Tensor, rows: [usize; N]) -> [Tensor; N] {
    let k = t.cols();
    let mut rest = t.data.as_slice();
    rows.map(|r| {
        let (head, tail) = rest.split_at(r * k);
        rest = tail;
        Tensor::new(vec![r, k], head.to_vec())
    })
}

/// `n` values uniform in `[-scale, scale)`, value `i` from a counter-based hash of `seed` and
/// `i`: the bits of `fill_uniform` in `kernels/src/llama.cu`.
fn uniform(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; n];
    out.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
        for (j, v) in chunk.iter_mut().enumerate() {
            let i = ((c << 16) + j) as u64;
            let mut z = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 40) as f32 * (1.0 / 16_777_216.0);
            *v = (2.0 * u - 1.0) * scale;
        }
    });
    out
}

/// `out = x · Wᵀ + bias` for `rows` rows.
fn linear(out: &mut [f32], x: &[f32], l: &Linear, rows: usize) {
    let (n, k) = (l.weight.rows(), l.weight.cols());
    cpu::matmul_nt(out, n, x, k, &l.weight.data, rows, n, k, 1.0, false);
    add_bias(out, l);
}

/// `out += x · Wᵀ + bias` (the residual add fused into the GEMM).
fn linear_acc(out: &mut [f32], x: &[f32], l: &Linear, rows: usize) {
    let (n, k) = (l.weight.rows(), l.weight.cols());
    cpu::matmul_nt(out, n, x, k, &l.weight.data, rows, n, k, 1.0, true);
    add_bias(out, l);
}

fn add_bias(out: &mut [f32], l: &Linear) {
    if let Some(b) = &l.bias {
        for r in out.chunks_exact_mut(b.len()) {
            r.iter_mut().zip(b).for_each(|(o, b)| *o += b);
        }
    }
}

/// Groups consecutive sequences with the same adapter into row segments.
fn lora_segments<'a>(seqs: &[SeqInput<'a>]) -> Vec<Segment<'a>> {
    let mut segs: Vec<Segment<'a>> = Vec::new();
    let mut row = 0;
    for s in seqs {
        let n = s.tokens.len();
        // An empty sequence has no rows to add a delta to (and no row to slice at).
        if let Some(a) = s.adapter.filter(|_| n > 0) {
            match segs.last_mut() {
                Some(last) if std::ptr::eq(last.adapter, a) && last.start + last.len == row => last.len += n,
                _ => segs.push(Segment {
                    start: row,
                    len: n,
                    adapter: a,
                }),
            }
        }
        row += n;
    }
    segs
}

/// Adds each segment's LoRA delta for `target` in `layer` to columns `col_off..` of `dst`.
#[allow(clippy::too_many_arguments)]
fn apply_lora(
    dst: &mut [f32],
    dst_stride: usize,
    col_off: usize,
    x: &[f32],
    in_dim: usize,
    segments: &[Segment<'_>],
    layer: usize,
    target: LoraTarget,
    shrunk: &mut Vec<f32>,
) {
    for seg in segments {
        let Some(w) = &seg.adapter.layers[layer][target.index()] else {
            continue;
        };
        let r = seg.adapter.rank;
        let out_dim = w.b.rows();
        shrunk.resize(seg.len * r, 0.0);
        // Shrink: [len, in] · Aᵀ -> [len, r].
        cpu::matmul_nt(
            shrunk,
            r,
            &x[seg.start * in_dim..],
            in_dim,
            &w.a.data,
            seg.len,
            r,
            in_dim,
            1.0,
            false,
        );
        // Expand: dst[len, out] += s · [len, r] · Bᵀ.
        let dst_seg = &mut dst[seg.start * dst_stride + col_off..];
        cpu::matmul_nt(
            dst_seg,
            dst_stride,
            shrunk,
            r,
            &w.b.data,
            seg.len,
            out_dim,
            r,
            seg.adapter.scaling,
            true,
        );
    }
}

/// RoPE inverse frequencies, with llama3 scaling when configured (as transformers computes them).
pub(crate) fn rope_inv_freq(c: &ModelConfig) -> Vec<f32> {
    let d = c.head_dim;
    let base: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / c.rope_theta.powf((2 * i) as f32 / d as f32))
        .collect();
    let Some(s) = &c.rope_scaling else { return base };
    let old = s.original_max_position_embeddings as f32;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    base.into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / s.factor
            } else {
                let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_segments_merge_neighbours_and_skip_empty_sequences() {
        let c = ModelConfig::from_hf_json(
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":8,"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1}"#,
        )
        .unwrap();
        let a = LoraAdapter::dummy("a", &c, 2, &LoraTarget::ALL, 1);
        let b = LoraAdapter::dummy("b", &c, 2, &LoraTarget::ALL, 2);
        let cache = SeqCache::default();
        let seq = |n: usize, adapter| SeqInput {
            tokens: &[1, 2, 3, 4][..n],
            cache: &cache,
            adapter,
            logits: LogitsWanted::Last,
        };
        let seqs = [
            seq(2, Some(&a)),
            seq(0, Some(&b)),
            seq(1, Some(&a)),
            seq(3, None),
            seq(1, Some(&b)),
        ];
        let segs: Vec<(usize, usize, &str)> = lora_segments(&seqs)
            .iter()
            .map(|s| (s.start, s.len, s.adapter.name.as_str()))
            .collect();
        assert_eq!(segs, [(0, 3, "a"), (6, 1, "b")]);
        // A batch of one empty sequence with an adapter has no segment.
        assert!(lora_segments(&[seq(0, Some(&a))]).is_empty());
    }

    /// `uniform` gives `fill_uniform`'s bits: the values below come from the kernel's formula
    /// evaluated independently (64-bit integers in Python), across a chunk boundary.
    #[test]
    fn dummy_weights_follow_the_gpu_generator() {
        let v = uniform(65538, 7, 0.5);
        assert_eq!(
            [v[0], v[1], v[65536], v[65537]],
            [-0.427_029_6, -0.110_170_305, -0.139_422_12, 0.254_336_36]
        );
        let c = ModelConfig::tiny_for_tests();
        let m = LlamaModel::dummy(c.clone(), 3).unwrap();
        // Layer 0's q/k/v is the first stream, then o, gate/up, down; the embedding follows
        // the layers, at scale 1.
        let stream = |k: u64| 3u64.wrapping_add(k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        assert_eq!(
            m.blocks[0].qkv.weight.data,
            uniform(16 * 8, stream(1), 1.0 / 8f32.sqrt())
        );
        assert_eq!(
            m.blocks[1].down.weight.data,
            uniform(8 * 12, stream(8), 1.0 / 12f32.sqrt())
        );
        assert_eq!(m.embed.data, uniform(16 * 8, stream(9), 1.0));
        assert!(m.lm_head.is_some());
        assert_ne!(m.blocks[0].qkv.weight.data, m.blocks[1].qkv.weight.data);
        assert_eq!(
            LlamaModel::dummy(c, 3).unwrap().blocks[1].o.weight.data,
            m.blocks[1].o.weight.data
        );
    }
}
