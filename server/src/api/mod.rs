//! The HTTP API: SGLang's native endpoints (`/generate`, `/load_lora_adapter`, ...) and the
//! OpenAI-compatible `/v1` endpoints, over one [`EngineHandle`].
//!
//! Requests are validated and tokenized here, once ([`params`], [`body`]); the engine sees only
//! [`EngineRequest`](crate::engine::request::EngineRequest)s. [`generation`] turns engine events
//! back into text. Every failure is an [`error::ApiError`], whose status is decided in one place.

pub mod body;
pub mod error;
pub mod generation;
mod logprobs;
mod native;
mod openai;
pub mod params;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;

use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use crate::model::tokenizer::TextTokenizer;

use error::{error_for_path, ApiError};
use params::Limits;

/// What every handler shares.
pub struct AppState {
    /// The engine.
    pub engine: EngineHandle,
    /// Tokenizer and chat template; `None` serves token ids only (`--skip-tokenizer-init`).
    pub tokenizer: Option<Arc<TextTokenizer>>,
    /// Rendered at `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The base model's name in the OpenAI API.
    pub served_model_name: String,
    /// `--model-path`.
    pub model_path: PathBuf,
    /// Model family reported by `/get_model_info` (`LlamaForCausalLM`, ...).
    pub architecture: String,
    /// What `/get_server_info` reports.
    pub server_info: Value,
    /// `--api-key`.
    pub api_key: Option<String>,
    /// LoRA serving is on (`--enable-lora` or `--lora-paths`).
    pub lora_enabled: bool,
    /// Context length, vocabulary and eos ids for validation.
    pub limits: Limits,
}

/// Shared state as handlers receive it.
pub type SharedState = Arc<AppState>;

/// The router with every endpoint, the API key check, the body limit and JSON fallbacks.
pub fn router(state: SharedState) -> Router {
    Router::new()
        .route("/health", get(native::health))
        .route("/health_generate", get(native::health_generate))
        .route("/get_model_info", get(native::model_info))
        .route("/model_info", get(native::model_info))
        .route("/get_server_info", get(native::server_info))
        .route("/server_info", get(native::server_info))
        .route("/metrics", get(native::metrics))
        .route("/generate", post(native::generate))
        .route("/load_lora_adapter", post(native::load_lora_adapter))
        .route("/unload_lora_adapter", post(native::unload_lora_adapter))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{*model}", get(openai::model))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), require_api_key))
        .layer(DefaultBodyLimit::max(body::MAX_BODY_BYTES))
        .with_state(state)
}

async fn not_found(req: Request) -> Response {
    let path = req.uri().path().to_string();
    error_for_path(&path, ApiError::NotFound(path.clone()))
}

async fn method_not_allowed(req: Request) -> Response {
    error_for_path(req.uri().path(), ApiError::MethodNotAllowed)
}

/// With `--api-key`, every endpoint but `/health` and `/metrics` needs `Authorization: Bearer`.
async fn require_api_key(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let Some(key) = state.api_key.as_deref() else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if matches!(path, "/health" | "/metrics") || req.method() == Method::OPTIONS {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => next.run(req).await,
        _ => error_for_path(path, ApiError::Unauthorized).into_response(),
    }
}

/// Compares without an early exit, so timing does not reveal how much of the key matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// How long in-flight requests may run on after ctrl-c or SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `state` on `listener` until ctrl-c or SIGTERM.
///
/// In-flight requests may run on for at most [`SHUTDOWN_GRACE`] after the signal: a long stream
/// must not hold the process forever.
pub async fn serve(listener: tokio::net::TcpListener, state: SharedState) -> std::io::Result<()> {
    use std::future::IntoFuture;
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    let stopping = Arc::new(tokio::sync::Notify::new());
    let notify = stopping.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown_signal().await;
        notify.notify_one();
    });
    tokio::select! {
        r = server.into_future() => r,
        _ = async {
            stopping.notified().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("requests still running after {SHUTDOWN_GRACE:?}; stopping anyway");
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

/// Runs the CPU-bound front of a request (JSON, validation, tokenization, chat template) on the
/// blocking pool, so a large prompt does not stall the async workers.
pub async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("reading the request failed: {e}")))?
}

/// A fresh request id: 32 hex digits, random enough to be unique in logs.
pub fn request_id() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let half = |salt: u64| {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(n);
        h.write_u64(salt);
        h.finish()
    };
    format!("{:016x}{:016x}", half(0), half(1))
}

/// Seconds since the Unix epoch (OpenAI's `created`).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_hex() {
        let a = request_id();
        let b = request_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn key_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
