//! Token selection: penalties, temperature, top-k, top-p and min-p over one row of logits, with a
//! per-request seeded generator so that a given `seed` reproduces the same text.

use super::request::{SamplingParams, TokenLogprob};
use crate::backend::cpu::log_softmax;

/// SplitMix64: small, fast and deterministic per request.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`, or from the clock and a counter when there is none.
    pub fn new(seed: Option<u64>) -> Self {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let s = seed.unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            t ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, std::sync::atomic::Ordering::Relaxed)
        });
        Self(s)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks the next token from `logits` (one row). `prompt` and `output` feed the penalties.
/// Returns the token with its log-probability under the unmodified model distribution and the
/// `top_n` most likely alternatives.
pub fn sample(
    logits: &[f32],
    params: &SamplingParams,
    prompt: &[u32],
    output: &[u32],
    top_n: usize,
    rng: &mut Rng,
) -> TokenLogprob {
    let raw = log_softmax(logits);
    let mut l = logits.to_vec();
    apply_penalties(&mut l, params, prompt, output);
    let token_id = if params.temperature <= 0.0 {
        argmax(&l)
    } else {
        draw(&l, params, rng)
    };
    TokenLogprob {
        token_id,
        logprob: raw[token_id as usize],
        top: top_logprobs(&raw, top_n),
    }
}

/// The `n` highest log-probabilities, best first (ties: lower id first).
pub fn top_logprobs(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
    let n = n.min(idx.len());
    idx.select_nth_unstable_by(n - 1, |&a, &b| {
        logprobs[b as usize]
            .total_cmp(&logprobs[a as usize])
            .then(a.cmp(&b))
    });
    idx.truncate(n);
    idx.sort_by(|&a, &b| {
        logprobs[b as usize]
            .total_cmp(&logprobs[a as usize])
            .then(a.cmp(&b))
    });
    idx.into_iter().map(|i| (i, logprobs[i as usize])).collect()
}

fn apply_penalties(l: &mut [f32], p: &SamplingParams, prompt: &[u32], output: &[u32]) {
    if p.repetition_penalty != 1.0 {
        // HF/vLLM convention: over prompt and output, divide positive logits, multiply negative.
        let mut seen = vec![false; l.len()];
        for &t in prompt.iter().chain(output) {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        for (v, s) in l.iter_mut().zip(seen) {
            if s {
                *v = if *v > 0.0 {
                    *v / p.repetition_penalty
                } else {
                    *v * p.repetition_penalty
                };
            }
        }
    }
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        // OpenAI convention: over the output only.
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        for &t in output {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(v) = l.get_mut(t as usize) {
                *v -= p.frequency_penalty * c as f32 + p.presence_penalty;
            }
        }
    }
}

fn argmax(v: &[f32]) -> u32 {
    super::generate::argmax(v)
}

fn draw(l: &[f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    let t = p.temperature;
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut cand: Vec<(u32, f64)> = l
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, (((v - max) / t) as f64).exp()))
        .collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if p.top_k > 0 {
        cand.truncate(p.top_k);
    }
    let total: f64 = cand.iter().map(|c| c.1).sum();
    if p.min_p > 0.0 {
        let floor = cand[0].1 * p.min_p as f64;
        cand.retain(|c| c.1 >= floor);
    }
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = 0;
        for c in &cand {
            keep += 1;
            acc += c.1 / total;
            if acc >= p.top_p as f64 {
                break;
            }
        }
        cand.truncate(keep.max(1));
    }
    let total: f64 = cand.iter().map(|c| c.1).sum();
    let mut u = rng.uniform() * total;
    for &(i, w) in &cand {
        if u < w {
            return i;
        }
        u -= w;
    }
    cand.last().map(|c| c.0).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    #[test]
    fn greedy_seeded_and_truncated_sampling() {
        let logits = [1.0, 3.0, 2.0, -1.0];
        let greedy = params(|p| p.temperature = 0.0);
        assert_eq!(
            sample(&logits, &greedy, &[], &[], 2, &mut Rng::new(None)).token_id,
            1
        );
        let top1 = params(|p| p.top_k = 1);
        for _ in 0..20 {
            assert_eq!(
                sample(&logits, &top1, &[], &[], 0, &mut Rng::new(None)).token_id,
                1
            );
        }
        let hot = params(|p| p.temperature = 2.0);
        let a: Vec<u32> = (0..8)
            .map(|_| 0)
            .scan(Rng::new(Some(7)), |r, _| {
                Some(sample(&logits, &hot, &[], &[], 0, r).token_id)
            })
            .collect();
        let b: Vec<u32> = (0..8)
            .map(|_| 0)
            .scan(Rng::new(Some(7)), |r, _| {
                Some(sample(&logits, &hot, &[], &[], 0, r).token_id)
            })
            .collect();
        assert_eq!(a, b, "same seed, same tokens");
        let nucleus = params(|p| p.top_p = 0.5);
        for s in 0..20 {
            let t = sample(&logits, &nucleus, &[], &[], 0, &mut Rng::new(Some(s))).token_id;
            assert_eq!(t, 1, "top_p 0.5 keeps only the most likely token here");
        }
    }

    #[test]
    fn penalties_steer_away_from_repeats_and_logprobs_stay_raw() {
        let logits = [2.0, 1.9, 0.0];
        let p = params(|p| {
            p.temperature = 0.0;
            p.presence_penalty = 1.0;
        });
        let out = sample(&logits, &p, &[], &[0], 3, &mut Rng::new(None));
        assert_eq!(out.token_id, 1);
        let raw = log_softmax(&logits);
        assert_eq!(out.logprob, raw[1]);
        assert_eq!(out.top.iter().map(|t| t.0).collect::<Vec<_>>(), [0, 1, 2]);
        let rep = params(|p| {
            p.temperature = 0.0;
            p.repetition_penalty = 1.2;
        });
        assert_eq!(
            sample(&logits, &rep, &[0], &[], 0, &mut Rng::new(None)).token_id,
            1
        );
    }
}
