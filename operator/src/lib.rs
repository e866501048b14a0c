//! The loraplane operator: keeps `LoraAdapter` resources loaded on loraplane server pods.
//!
//! A [`LoraAdapter`](crd::LoraAdapter) names an adapter, its base model, where the servers read
//! it, whether it is pinned, which server pods take it (`serverSelector`) and how many
//! (`replicas`). The [`controller`] watches adapters and server pods; each reconcile lists the
//! selected pods ([`pods`]), reads what every ready pod's server has loaded ([`servers`]),
//! decides where the adapter belongs and what to do on each pod ([`plan`]), does it ([`sync`]),
//! and writes conditions, `loadedOn` and the phase back ([`status`]). A finalizer unloads the
//! adapter everywhere before the resource goes. [`metrics`], [`http`] and [`telemetry`] are the
//! operator's own observability; the `crdgen` binary prints the CRD.
#![deny(missing_docs)]

pub mod controller;
pub mod crd;
pub mod http;
pub mod metrics;
pub mod plan;
pub mod pods;
pub mod servers;
pub mod status;
pub mod sync;
pub mod telemetry;

#[cfg(test)]
mod fixtures;

pub use controller::{run, Context, RunConfig};
pub use crd::{LoraAdapter, LoraAdapterSpec, LoraAdapterStatus};
pub use metrics::Metrics;
pub use servers::{AdapterServers, HttpServers};

/// Everything that can go wrong in the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The finalizer helper failed (adding or removing the finalizer, or the wrapped pass).
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// A server did not answer.
    #[error("server {endpoint} unreachable: {message}")]
    ServerUnreachable {
        /// `http://IP:PORT`.
        endpoint: String,
        /// What failed.
        message: String,
    },
    /// A server answered a load or unload with an error.
    #[error("server {endpoint} refused to {action}: {message}")]
    ServerRefused {
        /// `http://IP:PORT`.
        endpoint: String,
        /// `load` or `unload`.
        action: &'static str,
        /// The server's `error_message`.
        message: String,
    },
    /// A server's answer was not what a loraplane server says.
    #[error("server {endpoint}: {message}")]
    ServerAnswer {
        /// `http://IP:PORT`.
        endpoint: String,
        /// What was wrong.
        message: String,
    },
    /// Some pods could not be brought in line; the status says which (retried with backoff).
    #[error("{count} pod(s) not in sync: {first}")]
    Sync {
        /// Metric label: `load_failed` or `server_unreachable`.
        reason: &'static str,
        /// Pods that failed.
        count: usize,
        /// The first failure.
        first: String,
    },
    /// Bad configuration (flags, addresses, clients).
    #[error("configuration: {0}")]
    Config(String),
    /// A metric could not be created or registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl Error {
    /// The `reason` label of `loraplane_operator_reconcile_errors_total` (a handful of values).
    pub fn reason(&self) -> &'static str {
        use kube::runtime::finalizer::Error as F;
        match self {
            Error::Kube(_) => "kube_api",
            Error::Finalizer(e) => match e.as_ref() {
                F::ApplyFailed(inner) | F::CleanupFailed(inner) => inner.reason(),
                _ => "finalizer",
            },
            Error::ServerUnreachable { .. } => "server_unreachable",
            Error::ServerRefused { .. } => "server_refused",
            Error::ServerAnswer { .. } => "server_answer",
            Error::Sync { reason, .. } => reason,
            Error::Config(_) => "config",
            Error::Metrics(_) => "metrics",
        }
    }
}

/// `Result` with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
