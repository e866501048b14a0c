//! Sampling parameters at the edge: each field is range-checked as it is read (so errors name
//! the wire field, `sampling_params.top_p` or `top_p`), and [`SamplingSpec::for_prompt`] checks
//! the generation budget against the context once the prompt is tokenized.

use crate::engine::request::SamplingParams;

use super::body::{Fields, StringOrList};
use super::error::ApiError;

/// Most samples one request may ask for (`n`).
pub const MAX_N: usize = 16;
/// Most stop strings per request.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_LEN: usize = 512;
/// Most alternatives per position (`top_logprobs_num`, `top_logprobs`, `logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// What the edge knows about the model when validating.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Longest prompt + output.
    pub context_length: usize,
    /// Token ids must be below this.
    pub vocab_size: usize,
    /// The model's end-of-sequence ids.
    pub eos_token_ids: Vec<u32>,
}

impl Limits {
    /// Checks prompt token ids; `what` names them in messages (`input_ids[1]`, `prompt`).
    pub fn check_prompt(&self, ids: &[u32], what: &str) -> Result<(), ApiError> {
        if ids.is_empty() {
            return Err(ApiError::invalid(what, format!("`{what}` is empty")));
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(ApiError::invalid(
                what,
                format!(
                    "`{what}` contains token id {bad}, outside the vocabulary (size {})",
                    self.vocab_size
                ),
            ));
        }
        if ids.len() >= self.context_length {
            return Err(ApiError::invalid(
                what,
                format!(
                    "`{what}` has {} tokens but the context length is {}; at least one token \
                     must be left to generate",
                    ids.len(),
                    self.context_length
                ),
            ));
        }
        Ok(())
    }
}

/// Validated sampling settings of one request, before the prompt length is known.
#[derive(Clone, Debug)]
pub struct SamplingSpec {
    /// Everything but `max_new_tokens` and the per-sample seed.
    pub base: SamplingParams,
    /// Requested `max_new_tokens`; `None`: the endpoint's default.
    pub max_new_tokens: Option<usize>,
    /// The wire name of the max-tokens field, for messages.
    pub max_new_tokens_param: String,
    /// Samples per prompt.
    pub n: usize,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Leave special tokens out of the text.
    pub skip_special_tokens: bool,
    /// Keep a matched stop string (or stop token) in the text.
    pub no_stop_trim: bool,
}

/// `Some(default)` fills a missing max-tokens with a fixed number; `None` with the rest of the
/// context (OpenAI chat).
pub type DefaultMaxTokens = Option<usize>;

impl SamplingSpec {
    /// The engine's sampling parameters for sample `index` of a prompt of `prompt_len` tokens.
    pub fn for_prompt(
        &self,
        prompt_len: usize,
        index: usize,
        default_max: DefaultMaxTokens,
        limits: &Limits,
    ) -> Result<SamplingParams, ApiError> {
        let room = limits.context_length.saturating_sub(prompt_len);
        let max_new_tokens = match self.max_new_tokens.or(default_max) {
            Some(m) if m > room && self.max_new_tokens.is_some() => {
                let p = &self.max_new_tokens_param;
                return Err(ApiError::invalid(
                    p,
                    format!(
                        "`{p}` is {m} but the prompt has {prompt_len} tokens and the context length \
                         is {}: at most {room} tokens can be generated",
                        limits.context_length
                    ),
                ));
            }
            // A default larger than the room left is cut to fit.
            Some(m) => m.min(room),
            None => room,
        };
        let mut params = self.base.clone();
        params.max_new_tokens = max_new_tokens;
        // Distinct samples of one request need distinct streams of randomness.
        params.seed = params.seed.map(|s| s.wrapping_add(index as u64));
        Ok(params)
    }
}

/// The wire names of the sampling fields, which differ between the native and OpenAI APIs.
pub struct Names {
    /// `max_new_tokens` (native) or `max_tokens` (OpenAI).
    pub max_tokens: &'static [&'static str],
}

/// Reads the sampling fields common to both APIs from `f` and checks their ranges.
pub fn read_sampling(f: &mut Fields, names: &Names, limits: &Limits) -> Result<SamplingSpec, ApiError> {
    let mut max_new_tokens = None;
    let mut max_new_tokens_param = f.path(names.max_tokens[0]);
    for key in names.max_tokens {
        if let Some(m) = f.get::<usize>(key)? {
            max_new_tokens_param = f.path(key);
            // 0 is a prefill-only request: it scores the prompt (with return_logprob).
            max_new_tokens = Some(m);
        }
    }
    let mut base = SamplingParams::default();
    if let Some(t) = f.get::<f64>("temperature")? {
        if !(0.0..=100.0).contains(&t) {
            return Err(out_of_range(f, "temperature", t, "from 0 (greedy) to 100"));
        }
        base.temperature = t as f32;
    }
    if let Some(p) = f.get::<f64>("top_p")? {
        if !(p > 0.0 && p <= 1.0) {
            return Err(out_of_range(f, "top_p", p, "in (0, 1]"));
        }
        base.top_p = p as f32;
    }
    if let Some(k) = f.get::<i64>("top_k")? {
        base.top_k = match k {
            -1 => 0,
            k if k >= 1 => k as usize,
            k => return Err(out_of_range(f, "top_k", k as f64, "-1 (off) or at least 1")),
        };
    }
    if let Some(m) = f.get::<f64>("min_p")? {
        if !(0.0..=1.0).contains(&m) {
            return Err(out_of_range(f, "min_p", m, "in [0, 1]"));
        }
        base.min_p = m as f32;
    }
    if let Some(r) = f.get::<f64>("repetition_penalty")? {
        if !(r > 0.0 && r <= 2.0) {
            return Err(out_of_range(f, "repetition_penalty", r, "in (0, 2]"));
        }
        base.repetition_penalty = r as f32;
    }
    for key in ["frequency_penalty", "presence_penalty"] {
        if let Some(v) = f.get::<f64>(key)? {
            if !(-2.0..=2.0).contains(&v) {
                return Err(out_of_range(f, key, v, "in [-2, 2]"));
            }
            if key == "frequency_penalty" {
                base.frequency_penalty = v as f32;
            } else {
                base.presence_penalty = v as f32;
            }
        }
    }
    if let Some(ids) = f.get::<Vec<u32>>("stop_token_ids")? {
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= limits.vocab_size) {
            let p = f.path("stop_token_ids");
            return Err(ApiError::invalid(
                &p,
                format!(
                    "`{p}` contains {bad}, outside the vocabulary (size {})",
                    limits.vocab_size
                ),
            ));
        }
        base.stop_token_ids = ids;
    }
    base.ignore_eos = f.get::<bool>("ignore_eos")?.unwrap_or(false);
    // SGLang calls it `sampling_seed`; OpenAI `seed`. Any integer: negative ones keep their bits.
    for key in ["seed", "sampling_seed"] {
        if let Some(v) = f.take(key) {
            let seed = v
                .as_u64()
                .or_else(|| v.as_i64().map(|s| s as u64))
                .ok_or_else(|| super::body::type_error(&f.path(key), "an integer", &v))?;
            base.seed = Some(seed);
        }
    }
    let n = f.get::<usize>("n")?.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(out_of_range(f, "n", n as f64, &format!("from 1 to {MAX_N}")));
    }
    let stop = f.get::<StringOrList>("stop")?.map(|s| s.0).unwrap_or_default();
    let stop_path = f.path("stop");
    if stop.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid(
            &stop_path,
            format!(
                "`{stop_path}` has {} strings; at most {MAX_STOP_STRINGS} are allowed",
                stop.len()
            ),
        ));
    }
    if stop.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_LEN) {
        return Err(ApiError::invalid(
            &stop_path,
            format!("`{stop_path}` strings must be non-empty and at most {MAX_STOP_LEN} bytes"),
        ));
    }
    let skip_special_tokens = f.get::<bool>("skip_special_tokens")?.unwrap_or(true);
    let no_stop_trim = f.get::<bool>("no_stop_trim")?.unwrap_or(false);
    // Accepted for compatibility; they change nothing here.
    f.get::<bool>("spaces_between_special_tokens")?;
    for key in ["min_new_tokens", "min_tokens"] {
        if f.get::<usize>(key)?.is_some_and(|m| m > 0) {
            let p = f.path(key);
            return Err(ApiError::invalid(&p, format!("`{p}` is not supported yet")));
        }
    }
    Ok(SamplingSpec {
        base,
        max_new_tokens,
        max_new_tokens_param,
        n,
        stop,
        skip_special_tokens,
        no_stop_trim,
    })
}

fn out_of_range(f: &Fields, key: &str, got: f64, want: &str) -> ApiError {
    let p = f.path(key);
    ApiError::invalid(&p, format!("`{p}` must be {want}, not {got}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const NATIVE: Names = Names {
        max_tokens: &["max_new_tokens"],
    };

    fn limits() -> Limits {
        Limits {
            context_length: 100,
            vocab_size: 50,
            eos_token_ids: vec![2],
        }
    }

    fn read(v: Value) -> Result<SamplingSpec, ApiError> {
        let Value::Object(m) = v else { unreachable!() };
        let mut f = Fields::new(m, "sampling_params");
        let spec = read_sampling(&mut f, &NATIVE, &limits())?;
        f.reject_unknown()?;
        Ok(spec)
    }

    fn err(v: Value) -> String {
        read(v).expect_err("must be refused").to_string()
    }

    #[test]
    fn defaults_and_fields() {
        let s = read(json!({"temperature": 0, "top_k": -1, "stop": "\n", "n": 2, "seed": 7})).unwrap();
        assert_eq!(s.base.temperature, 0.0);
        assert_eq!(s.base.top_k, 0);
        assert_eq!(s.stop, vec!["\n".to_string()]);
        assert!(s.skip_special_tokens && !s.no_stop_trim);
        let p0 = s.for_prompt(10, 0, Some(128), &limits()).unwrap();
        let p1 = s.for_prompt(10, 1, Some(128), &limits()).unwrap();
        assert_eq!(p0.max_new_tokens, 90, "the default is cut to the room left");
        assert_eq!((p0.seed, p1.seed), (Some(7), Some(8)));
    }

    #[test]
    fn out_of_range_values_are_refused_by_name() {
        assert!(err(json!({"temperature": -0.5})).contains("`sampling_params.temperature` must be"));
        assert!(err(json!({"top_p": 0})).contains("top_p"));
        assert!(err(json!({"top_p": 1.5})).contains("top_p"));
        assert!(err(json!({"top_k": 0})).contains("top_k"));
        assert!(err(json!({"n": 17})).contains("from 1 to 16"));
        assert!(err(json!({"n": 0})).contains("`sampling_params.n`"));
        assert!(err(json!({"max_new_tokens": -1})).contains("non-negative integer"));
        assert!(err(json!({"stop_token_ids": [50]})).contains("outside the vocabulary"));
        assert!(err(json!({"stop": [""]})).contains("non-empty"));
        assert!(err(json!({"repetition_penalty": 0})).contains("repetition_penalty"));
        assert!(
            err(json!({"regex": "a+"})).contains("unknown or unsupported parameter `sampling_params.regex`")
        );
    }

    #[test]
    fn explicit_budget_over_the_context_is_refused() {
        let s = read(json!({"max_new_tokens": 95})).unwrap();
        let e = s.for_prompt(10, 0, Some(128), &limits()).unwrap_err().to_string();
        assert!(e.contains("at most 90 tokens"), "{e}");
        let s = read(json!({"max_new_tokens": 90})).unwrap();
        assert_eq!(s.for_prompt(10, 0, None, &limits()).unwrap().max_new_tokens, 90);
    }

    #[test]
    fn prompts_are_checked_against_vocab_and_context() {
        let l = limits();
        assert!(l.check_prompt(&[], "text").is_err());
        assert!(l
            .check_prompt(&[1, 50], "input_ids")
            .unwrap_err()
            .to_string()
            .contains("50"));
        assert!(l.check_prompt(&vec![1; 100], "input_ids").is_err());
        assert!(l.check_prompt(&vec![1; 99], "input_ids").is_ok());
    }
}
