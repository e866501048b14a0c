//! (in progress)
use std::sync::Arc;

use super::{AdapterSpec, EngineConfig, EngineHandle};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::model::LlamaModel;

pub(crate) fn spawn(
    _model: LlamaModel,
    _config: EngineConfig,
    _adapters: Vec<AdapterSpec>,
    _metrics: Arc<Metrics>,
) -> Result<EngineHandle> {
    Err(Error::Model("scheduler in progress".into()))
}
