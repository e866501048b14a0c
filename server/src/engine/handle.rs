//! The engine's front door: a cloneable handle that the HTTP layer uses to submit requests and
//! manage adapters. Commands go to the scheduler thread over a channel (TGI's actor pattern);
//! replies come back on oneshot channels and events on per-request streams.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use tokio::sync::{mpsc, oneshot};

use super::request::{AdapterInfo, EngineError, EngineEvent, EngineRequest, EventStream};
use crate::adapter::LoraAdapter;
use crate::model::ModelConfig;

/// What the handle asks of the scheduler thread.
pub(crate) enum Command {
    Submit {
        req: EngineRequest,
        events: mpsc::UnboundedSender<EngineEvent>,
    },
    /// Register an adapter the handle already read from `path` in `seconds`.
    Load {
        name: String,
        path: PathBuf,
        pinned: bool,
        adapter: Box<LoraAdapter>,
        seconds: f64,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Unload {
        name: String,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
}

/// State the scheduler publishes for cheap reads from HTTP handlers.
#[derive(Default)]
pub(crate) struct Published {
    /// Registered adapters, sorted by name.
    pub adapters: Vec<AdapterInfo>,
    /// Requests waiting for admission.
    pub waiting: usize,
    /// Requests in the running batch.
    pub running: usize,
}

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    pub(crate) commands: std::sync::mpsc::Sender<Command>,
    pub(crate) published: Arc<RwLock<Published>>,
    pub(crate) model: Arc<ModelConfig>,
    pub(crate) context_length: usize,
    pub(crate) max_queued: usize,
    pub(crate) alive: Arc<std::sync::atomic::AtomicBool>,
}

impl EngineHandle {
    /// Queues a request. Fails at once for an unknown adapter, a prompt that cannot fit the
    /// context, or a full queue. Dropping the returned stream cancels the request.
    pub fn submit(&self, req: EngineRequest) -> Result<EventStream, EngineError> {
        if req.input_ids.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(&bad) = req
            .input_ids
            .iter()
            .find(|&&t| t as usize >= self.model.vocab_size)
        {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.model.vocab_size
            )));
        }
        if req.input_ids.len() >= self.context_length {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt has {} tokens; the context length is {} (at least one token must be generated)",
                req.input_ids.len(),
                self.context_length
            )));
        }
        {
            let p = self.published.read().expect("published lock");
            if let Some(name) = &req.lora {
                if !p.adapters.iter().any(|a| &a.name == name) {
                    return Err(EngineError::AdapterNotFound(name.clone()));
                }
            }
            if p.waiting >= self.max_queued {
                return Err(EngineError::Overloaded(format!(
                    "{} requests are waiting",
                    p.waiting
                )));
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.commands
            .send(Command::Submit { req, events: tx })
            .map_err(|_| EngineError::ShuttingDown)?;
        Ok(rx)
    }

    /// Loads adapter `name` from `path`; `pinned` keeps it in the slot pool. The files are read
    /// and checked on a blocking thread, so the engine keeps stepping while a large adapter
    /// loads; the engine then registers it (checking the name and the pin bound).
    pub async fn load_adapter(&self, name: String, path: PathBuf, pinned: bool) -> Result<(), EngineError> {
        let (n, p, model) = (name.clone(), path.clone(), self.model.clone());
        let t0 = std::time::Instant::now();
        let adapter = tokio::task::spawn_blocking(move || LoraAdapter::load(&n, &p, &model))
            .await
            .map_err(|e| EngineError::Adapter(format!("loading adapter {name:?}: {e}")))?
            .map_err(|e| EngineError::Adapter(e.to_string()))?;
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Load {
                name,
                path,
                pinned,
                adapter: Box::new(adapter),
                seconds: t0.elapsed().as_secs_f64(),
                reply,
            })
            .map_err(|_| EngineError::ShuttingDown)?;
        rx.await.map_err(|_| EngineError::ShuttingDown)?
    }

    /// Unloads adapter `name`; requests already running with it finish with its weights.
    pub async fn unload_adapter(&self, name: String) -> Result<(), EngineError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Unload { name, reply })
            .map_err(|_| EngineError::ShuttingDown)?;
        rx.await.map_err(|_| EngineError::ShuttingDown)?
    }

    /// Whether the engine thread is running (false once it has exited).
    pub fn is_alive(&self) -> bool {
        self.alive.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Registered adapters, sorted by name.
    pub fn adapters(&self) -> Vec<AdapterInfo> {
        self.published.read().expect("published lock").adapters.clone()
    }

    /// `(waiting, running)` request counts.
    pub fn load(&self) -> (usize, usize) {
        let p = self.published.read().expect("published lock");
        (p.waiting, p.running)
    }

    /// The base model's configuration.
    pub fn model_config(&self) -> &ModelConfig {
        &self.model
    }

    /// Longest sequence (prompt + output) the engine accepts.
    pub fn context_length(&self) -> usize {
        self.context_length
    }
}
