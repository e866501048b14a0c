//! Opens a model from disk: an HF directory (config.json, safetensors, tokenizer.json) or a
//! single `.gguf` file, giving the forward-pass model and its tokenizer.

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::tokenizer::TextTokenizer;
use crate::model::{gguf, weights, LlamaModel, ModelConfig};

/// A model ready to serve: weights, tokenizer and the name it is served under.
pub struct LoadedModel {
    /// Default served name: the directory name or the GGUF file stem.
    pub name: String,
    /// The forward pass.
    pub model: LlamaModel,
    /// Tokenizer and chat template.
    pub tokenizer: TextTokenizer,
}

/// The configuration and tokenizer of the HF directory at `path`, without its weights
/// (`--load-format dummy`: the weights are random, generated where the model runs). Returns the
/// default served name too.
pub fn load_config_and_tokenizer(path: &Path) -> Result<(String, ModelConfig, TextTokenizer)> {
    if !path.join("config.json").is_file() {
        return Err(Error::Model(format!(
            "{}: --load-format dummy needs an HF model directory with config.json and tokenizer.json",
            path.display()
        )));
    }
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_string());
    let mut config = ModelConfig::from_hf_file(&path.join("config.json"))?;
    let tokenizer = TextTokenizer::from_hf_dir(path)?;
    for &id in tokenizer.eos_token_ids() {
        if !config.eos_token_ids.contains(&id) {
            config.eos_token_ids.push(id);
        }
    }
    Ok((name, config, tokenizer))
}

/// Loads the model at `path` (an HF directory or a `.gguf` file).
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    if !path.exists() {
        return Err(Error::Model(format!(
            "{}: no such file or directory",
            path.display()
        )));
    }
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_string());
    if path.is_dir() {
        let (_, config, tokenizer) = load_config_and_tokenizer(path)?;
        let tensors = weights::load_hf_weights(path)?;
        let model = LlamaModel::from_tensors(config, tensors)?;
        Ok(LoadedModel {
            name,
            model,
            tokenizer,
        })
    } else if path.extension().is_some_and(|e| e == "gguf") {
        let g = gguf::load_gguf(path)?;
        let eos: Vec<u32> = g.config.eos_token_ids.clone();
        let tokenizer =
            TextTokenizer::from_parts(g.tokenizer, g.chat_template, g.bos_token_id, eos, g.add_bos_token)?;
        let model = LlamaModel::from_tensors(g.config, g.tensors)?;
        Ok(LoadedModel {
            name,
            model,
            tokenizer,
        })
    } else {
        Err(Error::Model(format!(
            "{}: expected an HF model directory or a .gguf file",
            path.display()
        )))
    }
}
