//! Batched generation over a fixed set of requests: one mixed prefill, then batched decode steps.
//! The CLI, the numerical tests and the CPU benchmark drive the model through it.

use std::sync::Arc;

use crate::adapter::LoraAdapter;
use crate::backend::cpu;
use crate::engine::{KvCache, SeqCache};
use crate::error::Result;
use crate::model::llama::{LogitsWanted, SeqInput};
use crate::model::Forward;

/// One generation request.
#[derive(Clone)]
pub struct GenRequest {
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Adapter to run with; `None` is the base model.
    pub adapter: Option<Arc<LoraAdapter>>,
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// Stop at these token ids (included in the output).
    pub stop_token_ids: Vec<u32>,
    /// Return the log-probability distribution at every prompt position.
    pub prompt_logprobs: bool,
}

/// What one request produced.
#[derive(Clone, Debug, Default)]
pub struct GenOutput {
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// With `prompt_logprobs`: `prompt.len() * vocab` log-probabilities, row i predicting token i+1.
    pub prompt_logprobs: Vec<f32>,
    /// Log-probability of each generated token.
    pub token_logprobs: Vec<f32>,
}

/// Greedy generation for `reqs` in shared batches; the KV cache is released afterwards.
pub fn generate_greedy<M: Forward + ?Sized>(
    model: &mut M,
    kv: &mut KvCache,
    reqs: &[GenRequest],
) -> Result<Vec<GenOutput>> {
    // Order rows by adapter so each adapter forms one LoRA segment.
    let mut order: Vec<usize> = (0..reqs.len()).collect();
    order.sort_by_key(|&i| {
        reqs[i]
            .adapter
            .as_ref()
            .map(|a| Arc::as_ptr(a) as usize)
            .unwrap_or(0)
    });
    let mut caches = vec![SeqCache::default(); reqs.len()];
    let result = run(model, kv, reqs, &order, &mut caches);
    for c in &mut caches {
        kv.release(c);
    }
    result
}

fn run<M: Forward + ?Sized>(
    model: &mut M,
    kv: &mut KvCache,
    reqs: &[GenRequest],
    order: &[usize],
    caches: &mut [SeqCache],
) -> Result<Vec<GenOutput>> {
    let vocab = model.config().vocab_size;
    let mut outs = vec![GenOutput::default(); reqs.len()];
    for &i in order {
        kv.reserve(&mut caches[i], reqs[i].prompt.len())?;
    }
    let inputs: Vec<SeqInput<'_>> = order
        .iter()
        .map(|&i| SeqInput {
            tokens: &reqs[i].prompt,
            cache: &caches[i],
            adapter: reqs[i].adapter.as_deref(),
            logits: if reqs[i].prompt_logprobs {
                LogitsWanted::All
            } else {
                LogitsWanted::Last
            },
        })
        .collect();
    let logits = model.forward(kv, &inputs)?;
    drop(inputs);
    let mut last: Vec<Vec<f32>> = vec![Vec::new(); reqs.len()];
    for (&i, l) in order.iter().zip(logits) {
        caches[i].len = reqs[i].prompt.len();
        if reqs[i].prompt_logprobs {
            outs[i].prompt_logprobs = l.chunks_exact(vocab).flat_map(cpu::log_softmax).collect();
            last[i] = l[l.len() - vocab..].to_vec();
        } else {
            last[i] = l;
        }
    }
    let mut active: Vec<usize> = order
        .iter()
        .copied()
        .filter(|&i| reqs[i].max_new_tokens > 0)
        .collect();
    let mut next_tok = vec![0u32; reqs.len()];
    while !active.is_empty() {
        let mut still = Vec::with_capacity(active.len());
        for &i in &active {
            let lp = cpu::log_softmax(&last[i]);
            let tok = argmax(&lp);
            outs[i].tokens.push(tok);
            outs[i].token_logprobs.push(lp[tok as usize]);
            next_tok[i] = tok;
            let done =
                outs[i].tokens.len() >= reqs[i].max_new_tokens || reqs[i].stop_token_ids.contains(&tok);
            if !done {
                still.push(i);
            }
        }
        active = still;
        if active.is_empty() {
            break;
        }
        for &i in &active {
            let len = caches[i].len + 1;
            kv.reserve(&mut caches[i], len)?;
        }
        let toks: Vec<[u32; 1]> = active.iter().map(|&i| [next_tok[i]]).collect();
        let inputs: Vec<SeqInput<'_>> = active
            .iter()
            .zip(&toks)
            .map(|(&i, t)| SeqInput {
                tokens: t,
                cache: &caches[i],
                adapter: reqs[i].adapter.as_deref(),
                logits: LogitsWanted::Last,
            })
            .collect();
        let logits = model.forward(kv, &inputs)?;
        drop(inputs);
        for (&i, l) in active.iter().zip(logits) {
            caches[i].len += 1;
            last[i] = l;
        }
    }
    Ok(outs)
}

/// Index of the largest value (the first on ties, as torch.argmax).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}
