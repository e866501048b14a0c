//! The OpenAI-compatible endpoints: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.
//! `model` picks the adapter as SGLang does: `<base>:<adapter>`, the adapter's name, or the base
//! name for the base model (SGLang's `lora_path` body field works too). Errors use OpenAI's shape.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};

use crate::engine::request::{EngineRequest, LogprobOptions};
use crate::model::tokenizer::{ChatMessage, TextTokenizer};

use super::body::{json_object, type_error, Fields, FromJson};
use super::error::{ApiError, OpenAiError};
use super::generation::{no_tokenizer, submit_all, Generation, Job, Progress, TextOptions};
use super::native::{check_adapter, sse_json};
use super::params::{read_sampling, DefaultMaxTokens, Names, SamplingSpec, MAX_TOP_LOGPROBS};
use super::{blocking, logprobs, request_id, unix_now, SharedState};

/// OpenAI's default `max_tokens` for completions.
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

fn model_card(id: &str, root: &str, parent: Option<&str>, max_len: Option<usize>) -> Value {
    json!({
        "id": id,
        "object": "model",
        "created": unix_now(),
        "owned_by": "loraplane",
        "root": root,
        "parent": parent,
        "max_model_len": max_len,
    })
}

/// `GET /v1/models`: the base model, then every loaded adapter (`parent` is the base).
pub async fn models(State(s): State<SharedState>) -> Json<Value> {
    let base = &s.served_model_name;
    let mut data = vec![model_card(base, base, None, Some(s.engine.context_length()))];
    for a in s.engine.adapters() {
        data.push(model_card(
            &a.name,
            &a.path.display().to_string(),
            Some(base),
            None,
        ));
    }
    Json(json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{model}`.
pub async fn model(State(s): State<SharedState>, Path(model): Path<String>) -> Response {
    match resolve_model(&s, Some(&model), None) {
        Ok(None) => Json(model_card(&model, &model, None, Some(s.engine.context_length()))).into_response(),
        Ok(Some(adapter)) => {
            let path = s
                .engine
                .adapters()
                .into_iter()
                .find(|a| a.name == adapter)
                .map(|a| a.path.display().to_string())
                .unwrap_or_default();
            Json(model_card(&model, &path, Some(&s.served_model_name), None)).into_response()
        }
        Err(e) => OpenAiError(e).into_response(),
    }
}

/// The adapter a request runs with: from `model` (`base`, `adapter` or `base:adapter`) and
/// SGLang's optional `lora_path` field.
fn resolve_model(
    s: &SharedState,
    model: Option<&str>,
    lora_path: Option<String>,
) -> Result<Option<String>, ApiError> {
    let base = s.served_model_name.as_str();
    let registered = |name: &str| s.engine.adapters().iter().any(|a| a.name == name);
    let from_model = match model {
        None => None,
        Some(m) if m == base => None,
        Some(m) => match m.split_once(':') {
            Some((b, a)) if b == base && a.is_empty() => None,
            Some((b, a)) if b == base && registered(a) => Some(a.to_string()),
            None if registered(m) => Some(m.to_string()),
            _ => return Err(ApiError::ModelNotFound(m.to_string())),
        },
    };
    match (from_model, lora_path.filter(|p| !p.is_empty())) {
        (Some(a), Some(p)) if a != p => Err(ApiError::invalid(
            "lora_path",
            format!("`model` names adapter {a:?} but `lora_path` names {p:?}"),
        )),
        (Some(a), _) => Ok(Some(a)),
        (None, p) => check_adapter(s, p, "lora_path"),
    }
}

/// What both endpoints share once parsed.
struct Call {
    model: String,
    adapter: Option<String>,
    spec: SamplingSpec,
    stream: bool,
    include_usage: bool,
    /// Top alternatives per token when log-probs are on.
    logprobs: Option<usize>,
}

/// Reads `model`, the sampling fields, `stream`/`stream_options`, `lora_path`, and refuses the
/// OpenAI features that are not implemented.
fn read_common(
    s: &SharedState,
    f: &mut Fields,
) -> Result<(String, Option<String>, SamplingSpec, bool, bool), ApiError> {
    let model = f.get::<String>("model")?;
    let lora_path = f.get::<String>("lora_path")?;
    let adapter = resolve_model(s, model.as_deref(), lora_path)?;
    let names = Names {
        max_tokens: &["max_tokens", "max_completion_tokens"],
    };
    let spec = read_sampling(f, &names, &s.limits)?;
    let stream = f.get::<bool>("stream")?.unwrap_or(false);
    let mut include_usage = false;
    if let Some(mut so) = f.object("stream_options")? {
        include_usage = so.get::<bool>("include_usage")?.unwrap_or(false);
        so.get::<bool>("continuous_usage_stats")?;
        so.reject_unknown()?;
    }
    if let Some(bias) = f.take("logit_bias") {
        if bias.as_object().is_none_or(|m| !m.is_empty()) {
            return Err(ApiError::invalid(
                "logit_bias",
                "`logit_bias` is not supported yet",
            ));
        }
    }
    f.take("user");
    Ok((
        model.unwrap_or_else(|| s.served_model_name.clone()),
        adapter,
        spec,
        stream,
        include_usage,
    ))
}

fn jobs_for(
    s: &SharedState,
    call: &Call,
    prompts: &[Vec<u32>],
    default_max: DefaultMaxTokens,
) -> Result<Vec<Job>, ApiError> {
    let mut jobs = Vec::with_capacity(prompts.len() * call.spec.n);
    for prompt in prompts {
        for j in 0..call.spec.n {
            let sampling = call.spec.for_prompt(prompt.len(), j, default_max, &s.limits)?;
            jobs.push(Job {
                request: EngineRequest {
                    input_ids: prompt.clone(),
                    lora: call.adapter.clone(),
                    sampling,
                    logprobs: LogprobOptions {
                        return_logprob: call.logprobs.is_some(),
                        logprob_start_len: None,
                        top_logprobs_num: call.logprobs.unwrap_or(0),
                    },
                },
                text: TextOptions {
                    stop: call.spec.stop.clone(),
                    skip_special_tokens: call.spec.skip_special_tokens,
                    no_stop_trim: call.spec.no_stop_trim,
                },
            });
        }
    }
    Ok(jobs)
}

fn usage(gens: &[&Generation], n: usize) -> Value {
    // Each prompt counts once, however many samples it has (as OpenAI does).
    let prompt: usize = gens.iter().step_by(n.max(1)).map(|g| g.prompt_ids.len()).sum();
    let cached: usize = gens.iter().step_by(n.max(1)).map(|g| g.cached_tokens).sum();
    let completion: usize = gens.iter().map(|g| g.output_ids.len()).sum();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// Which endpoint a stream belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// Shared by the choice streams of one streaming response.
struct StreamCtx {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    logprobs: Option<usize>,
    n: usize,
    /// `(prompt, completion, cached)` tokens of each finished choice.
    usage: Mutex<Vec<Option<(usize, usize, usize)>>>,
}

impl StreamCtx {
    fn new(kind: Kind, id: String, call: &Call, choices: usize) -> Self {
        Self {
            kind,
            id,
            created: unix_now(),
            model: call.model.clone(),
            include_usage: call.include_usage,
            logprobs: call.logprobs,
            n: call.spec.n,
            usage: Mutex::new(vec![None; choices]),
        }
    }

    fn chunk(&self, choice: Value) -> Value {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let mut c = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    fn usage_chunk(&self) -> Value {
        let usage = self.usage.lock().expect("usage lock");
        let (mut prompt, mut completion, mut cached) = (0, 0, 0);
        for (i, u) in usage.iter().enumerate() {
            if let Some((p, c, k)) = u {
                if i % self.n.max(1) == 0 {
                    prompt += p;
                    cached += k;
                }
                completion += c;
            }
        }
        let mut c = self.chunk(Value::Null);
        c["choices"] = json!([]);
        c["usage"] = json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        });
        c
    }
}

/// The SSE stream of a response: an opening chunk per choice (chat role, completion echo),
/// the choices' deltas interleaved as they come, the usage chunk when asked, then `[DONE]`.
fn stream_response(
    tok: Arc<TextTokenizer>,
    ctx: Arc<StreamCtx>,
    gens: Vec<Generation>,
    openers: Vec<Option<Value>>,
) -> Response {
    let opening: Vec<Event> = openers
        .into_iter()
        .flatten()
        .map(|choice| sse_json(&ctx.chunk(choice)))
        .collect();
    let choices = gens.into_iter().enumerate().map(|(index, g)| {
        let tok = tok.clone();
        let ctx = ctx.clone();
        stream::unfold(Some((g, 0usize, 0usize)), move |state| {
            let tok = tok.clone();
            let ctx = ctx.clone();
            async move {
                let (mut g, mut sent, mut sent_lp) = state?;
                loop {
                    let progress = match g.advance().await {
                        Ok(p) => p,
                        Err(e) => return Some((sse_json(&e.openai_body()), None)),
                    };
                    if progress == Progress::Started {
                        continue;
                    }
                    let finished = progress == Progress::Finished;
                    let delta = g.text()[sent..].to_string();
                    let new_lps = if ctx.logprobs.is_some() {
                        &g.output_logprobs[sent_lp..]
                    } else {
                        &[][..]
                    };
                    if !finished && delta.is_empty() && new_lps.is_empty() {
                        continue;
                    }
                    let lp = ctx.logprobs.map(|top| match ctx.kind {
                        Kind::Chat => logprobs::chat(&tok, new_lps, top),
                        Kind::Completion => logprobs::completions(&tok, new_lps, top, sent),
                    });
                    let finish = g.finish.as_ref().filter(|_| finished);
                    let mut choice = match ctx.kind {
                        Kind::Chat => {
                            let delta = if delta.is_empty() {
                                json!({})
                            } else {
                                json!({"content": delta})
                            };
                            json!({"index": index, "delta": delta, "logprobs": lp})
                        }
                        Kind::Completion => json!({"index": index, "text": delta, "logprobs": lp}),
                    };
                    choice["finish_reason"] = json!(finish.map(|f| f.openai_reason()));
                    choice["matched_stop"] = finish.map(|f| f.matched_stop()).unwrap_or(Value::Null);
                    sent = g.text().len();
                    sent_lp = g.output_logprobs.len();
                    let event = sse_json(&ctx.chunk(choice));
                    if finished {
                        let mut usage = ctx.usage.lock().expect("usage lock");
                        usage[index] = Some((g.prompt_ids.len(), g.output_ids.len(), g.cached_tokens));
                        return Some((event, None));
                    }
                    return Some((event, Some((g, sent, sent_lp))));
                }
            }
        })
        .boxed()
    });
    let tail_ctx = ctx.clone();
    let tail = stream::once(async move { tail_ctx.include_usage.then(|| sse_json(&tail_ctx.usage_chunk())) })
        .filter_map(|e| async move { e });
    let events = stream::iter(opening)
        .chain(stream::select_all(choices))
        .chain(tail)
        .chain(stream::once(async { Event::default().data("[DONE]") }))
        .map(Ok::<_, Infallible>);
    Sse::new(events).into_response()
}

/// The prompts of a completions request, their echo text, as token ids.
fn read_completion_prompts(
    s: &SharedState,
    f: &mut Fields,
) -> Result<(Vec<Vec<u32>>, Vec<String>), ApiError> {
    let tok = tokenizer(s)?;
    let encode = |t: &str, what: &str| {
        tok.encode(t, true)
            .map_err(|e| ApiError::invalid(what, format!("`{what}` could not be tokenized: {e}")))
    };
    let decode = |ids: &[u32]| tok.decode(ids, false).unwrap_or_default();
    let (prompts, texts): (Vec<Vec<u32>>, Vec<String>) = match f.take("prompt") {
        None => return Err(ApiError::invalid("prompt", "`prompt` is required")),
        Some(Value::String(t)) => (vec![encode(&t, "prompt")?], vec![t]),
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(ApiError::invalid("prompt", "`prompt` is an empty list"))
        }
        Some(v @ Value::Array(_)) => {
            let first = v
                .as_array()
                .and_then(|a| a.first())
                .cloned()
                .unwrap_or(Value::Null);
            match first {
                Value::String(_) => {
                    let texts = Vec::<String>::from_json(v, "prompt")?;
                    let ids = texts
                        .iter()
                        .enumerate()
                        .map(|(i, t)| encode(t, &format!("prompt[{i}]")))
                        .collect::<Result<Vec<_>, _>>()?;
                    (ids, texts)
                }
                Value::Array(_) => {
                    let ids = Vec::<Vec<u32>>::from_json(v, "prompt")?;
                    let texts = ids.iter().map(|p| decode(p)).collect();
                    (ids, texts)
                }
                _ => {
                    let ids = Vec::<u32>::from_json(v, "prompt")?;
                    let text = decode(&ids);
                    (vec![ids], vec![text])
                }
            }
        }
        Some(other) => {
            return Err(type_error(
                "prompt",
                "a string, a list of strings, a list of token ids or a list of lists",
                &other,
            ))
        }
    };
    for (i, p) in prompts.iter().enumerate() {
        let what = if prompts.len() == 1 {
            "prompt".to_string()
        } else {
            format!("prompt[{i}]")
        };
        s.limits.check_prompt(p, &what)?;
    }
    Ok((prompts, texts))
}

/// The tokenizer: the OpenAI API takes and returns text, so a server without one refuses it.
fn tokenizer(s: &SharedState) -> Result<&Arc<TextTokenizer>, ApiError> {
    s.tokenizer
        .as_ref()
        .ok_or_else(|| no_tokenizer("OpenAI API requests", "/generate with `input_ids`"))
}

/// `POST /v1/completions`.
pub async fn completions(State(s): State<SharedState>, body: Result<Bytes, BytesRejection>) -> Response {
    match completions_inner(s, body).await {
        Ok(r) => r,
        Err(e) => OpenAiError(e).into_response(),
    }
}

/// A parsed completions request.
struct Completion {
    call: Call,
    jobs: Vec<Job>,
    prompt_texts: Vec<String>,
    echo: bool,
}

fn parse_completions(s: &SharedState, body: Result<Bytes, BytesRejection>) -> Result<Completion, ApiError> {
    let mut f = Fields::new(json_object(body)?, "");
    let (model, adapter, spec, stream, include_usage) = read_common(s, &mut f)?;
    let (prompts, prompt_texts) = read_completion_prompts(s, &mut f)?;
    let logprobs = f.get::<usize>("logprobs")?;
    if logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
        return Err(ApiError::invalid(
            "logprobs",
            format!("`logprobs` must be at most {MAX_TOP_LOGPROBS}"),
        ));
    }
    let echo = f.get::<bool>("echo")?.unwrap_or(false);
    if let Some(best_of) = f.get::<usize>("best_of")? {
        if best_of != spec.n {
            return Err(ApiError::invalid(
                "best_of",
                "`best_of` other than `n` is not supported",
            ));
        }
    }
    if f.get::<String>("suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
    }
    f.reject_unknown()?;
    let call = Call {
        model,
        adapter,
        spec,
        stream,
        include_usage,
        logprobs,
    };
    let jobs = jobs_for(s, &call, &prompts, Some(COMPLETIONS_DEFAULT_MAX_TOKENS))?;
    Ok(Completion {
        call,
        jobs,
        prompt_texts,
        echo,
    })
}

async fn completions_inner(
    s: SharedState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let tok = tokenizer(&s)?.clone();
    let st = s.clone();
    let Completion {
        call,
        jobs,
        prompt_texts,
        echo,
    } = blocking(move || parse_completions(&st, body)).await?;
    let n = call.spec.n;
    let gens = submit_all(&s.engine, Some(&tok), &s.limits.eos_token_ids, jobs, arrived)?;
    let id = format!("cmpl-{}", request_id());
    let echo_of = |i: usize| {
        if echo {
            prompt_texts[i / n].clone()
        } else {
            String::new()
        }
    };
    if call.stream {
        let ctx = Arc::new(StreamCtx::new(Kind::Completion, id, &call, gens.len()));
        let openers = (0..gens.len())
            .map(|i| {
                echo.then(|| json!({"index": i, "text": echo_of(i), "logprobs": null, "finish_reason": null}))
            })
            .collect();
        return Ok(stream_response(tok, ctx, gens, openers));
    }
    let done = futures::future::try_join_all(gens.into_iter().map(Generation::run)).await?;
    let choices: Vec<Value> = done
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let prefix = echo_of(i);
            let lp = call
                .logprobs
                .map(|top| logprobs::completions(&tok, &g.output_logprobs, top, prefix.len()));
            json!({
                "index": i,
                "text": format!("{prefix}{}", g.text()),
                "logprobs": lp,
                "finish_reason": g.finish.as_ref().map(|f| f.openai_reason()),
                "matched_stop": g.finish.as_ref().map(|f| f.matched_stop()),
            })
        })
        .collect();
    Ok(Json(json!({
        "id": id,
        "object": "text_completion",
        "created": unix_now(),
        "model": call.model,
        "choices": choices,
        "usage": usage(&done.iter().collect::<Vec<_>>(), n),
    }))
    .into_response())
}

/// A message's `content`: a string, or a list of text parts.
fn message_content(v: Option<Value>, path: &str) -> Result<String, ApiError> {
    match v {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (i, part) in parts.into_iter().enumerate() {
                let p = format!("{path}[{i}]");
                let Value::Object(map) = part else {
                    return Err(type_error(
                        &p,
                        "an object such as {\"type\": \"text\", \"text\": ...}",
                        &part,
                    ));
                };
                let mut pf = Fields::new(map, &p);
                match pf.get::<String>("type")?.as_deref() {
                    Some("text") => {}
                    Some(other) => {
                        return Err(ApiError::invalid(
                            &p,
                            format!("`{p}.type` {other:?} is not supported: only text content is"),
                        ))
                    }
                    None => return Err(ApiError::invalid(&p, format!("`{p}.type` is required"))),
                }
                let text = pf.get::<String>("text")?;
                texts.push(text.ok_or_else(|| ApiError::invalid(&p, format!("`{p}.text` is required")))?);
                pf.reject_unknown()?;
            }
            Ok(texts.join("\n"))
        }
        Some(other) => Err(type_error(path, "a string or a list of content parts", &other)),
    }
}

fn read_messages(f: &mut Fields) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(v) = f.take("messages") else {
        return Err(ApiError::invalid("messages", "`messages` is required"));
    };
    let Value::Array(items) = v else {
        return Err(type_error("messages", "a list of messages", &v));
    };
    if items.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` is empty"));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let path = format!("messages[{i}]");
        let Value::Object(map) = item else {
            return Err(type_error(&path, "an object with `role` and `content`", &item));
        };
        let mut mf = Fields::new(map, &path);
        let role = mf
            .get::<String>("role")?
            .ok_or_else(|| ApiError::invalid(&path, format!("`{path}.role` is required")))?;
        let content = message_content(mf.take("content"), &format!("{path}.content"))?;
        if mf
            .take("tool_calls")
            .is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(ApiError::invalid(&path, "tool calls are not supported"));
        }
        mf.take("name");
        mf.take("tool_call_id");
        mf.reject_unknown()?;
        out.push(ChatMessage::new(role, content));
    }
    Ok(out)
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(s): State<SharedState>, body: Result<Bytes, BytesRejection>) -> Response {
    match chat_inner(s, body).await {
        Ok(r) => r,
        Err(e) => OpenAiError(e).into_response(),
    }
}

fn parse_chat(s: &SharedState, body: Result<Bytes, BytesRejection>) -> Result<(Call, Vec<Job>), ApiError> {
    let mut f = Fields::new(json_object(body)?, "");
    let (model, adapter, spec, stream, include_usage) = read_common(s, &mut f)?;
    let messages = read_messages(&mut f)?;
    let want_logprobs = f.get::<bool>("logprobs")?.unwrap_or(false);
    let top = f.get::<usize>("top_logprobs")?;
    if let Some(t) = top {
        if !want_logprobs {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ));
        }
        if t > MAX_TOP_LOGPROBS {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("`top_logprobs` must be at most {MAX_TOP_LOGPROBS}"),
            ));
        }
    }
    if let Some(mut rf) = f.object("response_format")? {
        if rf.get::<String>("type")?.is_some_and(|t| t != "text") {
            return Err(ApiError::invalid(
                "response_format",
                "only `response_format` {\"type\": \"text\"} is supported",
            ));
        }
    }
    if f.take("tools")
        .is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(ApiError::invalid("tools", "tools are not supported yet"));
    }
    if let Some(choice) = f.take("tool_choice") {
        if choice != json!("none") && choice != json!("auto") {
            return Err(ApiError::invalid("tool_choice", "tools are not supported yet"));
        }
    }
    for key in ["parallel_tool_calls", "separate_reasoning", "stream_reasoning"] {
        f.get::<bool>(key)?;
    }
    f.reject_unknown()?;

    let tok = tokenizer(s)?;
    let rendered = tok
        .apply_chat_template(&messages, true)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let prompt = tok
        .encode(&rendered, false)
        .map_err(|e| ApiError::invalid("messages", format!("could not tokenize the conversation: {e}")))?;
    s.limits.check_prompt(&prompt, "messages")?;

    let call = Call {
        model,
        adapter,
        spec,
        stream,
        include_usage,
        logprobs: want_logprobs.then_some(top.unwrap_or(0)),
    };
    let jobs = jobs_for(s, &call, std::slice::from_ref(&prompt), None)?;
    Ok((call, jobs))
}

async fn chat_inner(s: SharedState, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let tok = tokenizer(&s)?.clone();
    let st = s.clone();
    let (call, jobs) = blocking(move || parse_chat(&st, body)).await?;
    let n = call.spec.n;
    let gens = submit_all(&s.engine, Some(&tok), &s.limits.eos_token_ids, jobs, arrived)?;
    let id = format!("chatcmpl-{}", request_id());
    if call.stream {
        let ctx = Arc::new(StreamCtx::new(Kind::Chat, id, &call, gens.len()));
        let openers = (0..gens.len())
            .map(|i| {
                Some(json!({
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": null,
                    "finish_reason": null,
                }))
            })
            .collect();
        return Ok(stream_response(tok, ctx, gens, openers));
    }
    let done = futures::future::try_join_all(gens.into_iter().map(Generation::run)).await?;
    let choices: Vec<Value> = done
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let lp = call.logprobs.map(|top| logprobs::chat(&tok, &g.output_logprobs, top));
            json!({
                "index": i,
                "message": {"role": "assistant", "content": g.text(), "tool_calls": null, "reasoning_content": null},
                "logprobs": lp,
                "finish_reason": g.finish.as_ref().map(|f| f.openai_reason()),
                "matched_stop": g.finish.as_ref().map(|f| f.matched_stop()),
            })
        })
        .collect();
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": unix_now(),
        "model": call.model,
        "choices": choices,
        "usage": usage(&done.iter().collect::<Vec<_>>(), n),
    }))
    .into_response())
}
