//! SGLang's native endpoints: `/generate` (single or batch, streaming or not, one adapter per
//! prompt), `/load_lora_adapter` and `/unload_lora_adapter`, health checks, model and server
//! info, and `/metrics`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, StreamExt};
use serde_json::{json, Map, Value};

use crate::engine::request::{EngineEvent, EngineRequest, LogprobOptions, SamplingParams};

use super::body::{json_object, type_error, Fields, FromJson};
use super::error::ApiError;
use super::generation::{no_tokenizer, submit_all, Generation, Job, Progress, TextOptions};
use super::params::{read_sampling, Names, SamplingSpec, MAX_TOP_LOGPROBS};
use super::{blocking, logprobs, request_id, SharedState};

/// `max_new_tokens` when the request gives none (SGLang's default).
const DEFAULT_MAX_NEW_TOKENS: usize = 128;

const NATIVE_NAMES: Names = Names {
    max_tokens: &["max_new_tokens"],
};

/// How the outputs of one `/generate` call are shaped.
struct Shape {
    /// One prompt and `n == 1`: answer an object, not a list.
    single: bool,
    stream: bool,
    return_logprob: bool,
    top_logprobs_num: usize,
    return_text_in_logprobs: bool,
    /// `meta_info.id` of each output.
    ids: Vec<String>,
}

/// `POST /generate`.
pub async fn generate(State(s): State<SharedState>, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    let st = s.clone();
    let parsed = blocking(move || json_object(body).and_then(|b| parse_generate(&st, b))).await;
    let (jobs, shape) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => return e.into_response(),
    };
    let gens = match submit_all(
        &s.engine,
        s.tokenizer.as_deref(),
        &s.limits.eos_token_ids,
        jobs,
        arrived,
    ) {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    if shape.stream {
        return stream_generate(s, gens, shape).into_response();
    }
    // The generations live in this future: if the client goes away, dropping it cancels them.
    let done = match futures::future::try_join_all(gens.into_iter().map(Generation::run)).await {
        Ok(done) => done,
        Err(e) => return e.into_response(),
    };
    let outputs: Vec<Value> = done
        .iter()
        .enumerate()
        .map(|(i, g)| output_json(&s, g, &shape, i))
        .collect();
    if shape.single {
        Json(outputs.into_iter().next().unwrap_or(Value::Null)).into_response()
    } else {
        Json(Value::Array(outputs)).into_response()
    }
}

/// One output object: `text`, `output_ids`, `meta_info`.
fn output_json(s: &SharedState, g: &Generation, shape: &Shape, i: usize) -> Value {
    let completion_tokens = g.output_ids.len();
    let mut meta = Map::new();
    meta.insert("id".into(), json!(shape.ids[i]));
    meta.insert(
        "finish_reason".into(),
        g.finish
            .as_ref()
            .map(|f| f.to_native(completion_tokens))
            .unwrap_or(Value::Null),
    );
    meta.insert("prompt_tokens".into(), json!(g.prompt_ids.len()));
    meta.insert("completion_tokens".into(), json!(completion_tokens));
    meta.insert("cached_tokens".into(), json!(g.cached_tokens));
    meta.insert("e2e_latency".into(), json!(g.latency()));
    meta.insert("weight_version".into(), json!("default"));
    if shape.return_logprob {
        let text_of = s.tokenizer.as_deref().filter(|_| shape.return_text_in_logprobs);
        logprobs::native(&mut meta, g, text_of, shape.top_logprobs_num);
    }
    // Without a tokenizer there is no text, as in SGLang with --skip-tokenizer-init.
    if g.has_text() {
        json!({"text": g.text(), "output_ids": g.output_ids, "meta_info": meta})
    } else {
        json!({"output_ids": g.output_ids, "meta_info": meta})
    }
}

/// Streams `data: {output}` after each token of every generation (cumulative text, as SGLang),
/// then `data: [DONE]`. Batch outputs carry their `index`.
fn stream_generate(s: SharedState, gens: Vec<Generation>, shape: Shape) -> impl IntoResponse {
    let shape = std::sync::Arc::new(shape);
    let per_request = gens.into_iter().enumerate().map(|(i, g)| {
        let s = s.clone();
        let shape = shape.clone();
        stream::unfold(Some(g), move |state| {
            let s = s.clone();
            let shape = shape.clone();
            async move {
                let mut g = state?;
                loop {
                    let chunk = |g: &Generation| {
                        let mut out = output_json(&s, g, &shape, i);
                        if !shape.single {
                            out["index"] = json!(i);
                        }
                        out
                    };
                    match g.advance().await {
                        Ok(Progress::Started) => continue,
                        Ok(Progress::Token) => {
                            let out = chunk(&g);
                            return Some((sse_json(&out), Some(g)));
                        }
                        Ok(Progress::Finished) => return Some((sse_json(&chunk(&g)), None)),
                        Err(e) => return Some((sse_json(&e.native_body()), None)),
                    }
                }
            }
        })
        .boxed()
    });
    let events = stream::select_all(per_request)
        .chain(stream::once(async { Event::default().data("[DONE]") }))
        .map(Ok::<_, Infallible>);
    Sse::new(events)
}

/// One SSE event carrying `v` as JSON.
pub fn sse_json(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

/// A list field aligned with the batch, or one value for every prompt.
fn per_prompt<T: Clone>(
    value: Option<Value>,
    path: &str,
    batch: usize,
    one: impl Fn(Value, &str) -> Result<T, ApiError>,
) -> Result<Option<Vec<T>>, ApiError> {
    match value {
        None => Ok(None),
        Some(Value::Array(items)) => {
            if items.len() != batch {
                return Err(ApiError::invalid(
                    path,
                    format!(
                        "`{path}` has {} entries but the batch has {batch} prompts",
                        items.len()
                    ),
                ));
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| one(v, &format!("{path}[{i}]")))
                .collect::<Result<Vec<T>, _>>()
                .map(Some)
        }
        Some(v) => Ok(Some(vec![one(v, path)?; batch])),
    }
}

/// The prompts of a `/generate` body, as token ids, and whether it was a single prompt.
fn read_prompts(s: &SharedState, f: &mut Fields) -> Result<(Vec<Vec<u32>>, bool), ApiError> {
    let text = f.take("text");
    let ids = f.take("input_ids");
    let (prompts, single, what) = match (text, ids) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give either `text` or `input_ids`, not both",
            ))
        }
        (None, None) => return Err(ApiError::bad_request("`text` or `input_ids` is required")),
        (Some(Value::String(t)), None) => (vec![encode(s, &t, "text")?], true, "text"),
        (Some(v @ Value::Array(_)), None) => {
            let texts = Vec::<String>::from_json(v, "text")?;
            let ids = texts
                .iter()
                .enumerate()
                .map(|(i, t)| encode(s, t, &format!("text[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            (ids, false, "text")
        }
        (Some(v), None) => return Err(type_error("text", "a string or a list of strings", &v)),
        (None, Some(v)) => match &v {
            Value::Array(items) if items.first().is_some_and(Value::is_array) => {
                (Vec::<Vec<u32>>::from_json(v, "input_ids")?, false, "input_ids")
            }
            Value::Array(_) => (vec![Vec::<u32>::from_json(v, "input_ids")?], true, "input_ids"),
            _ => {
                return Err(type_error(
                    "input_ids",
                    "a list of token ids or a list of lists",
                    &v,
                ))
            }
        },
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid(what, format!("`{what}` is an empty batch")));
    }
    for (i, p) in prompts.iter().enumerate() {
        let name = if single {
            what.to_string()
        } else {
            format!("{what}[{i}]")
        };
        s.limits.check_prompt(p, &name)?;
    }
    Ok((prompts, single))
}

fn encode(s: &SharedState, text: &str, what: &str) -> Result<Vec<u32>, ApiError> {
    s.tokenizer
        .as_ref()
        .ok_or_else(|| no_tokenizer("text prompts", "`input_ids`"))?
        .encode(text, true)
        .map_err(|e| ApiError::invalid(what, format!("`{what}` could not be tokenized: {e}")))
}

/// Checks that `name` is a loaded adapter; `None` and `""` mean the base model.
pub fn check_adapter(s: &SharedState, name: Option<String>, path: &str) -> Result<Option<String>, ApiError> {
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        return Ok(None);
    };
    if !s.engine.adapters().iter().any(|a| a.name == name) {
        let hint = if s.lora_enabled {
            "load it with /load_lora_adapter or --lora-paths"
        } else {
            "LoRA serving is off: start the server with --enable-lora or --lora-paths"
        };
        return Err(ApiError::invalid(
            path,
            format!("`{path}`: LoRA adapter {name:?} is not loaded ({hint})"),
        ));
    }
    Ok(Some(name))
}

fn parse_generate(s: &SharedState, body: Map<String, Value>) -> Result<(Vec<Job>, Shape), ApiError> {
    let mut f = Fields::new(body, "");
    let (prompts, single_prompt) = read_prompts(s, &mut f)?;
    let batch = prompts.len();

    let specs: Vec<SamplingSpec> = per_prompt(
        Some(f.take("sampling_params").unwrap_or_else(|| json!({}))),
        "sampling_params",
        batch,
        |v, path| match v {
            Value::Object(map) => {
                let mut sf = Fields::new(map, path);
                let spec = read_sampling(&mut sf, &NATIVE_NAMES, &s.limits)?;
                sf.reject_unknown()?;
                Ok(spec)
            }
            other => Err(type_error(
                path,
                "an object (or a list of objects, one per prompt)",
                &other,
            )),
        },
    )?
    .unwrap_or_default();
    let n = specs[0].n;
    if specs.iter().any(|sp| sp.n != n) {
        return Err(ApiError::invalid(
            "sampling_params",
            "`sampling_params.n` must be the same for every prompt of a batch",
        ));
    }

    let loras: Vec<Option<String>> =
        per_prompt(f.take("lora_path"), "lora_path", batch, |v, path| match v {
            Value::Null => Ok(None),
            Value::String(name) => check_adapter(s, Some(name), path),
            other => Err(type_error(path, "an adapter name or null", &other)),
        })?
        .unwrap_or_else(|| vec![None; batch]);

    let stream = f.get::<bool>("stream")?.unwrap_or(false);
    let return_logprob = f.get::<bool>("return_logprob")?.unwrap_or(false);
    let logprob_start_len = f.get::<i64>("logprob_start_len")?.unwrap_or(-1);
    let top_logprobs_num = f.get::<usize>("top_logprobs_num")?.unwrap_or(0);
    let return_text_in_logprobs = f.get::<bool>("return_text_in_logprobs")?.unwrap_or(false);
    if return_text_in_logprobs && s.tokenizer.is_none() {
        return Err(no_tokenizer(
            "Texts in log-probs (`return_text_in_logprobs`)",
            "the token ids in the log-probs",
        ));
    }
    if top_logprobs_num > MAX_TOP_LOGPROBS {
        return Err(ApiError::invalid(
            "top_logprobs_num",
            format!("`top_logprobs_num` must be at most {MAX_TOP_LOGPROBS}, not {top_logprobs_num}"),
        ));
    }
    let logprob_start = match logprob_start_len {
        -1 => None,
        n if n >= 0 => Some(n as usize),
        n => {
            return Err(ApiError::invalid(
                "logprob_start_len",
                format!("`logprob_start_len` must be -1 (none of the prompt) or a position, not {n}"),
            ))
        }
    };
    if let (true, Some(start)) = (return_logprob, logprob_start) {
        if let Some(p) = prompts.iter().find(|p| start >= p.len()) {
            return Err(ApiError::invalid(
                "logprob_start_len",
                format!(
                    "`logprob_start_len` is {start} but a prompt has only {} tokens",
                    p.len()
                ),
            ));
        }
    }
    let rids: Option<Vec<String>> = per_prompt(f.take("rid"), "rid", batch, String::from_json)?;
    // Accepted for compatibility; they change nothing here.
    f.take("log_metrics");
    f.take("priority");
    f.reject_unknown()?;

    let mut jobs = Vec::with_capacity(batch * n);
    let mut ids = Vec::with_capacity(batch * n);
    for (i, ((prompt, spec), lora)) in prompts.into_iter().zip(&specs).zip(loras).enumerate() {
        for j in 0..n {
            let sampling: SamplingParams =
                spec.for_prompt(prompt.len(), j, Some(DEFAULT_MAX_NEW_TOKENS), &s.limits)?;
            jobs.push(Job {
                request: EngineRequest {
                    input_ids: prompt.clone(),
                    lora: lora.clone(),
                    sampling,
                    logprobs: LogprobOptions {
                        return_logprob,
                        logprob_start_len: logprob_start,
                        top_logprobs_num: if return_logprob { top_logprobs_num } else { 0 },
                    },
                },
                text: TextOptions {
                    stop: spec.stop.clone(),
                    skip_special_tokens: spec.skip_special_tokens,
                    no_stop_trim: spec.no_stop_trim,
                },
            });
            ids.push(match (&rids, n) {
                (Some(r), 1) => r[i].clone(),
                (Some(r), _) => format!("{}_{j}", r[i]),
                (None, _) => request_id(),
            });
        }
    }
    let shape = Shape {
        single: single_prompt && n == 1,
        stream,
        return_logprob,
        top_logprobs_num,
        return_text_in_logprobs,
        ids,
    };
    Ok((jobs, shape))
}

/// `{success, error_message, loaded_adapters}`, SGLang's answer to adapter management.
fn adapter_answer(s: &SharedState, result: Result<(), ApiError>) -> Response {
    let loaded: BTreeMap<String, String> = s
        .engine
        .adapters()
        .into_iter()
        .map(|a| (a.name, a.path.display().to_string()))
        .collect();
    let (status, message) = match &result {
        Ok(()) => (StatusCode::OK, String::new()),
        Err(e) => (e.status(), e.to_string()),
    };
    let body = json!({"success": result.is_ok(), "error_message": message, "loaded_adapters": loaded});
    (status, Json(body)).into_response()
}

fn lora_enabled(s: &SharedState) -> Result<(), ApiError> {
    if s.lora_enabled {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "LoRA serving is off: start the server with --enable-lora (or --lora-paths)",
        ))
    }
}

fn required_name(f: &mut Fields, key: &str) -> Result<String, ApiError> {
    match f.get::<String>(key)? {
        Some(v) if !v.trim().is_empty() => Ok(v),
        _ => Err(ApiError::invalid(key, format!("`{key}` is required"))),
    }
}

/// `POST /load_lora_adapter` `{lora_name, lora_path, pinned?}`.
pub async fn load_lora_adapter(
    State(s): State<SharedState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let parsed = json_object(body).and_then(|b| {
        lora_enabled(&s)?;
        let mut f = Fields::new(b, "");
        let name = required_name(&mut f, "lora_name")?;
        let path = required_name(&mut f, "lora_path")?;
        let pinned = f.get::<bool>("pinned")?.unwrap_or(false);
        f.reject_unknown()?;
        if s.engine.adapters().iter().any(|a| a.name == name) {
            return Err(ApiError::invalid(
                "lora_name",
                format!("LoRA adapter {name:?} is already loaded; unload it first to replace it"),
            ));
        }
        Ok((name, path, pinned))
    });
    let result = match parsed {
        Ok((name, path, pinned)) => {
            tracing::info!(lora_name = %name, lora_path = %path, pinned, "loading LoRA adapter");
            let r = s.engine.load_adapter(name.clone(), path.into(), pinned).await;
            if let Err(e) = &r {
                tracing::warn!(lora_name = %name, error = %e, "LoRA adapter load failed");
            }
            r.map_err(ApiError::from)
        }
        Err(e) => Err(e),
    };
    adapter_answer(&s, result)
}

/// `POST /unload_lora_adapter` `{lora_name}`.
pub async fn unload_lora_adapter(
    State(s): State<SharedState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let parsed = json_object(body).and_then(|b| {
        lora_enabled(&s)?;
        let mut f = Fields::new(b, "");
        let name = required_name(&mut f, "lora_name")?;
        f.reject_unknown()?;
        if !s.engine.adapters().iter().any(|a| a.name == name) {
            return Err(ApiError::invalid(
                "lora_name",
                format!("LoRA adapter {name:?} is not loaded"),
            ));
        }
        Ok(name)
    });
    let result = match parsed {
        Ok(name) => {
            tracing::info!(lora_name = %name, "unloading LoRA adapter");
            s.engine.unload_adapter(name).await.map_err(ApiError::from)
        }
        Err(e) => Err(e),
    };
    adapter_answer(&s, result)
}

/// `GET /health`: 200 while the server runs.
pub async fn health(State(s): State<SharedState>) -> StatusCode {
    if s.engine.is_alive() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// `GET /health_generate`: generates one token; 200 when it comes back within 20 s.
pub async fn health_generate(State(s): State<SharedState>) -> Response {
    let token = s
        .tokenizer
        .as_ref()
        .and_then(|t| t.bos_token_id())
        .or(s.engine.model_config().bos_token_id)
        .unwrap_or(0)
        .min(s.limits.vocab_size as u32 - 1);
    let req = EngineRequest {
        input_ids: vec![token],
        lora: None,
        sampling: SamplingParams {
            max_new_tokens: 1,
            temperature: 0.0,
            ..Default::default()
        },
        logprobs: LogprobOptions::default(),
    };
    let mut events = match s.engine.submit(req) {
        Ok(ev) => ev,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let wait = async {
        while let Some(ev) = events.recv().await {
            if let EngineEvent::Token(_) | EngineEvent::Finished(_) = ev {
                return true;
            }
        }
        false
    };
    match tokio::time::timeout(Duration::from_secs(20), wait).await {
        Ok(true) => StatusCode::OK.into_response(),
        Ok(false) => ApiError::Unavailable("the engine stopped".into()).into_response(),
        Err(_) => {
            ApiError::Unavailable("the engine did not generate a token within 20 s".into()).into_response()
        }
    }
}

/// `GET /get_model_info`.
pub async fn model_info(State(s): State<SharedState>) -> Json<Value> {
    let c = s.engine.model_config();
    Json(json!({
        "model_path": s.model_path,
        "tokenizer_path": s.tokenizer.as_ref().map(|_| &s.model_path),
        "served_model_name": s.served_model_name,
        "is_generation": true,
        "preferred_sampling_params": null,
        "weight_version": "default",
        "has_image_understanding": false,
        "has_audio_understanding": false,
        "model_type": s.architecture,
        "architectures": [s.architecture],
        "context_length": s.engine.context_length(),
        "vocab_size": c.vocab_size,
        "eos_token_ids": c.eos_token_ids,
    }))
}

/// `GET /get_server_info`: the effective flags plus live counts.
pub async fn server_info(State(s): State<SharedState>) -> Json<Value> {
    let mut info = s.server_info.clone();
    let (waiting, running) = s.engine.load();
    info["internal_states"] = json!([{"num_waiting_reqs": waiting, "num_running_reqs": running}]);
    info["loaded_adapters"] = s
        .engine
        .adapters()
        .into_iter()
        .map(|a| json!({"lora_name": a.name, "lora_path": a.path, "pinned": a.pinned}))
        .collect();
    Json(info)
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(s): State<SharedState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        s.metrics.render(),
    )
        .into_response()
}
