//! Token selection: penalties, temperature, top-k, top-p and min-p over one row of logits, with a
//! per-request seeded generator so that a given `seed` reproduces the same text; and which
//! sequences a model that samples on its device may sample instead ([`device_eligible`]).

use super::request::{EngineRequest, SamplingParams, TokenLogprob};
use crate::backend::cpu::log_softmax;
use crate::model::llama::LogitsWanted;
use crate::model::{DevicePenalties, DeviceSample, MAX_DEVICE_TOP_LOGPROBS};

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

    /// The next 64 random bits (also the per-step seed of device sampling).
    pub fn next_u64(&mut self) -> u64 {
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

/// Whether a sequence's next token may be sampled on the device this step: its chunk is the last
/// of its pending tokens and wants only the last logits (no prompt log-probs), it generates, and
/// it asks for at most [`MAX_DEVICE_TOP_LOGPROBS`] top log-probs.
pub fn device_eligible(req: &EngineRequest, logits: LogitsWanted, last_chunk: bool) -> bool {
    let p = &req.sampling;
    let top_fits = top_logprobs_wanted(req) <= MAX_DEVICE_TOP_LOGPROBS;
    last_chunk && logits == LogitsWanted::Last && p.max_new_tokens > 0 && top_fits
}

/// How many top log-probs a request wants with each generated token.
pub fn top_logprobs_wanted(req: &EngineRequest) -> usize {
    if req.logprobs.return_logprob {
        req.logprobs.top_logprobs_num
    } else {
        0
    }
}

/// Whether any of repetition, frequency and presence penalties is set: sampling then reads the
/// sequence's token history.
pub fn has_penalties(p: &SamplingParams) -> bool {
    p.repetition_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0
}

/// The device's share of `p` for a sequence with `prompt` and `output` so far, with this step's
/// seed and the `top_logprobs` alternatives it wants: the penalties travel as the token history
/// they need.
pub fn device_sample(
    p: &SamplingParams,
    top_logprobs: usize,
    prompt: &[u32],
    output: &[u32],
    seed: u64,
) -> DeviceSample {
    DeviceSample {
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        min_p: p.min_p,
        seed,
        penalties: has_penalties(p).then(|| device_penalties(p, prompt, output)),
        top_logprobs,
    }
}

/// The token history [`apply_penalties`] reads, as distinct tokens with their output counts.
fn device_penalties(p: &SamplingParams, prompt: &[u32], output: &[u32]) -> DevicePenalties {
    let mut counts = std::collections::BTreeMap::<u32, u32>::new();
    if p.repetition_penalty != 1.0 {
        for &t in prompt {
            counts.entry(t).or_default();
        }
    }
    for &t in output {
        *counts.entry(t).or_default() += 1;
    }
    DevicePenalties {
        repetition: p.repetition_penalty,
        frequency: p.frequency_penalty,
        presence: p.presence_penalty,
        tokens: counts.keys().copied().collect(),
        output_counts: counts.values().copied().collect(),
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

/// Applies `p`'s penalties to one row of logits for a sequence with `prompt` and `output`.
pub fn apply_penalties(l: &mut [f32], p: &SamplingParams, prompt: &[u32], output: &[u32]) {
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
    let cand = kept_tokens(l, p);
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

/// The tokens `draw` chooses among with their unnormalised weights `exp((l - max) / T)`, most
/// likely first (ties: lower id first): top-k, then min-p relative to the most likely, then the
/// shortest run whose mass reaches `top_p` of the top-k set's. `p.temperature` must be positive.
/// The reference for the device sampler.
pub fn kept_tokens(l: &[f32], p: &SamplingParams) -> Vec<(u32, f64)> {
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
    cand
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

    fn request(f: impl FnOnce(&mut EngineRequest)) -> EngineRequest {
        let mut r = EngineRequest {
            input_ids: vec![1, 2, 3],
            lora: None,
            sampling: SamplingParams::default(),
            logprobs: Default::default(),
        };
        f(&mut r);
        r
    }

    #[test]
    fn device_eligibility() {
        use LogitsWanted::{All, Last, None as NoLogits};
        let plain = request(|_| {});
        assert!(device_eligible(&plain, Last, true));
        let greedy = request(|r| r.sampling.temperature = 0.0);
        assert!(device_eligible(&greedy, Last, true));
        let chosen_logprob = request(|r| r.logprobs.return_logprob = true);
        assert!(device_eligible(&chosen_logprob, Last, true));
        // Top-n asked for but return_logprob off: nothing is returned, so the device may sample.
        let top_off = request(|r| r.logprobs.top_logprobs_num = 5);
        assert!(device_eligible(&top_off, Last, true));

        assert!(!device_eligible(&plain, Last, false), "not the last chunk");
        assert!(!device_eligible(&plain, All, true), "prompt log-probs");
        assert!(!device_eligible(&plain, NoLogits, true));
        // The device returns up to MAX_DEVICE_TOP_LOGPROBS alternatives; more come from the host.
        let top = |n| {
            request(|r| {
                r.logprobs.return_logprob = true;
                r.logprobs.top_logprobs_num = n;
            })
        };
        assert!(device_eligible(&top(1), Last, true));
        assert!(device_eligible(&top(MAX_DEVICE_TOP_LOGPROBS), Last, true));
        assert!(!device_eligible(&top(MAX_DEVICE_TOP_LOGPROBS + 1), Last, true));
        assert_eq!(top_logprobs_wanted(&top(3)), 3);
        assert_eq!(top_logprobs_wanted(&top_off), 0, "return_logprob off");
        let prefill_only = request(|r| r.sampling.max_new_tokens = 0);
        assert!(!device_eligible(&prefill_only, Last, true));
        // Penalties travel with their token history.
        for penalised in [
            request(|r| r.sampling.repetition_penalty = 1.2),
            request(|r| r.sampling.frequency_penalty = 0.5),
            request(|r| r.sampling.presence_penalty = -0.5),
        ] {
            assert!(
                device_eligible(&penalised, Last, true),
                "{:?}",
                penalised.sampling
            );
        }
    }

    #[test]
    fn device_penalties_do_what_the_host_does() {
        let mut rng = Rng::new(Some(7));
        for case in 0..200 {
            let vocab = 1 + (rng.next_u64() % 50) as usize;
            let tokens = |rng: &mut Rng, n: u64| -> Vec<u32> {
                (0..rng.next_u64() % n)
                    .map(|_| (rng.next_u64() % vocab as u64) as u32)
                    .collect()
            };
            let (prompt, output) = (tokens(&mut rng, 30), tokens(&mut rng, 30));
            let pick = |rng: &mut Rng, vals: &[f32]| vals[(rng.next_u64() % vals.len() as u64) as usize];
            let p = params(|p| {
                p.repetition_penalty = pick(&mut rng, &[1.0, 1.3, 0.8]);
                p.frequency_penalty = pick(&mut rng, &[0.0, 0.5, -0.25]);
                p.presence_penalty = pick(&mut rng, &[0.0, 1.0, -0.5]);
            });
            let logits: Vec<f32> = (0..vocab).map(|_| (rng.uniform() * 8.0 - 4.0) as f32).collect();
            let mut want = logits.clone();
            apply_penalties(&mut want, &p, &prompt, &output);
            let d = device_sample(&p, 0, &prompt, &output, 1);
            let mut got = logits.clone();
            if let Some(pen) = &d.penalties {
                assert!(pen.tokens.windows(2).all(|w| w[0] < w[1]), "distinct, ascending");
                pen.apply(&mut got);
            }
            assert_eq!(
                got, want,
                "case {case}: {p:?} prompt {prompt:?} output {output:?}"
            );
        }
    }

    #[test]
    fn device_sample_copies_the_settings_and_seed() {
        let p = params(|p| {
            p.temperature = 0.8;
            p.top_k = 40;
            p.top_p = 0.9;
            p.min_p = 0.05;
            p.repetition_penalty = 1.3;
        });
        let d = device_sample(&p, 0, &[5, 6], &[6], 99);
        assert_eq!(
            (d.temperature, d.top_k, d.top_p, d.min_p, d.seed),
            (0.8, 40, 0.9, 0.05, 99)
        );
        let pen = d.penalties.expect("repetition penalty set");
        assert_eq!((pen.tokens, pen.output_counts), (vec![5, 6], vec![0, 1]));
        assert_eq!(device_sample(&params(|_| {}), 0, &[5], &[6], 1).penalties, None);
    }

    #[test]
    fn kept_tokens_applies_top_k_min_p_then_top_p_over_the_top_k_mass() {
        // Weights at T = 1: 1, e^-1, e^-2, e^-3, e^-4 (ids 4, 3, 2, 1, 0).
        let logits = [0.0, 1.0, 2.0, 3.0, 4.0];
        let ids = |p: &SamplingParams| kept_tokens(&logits, p).iter().map(|c| c.0).collect::<Vec<_>>();
        assert_eq!(ids(&params(|_| {})), [4, 3, 2, 1, 0]);
        assert_eq!(ids(&params(|p| p.top_k = 2)), [4, 3]);
        // e^-2 = 0.135 >= 0.1 > e^-3.
        assert_eq!(ids(&params(|p| p.min_p = 0.1)), [4, 3, 2]);
        // Masses 0.636, 0.234, 0.086, ...: 0.87 is reached at the second token.
        assert_eq!(ids(&params(|p| p.top_p = 0.85)), [4, 3]);
        // Top-p normalised by the top-3 mass (1.503): 1.368 / 1.503 = 0.91 >= 0.9.
        assert_eq!(
            ids(&params(|p| {
                p.top_k = 3;
                p.top_p = 0.9;
            })),
            [4, 3]
        );
        // Min-p leaves 1 + e^-1, 0.91 of the top-3 mass, below top_p 0.95: all of it is kept.
        assert_eq!(
            ids(&params(|p| {
                p.top_k = 3;
                p.min_p = 0.2;
                p.top_p = 0.95;
            })),
            [4, 3]
        );
        // Temperature 0.5 squares the ratios: e^-2 = 0.135 is below min_p 0.2.
        assert_eq!(
            ids(&params(|p| {
                p.temperature = 0.5;
                p.min_p = 0.2;
            })),
            [4]
        );
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
