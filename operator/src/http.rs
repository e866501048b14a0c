//! The operator's own HTTP port: `/metrics` (Prometheus text) and `/health` (200 while the
//! process runs).

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Registry, TextEncoder};

use crate::{Error, Result};

/// The router.
pub fn router(registry: Registry) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .with_state(registry)
}

async fn metrics(State(registry): State<Registry>) -> impl IntoResponse {
    let mut buf = Vec::new();
    let encoder = TextEncoder::new();
    match encoder.encode(&registry.gather(), &mut buf) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_string())],
            buf,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_string())],
            e.to_string().into_bytes(),
        ),
    }
}

async fn health() -> &'static str {
    "ok"
}

/// Serves the router on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, registry: Registry) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {addr}: {e}")))?;
    serve_on(listener, registry).await
}

/// Serves the router on a bound listener until the process ends.
pub async fn serve_on(listener: tokio::net::TcpListener, registry: Registry) -> Result<()> {
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Config(format!("listener: {e}")))?;
    tracing::info!(%addr, "serving /metrics and /health");
    axum::serve(listener, router(registry))
        .await
        .map_err(|e| Error::Config(format!("HTTP server on {addr}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Metrics;

    #[tokio::test]
    async fn metrics_and_health_answer() {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        drop(metrics.measure());
        metrics.failed(&Error::Config("x".into()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(serve_on(listener, registry));
        let health = reqwest::get(format!("{base}/health")).await.unwrap();
        assert_eq!(
            (health.status().as_u16(), health.text().await.unwrap().as_str()),
            (200, "ok")
        );
        let m = reqwest::get(format!("{base}/metrics")).await.unwrap();
        assert_eq!(m.status(), 200);
        let text = m.text().await.unwrap();
        for line in [
            "loraplane_operator_reconciles_total 1",
            "loraplane_operator_reconcile_errors_total{reason=\"config\"} 1",
            "loraplane_operator_reconcile_duration_seconds_count 1",
            "loraplane_operator_managed_adapters 0",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        server.abort();
    }
}
