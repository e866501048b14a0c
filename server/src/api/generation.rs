//! One engine request as the edge follows it: events in, text out. [`Generation`] decodes
//! tokens incrementally, matches stop strings (holding back text that might become one, so
//! streamed text is never taken back), trims what SGLang trims, and cancels the engine request
//! by dropping its event stream once a stop string matches. Requests of one HTTP call are
//! submitted together with [`submit_all`] so the engine batches them.

use std::collections::HashSet;
use std::time::Instant;

use crate::engine::request::{EngineEvent, EngineRequest, EventStream, FinishReason, TokenLogprob};
use crate::engine::EngineHandle;
use crate::model::tokenizer::{IncrementalDecoder, TextTokenizer};

use super::error::ApiError;

/// How the text of one request is produced.
#[derive(Clone, Debug, Default)]
pub struct TextOptions {
    /// Stop strings (matched in the generated text only).
    pub stop: Vec<String>,
    /// Leave special tokens out of the text.
    pub skip_special_tokens: bool,
    /// Keep the matched stop string or stop token in the text.
    pub no_stop_trim: bool,
}

/// A validated request ready to submit, with how to turn its tokens into text.
#[derive(Clone, Debug)]
pub struct Job {
    /// What the engine runs.
    pub request: EngineRequest,
    /// How its text is made.
    pub text: TextOptions,
}

/// Why a request finished, as the edge reports it.
#[derive(Clone, Debug, PartialEq)]
pub enum Finish {
    /// A stop string matched.
    StopString(String),
    /// An eos or stop token was generated.
    StopToken(u32),
    /// The token budget or the context ran out.
    Length,
    /// The engine gave up.
    Abort(String),
}

impl Finish {
    /// SGLang's `meta_info.finish_reason`.
    pub fn to_native(&self, completion_tokens: usize) -> serde_json::Value {
        use serde_json::json;
        match self {
            Finish::StopString(s) => json!({"type": "stop", "matched": s}),
            Finish::StopToken(t) => json!({"type": "stop", "matched": t}),
            Finish::Length => json!({"type": "length", "length": completion_tokens}),
            Finish::Abort(m) => json!({"type": "abort", "message": m}),
        }
    }

    /// OpenAI's `finish_reason`.
    pub fn openai_reason(&self) -> &'static str {
        match self {
            Finish::StopString(_) | Finish::StopToken(_) => "stop",
            Finish::Length => "length",
            Finish::Abort(_) => "abort",
        }
    }

    /// SGLang's `matched_stop` extension in OpenAI choices.
    pub fn matched_stop(&self) -> serde_json::Value {
        match self {
            Finish::StopString(s) => serde_json::json!(s),
            Finish::StopToken(t) => serde_json::json!(t),
            _ => serde_json::Value::Null,
        }
    }
}

/// What one call to [`Generation::advance`] brought.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// The prompt is prefilled.
    Started,
    /// A token was generated.
    Token,
    /// The request is done; `finish` is set.
    Finished,
}

/// The state of one running request.
pub struct Generation {
    events: Option<EventStream>,
    /// `None` on a server without a tokenizer: no text, only ids.
    decoder: Option<IncrementalDecoder>,
    opts: TextOptions,
    longest_stop: usize,
    /// Tokens that may end the request (eos unless ignored, stop ids): decoded only once the next
    /// event shows they did not, so that a trimmed stop token never reaches streamed text.
    stop_ids: HashSet<u32>,
    held: Option<u32>,
    text: String,
    released: usize,
    /// The prompt.
    pub prompt_ids: Vec<u32>,
    /// First prompt position with input log-probs.
    pub logprob_start: Option<usize>,
    /// Generated ids (a stop token included).
    pub output_ids: Vec<u32>,
    /// Log-probs of generated tokens (with `return_logprob`).
    pub output_logprobs: Vec<TokenLogprob>,
    /// Log-probs of prompt tokens from `logprob_start`.
    pub input_logprobs: Vec<Option<TokenLogprob>>,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
    /// Set once finished.
    pub finish: Option<Finish>,
    /// When the HTTP request arrived.
    pub arrived: Instant,
    /// When it finished.
    pub finished_at: Option<Instant>,
}

/// The refusal of `what` on a server without a tokenizer, pointing to `instead`.
pub fn no_tokenizer(what: &str, instead: &str) -> ApiError {
    ApiError::bad_request(format!(
        "{what} need a tokenizer, and this server runs without one (--skip-tokenizer-init, or \
         --load-format dummy without tokenizer.json); use {instead}"
    ))
}

/// Submits every job before awaiting any, so the engine sees them together; on the first
/// refusal the ones already submitted are dropped (which cancels them).
pub fn submit_all(
    engine: &EngineHandle,
    tokenizer: Option<&TextTokenizer>,
    eos_token_ids: &[u32],
    jobs: Vec<Job>,
    arrived: Instant,
) -> Result<Vec<Generation>, ApiError> {
    let mut out = Vec::with_capacity(jobs.len());
    for job in jobs {
        if tokenizer.is_none() && !job.text.stop.is_empty() {
            return Err(no_tokenizer("`stop` strings", "`stop_token_ids`"));
        }
        let prompt_ids = job.request.input_ids.clone();
        let logprob_start = job
            .request
            .logprobs
            .return_logprob
            .then_some(job.request.logprobs.logprob_start_len)
            .flatten();
        let mut stop_ids: HashSet<u32> = job.request.sampling.stop_token_ids.iter().copied().collect();
        if !job.request.sampling.ignore_eos {
            stop_ids.extend(eos_token_ids.iter().copied());
        }
        let events = engine.submit(job.request)?;
        out.push(Generation::new(
            events,
            tokenizer,
            prompt_ids,
            logprob_start,
            stop_ids,
            job.text,
            arrived,
        ));
    }
    Ok(out)
}

impl Generation {
    /// Follows `events` for a request with prompt `prompt_ids`.
    pub fn new(
        events: EventStream,
        tokenizer: Option<&TextTokenizer>,
        prompt_ids: Vec<u32>,
        logprob_start: Option<usize>,
        stop_ids: HashSet<u32>,
        opts: TextOptions,
        arrived: Instant,
    ) -> Self {
        let decoder =
            tokenizer.map(|t| IncrementalDecoder::with_prompt(t, &prompt_ids, opts.skip_special_tokens));
        let longest_stop = opts.stop.iter().map(String::len).max().unwrap_or(0);
        Generation {
            events: Some(events),
            decoder,
            opts,
            longest_stop,
            stop_ids,
            held: None,
            text: String::new(),
            released: 0,
            prompt_ids,
            logprob_start,
            output_ids: Vec::new(),
            output_logprobs: Vec::new(),
            input_logprobs: Vec::new(),
            cached_tokens: 0,
            finish: None,
            arrived,
            finished_at: None,
        }
    }

    /// The text that is final so far (all of it once finished).
    pub fn text(&self) -> &str {
        &self.text[..self.released]
    }

    /// Whether the output has text: not on a server without a tokenizer.
    pub fn has_text(&self) -> bool {
        self.decoder.is_some()
    }

    /// Whether the request is done.
    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// Seconds from arrival to the end (or to now).
    pub fn latency(&self) -> f64 {
        self.finished_at
            .unwrap_or_else(Instant::now)
            .duration_since(self.arrived)
            .as_secs_f64()
    }

    /// Waits for and applies the next engine event.
    pub async fn advance(&mut self) -> Result<Progress, ApiError> {
        if self.finish.is_some() {
            return Ok(Progress::Finished);
        }
        let event = match self.events.as_mut() {
            Some(events) => events.recv().await,
            None => None,
        };
        match event {
            Some(EngineEvent::Started {
                cached_tokens,
                input_logprobs,
            }) => {
                self.cached_tokens = cached_tokens;
                self.input_logprobs = input_logprobs;
                Ok(Progress::Started)
            }
            Some(EngineEvent::Token(t)) => {
                self.on_token(t)?;
                Ok(if self.finish.is_some() {
                    Progress::Finished
                } else {
                    Progress::Token
                })
            }
            Some(EngineEvent::Finished(reason)) => {
                self.on_finished(reason)?;
                Ok(Progress::Finished)
            }
            None => {
                self.on_finished(FinishReason::Abort(
                    "the engine stopped before the request finished".into(),
                ))?;
                Ok(Progress::Finished)
            }
        }
    }

    /// Runs to the end.
    pub async fn run(mut self) -> Result<Self, ApiError> {
        while self.advance().await? != Progress::Finished {}
        Ok(self)
    }

    fn on_token(&mut self, t: TokenLogprob) -> Result<(), ApiError> {
        let id = t.token_id;
        self.output_ids.push(id);
        self.output_logprobs.push(t);
        if let Some(prev) = self.held.take() {
            self.decode(prev)?;
            if self.finish.is_some() {
                return Ok(());
            }
        }
        if self.stop_ids.contains(&id) {
            self.held = Some(id);
            Ok(())
        } else {
            self.decode(id)
        }
    }

    fn on_finished(&mut self, reason: FinishReason) -> Result<(), ApiError> {
        let finish = match reason {
            FinishReason::Stop { token_id } => {
                match self.held.take() {
                    // SGLang leaves the stop token out of the text unless `no_stop_trim`.
                    Some(h) if h == token_id && !self.opts.no_stop_trim => {}
                    Some(h) => self.decode(h)?,
                    None => {}
                }
                Finish::StopToken(token_id)
            }
            FinishReason::Length => Finish::Length,
            FinishReason::Abort(m) => Finish::Abort(m),
        };
        if self.finish.is_none() {
            if let Some(h) = self.held.take() {
                self.decode(h)?;
            }
        }
        if let (None, Some(decoder)) = (&self.finish, &mut self.decoder) {
            let rest = decoder.finish().map_err(|e| ApiError::Internal(e.to_string()))?;
            if let Some(rest) = rest {
                self.append(&rest);
            }
        }
        if self.finish.is_none() {
            self.finish = Some(finish);
        }
        self.close();
        Ok(())
    }

    fn decode(&mut self, id: u32) -> Result<(), ApiError> {
        let Some(decoder) = &mut self.decoder else {
            return Ok(());
        };
        let piece = decoder.push(id).map_err(|e| ApiError::Internal(e.to_string()))?;
        if let Some(piece) = piece {
            self.append(&piece);
        }
        Ok(())
    }

    /// Appends decoded text, then matches stop strings and moves the release point.
    fn append(&mut self, piece: &str) {
        let before = self.text.len();
        self.text.push_str(piece);
        if self.opts.stop.is_empty() {
            self.released = self.text.len();
            return;
        }
        // A match can start at most longest-1 bytes before the new text.
        let mut from = before.saturating_sub(self.longest_stop.saturating_sub(1));
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .opts
            .stop
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|p| (from + p, s)))
            .min_by_key(|(p, s)| (*p, std::cmp::Reverse(s.len())));
        if let Some((pos, stop)) = hit {
            let stop = stop.clone();
            let end = if self.opts.no_stop_trim {
                pos + stop.len()
            } else {
                pos
            };
            self.text.truncate(end);
            self.released = end;
            self.finish = Some(Finish::StopString(stop));
            self.close();
            return;
        }
        // Hold back the longest tail that could still grow into a stop string.
        let held = self
            .opts
            .stop
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .rev()
                    .filter(move |&k| s.is_char_boundary(k))
                    .map(move |k| &s[..k])
            })
            .filter(|prefix| self.text.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        self.released = self.released.max(self.text.len() - held);
    }

    /// Drops the event stream: the engine cancels the request if it is still running.
    fn close(&mut self) {
        self.events = None;
        self.held = None;
        if self.finished_at.is_none() {
            self.finished_at = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    fn tokenizer() -> TextTokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny/llama");
        TextTokenizer::from_hf_dir(&dir).unwrap()
    }

    fn token(id: u32) -> EngineEvent {
        EngineEvent::Token(TokenLogprob {
            token_id: id,
            logprob: -0.5,
            top: vec![],
        })
    }

    /// Feeds `events` to a generation with `opts` and returns it finished, plus the texts seen
    /// after each event.
    fn run(tok: &TextTokenizer, opts: TextOptions, events: Vec<EngineEvent>) -> (Generation, Vec<String>) {
        run_with(Some(tok), opts, events)
    }

    fn run_with(
        tok: Option<&TextTokenizer>,
        opts: TextOptions,
        events: Vec<EngineEvent>,
    ) -> (Generation, Vec<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        for e in events {
            tx.send(e).unwrap();
        }
        drop(tx);
        let stop_ids: HashSet<u32> = [2].into();
        let mut g = Generation::new(rx, tok, vec![5, 6], None, stop_ids, opts, Instant::now());
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut seen = Vec::new();
        rt.block_on(async {
            while g.advance().await.unwrap() != Progress::Finished {
                seen.push(g.text().to_string());
            }
        });
        (g, seen)
    }

    fn ids(tok: &TextTokenizer, text: &str) -> Vec<u32> {
        tok.encode(text, false).unwrap()
    }

    fn started() -> EngineEvent {
        EngineEvent::Started {
            cached_tokens: 3,
            input_logprobs: vec![],
        }
    }

    /// Without a tokenizer a generation keeps every id (the stop token too) and no text.
    #[test]
    fn without_a_tokenizer_only_ids_are_kept() {
        let events = vec![
            started(),
            token(7),
            token(2),
            EngineEvent::Finished(FinishReason::Stop { token_id: 2 }),
        ];
        let (g, seen) = run_with(None, TextOptions::default(), events);
        assert!(!g.has_text());
        assert_eq!((g.output_ids.as_slice(), g.text()), (&[7, 2][..], ""));
        assert_eq!(g.finish, Some(Finish::StopToken(2)));
        assert!(seen.iter().all(String::is_empty));
    }

    #[test]
    fn a_stop_string_trims_the_text_and_cancels() {
        let tok = tokenizer();
        let mut events = vec![started()];
        events.extend(ids(&tok, "Hello world. More").into_iter().map(token));
        let opts = TextOptions {
            stop: vec![". M".into()],
            skip_special_tokens: true,
            no_stop_trim: false,
        };
        let (g, seen) = run(&tok, opts.clone(), events.clone());
        assert_eq!(g.finish, Some(Finish::StopString(". M".into())));
        assert_eq!(g.text(), "Hello world");
        assert_eq!(g.cached_tokens, 3);
        // Streamed text only ever grows and never shows part of the stop string.
        for w in seen.windows(2) {
            assert!(w[1].starts_with(&w[0]), "{seen:?}");
        }
        assert!(seen.iter().all(|s| !s.contains('.')), "{seen:?}");
        let (g, _) = run(
            &tok,
            TextOptions {
                no_stop_trim: true,
                ..opts
            },
            events,
        );
        assert_eq!(g.text(), "Hello world. M");
    }

    #[test]
    fn a_stop_token_is_left_out_of_the_text_unless_no_stop_trim() {
        let tok = tokenizer();
        let mut events = vec![started()];
        events.extend(ids(&tok, "Hi").into_iter().map(token));
        events.push(token(2));
        events.push(EngineEvent::Finished(FinishReason::Stop { token_id: 2 }));
        let opts = TextOptions {
            skip_special_tokens: false,
            ..Default::default()
        };
        let (g, _) = run(&tok, opts.clone(), events.clone());
        assert_eq!(g.finish, Some(Finish::StopToken(2)));
        assert_eq!(g.text(), "Hi");
        assert_eq!(
            g.output_ids.last(),
            Some(&2),
            "the stop token stays in output_ids"
        );
        let (g, _) = run(
            &tok,
            TextOptions {
                no_stop_trim: true,
                ..opts
            },
            events,
        );
        assert_eq!(g.text(), "Hi<|im_end|>");
    }

    #[test]
    fn length_and_a_vanished_engine_finish_cleanly() {
        let tok = tokenizer();
        let mut events = vec![started()];
        events.extend(ids(&tok, "ab").into_iter().map(token));
        events.push(EngineEvent::Finished(FinishReason::Length));
        let (g, _) = run(&tok, TextOptions::default(), events);
        assert_eq!((g.finish.clone(), g.text()), (Some(Finish::Length), "ab"));
        let (g, _) = run(&tok, TextOptions::default(), vec![started(), token(70)]);
        assert!(matches!(g.finish, Some(Finish::Abort(_))));
    }

    #[test]
    fn native_finish_reasons_have_sglang_shapes() {
        use serde_json::json;
        assert_eq!(
            Finish::Length.to_native(7),
            json!({"type": "length", "length": 7})
        );
        assert_eq!(
            Finish::StopToken(2).to_native(1),
            json!({"type": "stop", "matched": 2})
        );
        assert_eq!(
            Finish::StopString("x".into()).to_native(1),
            json!({"type": "stop", "matched": "x"})
        );
    }
}
