//! Opens a model from disk: an HF directory (config.json, safetensors, tokenizer.json) or a
//! single `.gguf` file, giving the forward-pass model and its tokenizer.

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::tokenizer::TextTokenizer;
use crate::model::{gguf, presets, weights, LlamaModel, ModelConfig};

/// A model ready to serve: weights, tokenizer and the name it is served under.
pub struct LoadedModel {
    /// Default served name: the directory name or the GGUF file stem.
    pub name: String,
    /// The forward pass.
    pub model: LlamaModel,
    /// Tokenizer and chat template.
    pub tokenizer: TextTokenizer,
}

/// The configuration and tokenizer of the HF directory at `path`, without its weights.
fn load_hf_config_and_tokenizer(path: &Path) -> Result<(ModelConfig, TextTokenizer)> {
    if !path.join("config.json").is_file() {
        return Err(Error::Model(format!(
            "{}: not an HF model directory (no config.json)",
            path.display()
        )));
    }
    let mut config = ModelConfig::from_hf_file(&path.join("config.json"))?;
    let tokenizer = TextTokenizer::from_hf_dir(path)?;
    add_tokenizer_eos(&mut config, &tokenizer);
    Ok((config, tokenizer))
}

fn add_tokenizer_eos(config: &mut ModelConfig, tokenizer: &TextTokenizer) {
    for &id in tokenizer.eos_token_ids() {
        if !config.eos_token_ids.contains(&id) {
            config.eos_token_ids.push(id);
        }
    }
}

/// A model's shape without weights (`--load-format dummy`: the weights are random, made where
/// the model runs), from `path`:
/// - an HF directory: its `config.json`, and its tokenizer when it has `tokenizer.json`;
/// - a `config.json`-style file: that config, and the tokenizer beside it if there is one;
/// - the name of a preset ([`presets::find`], e.g. `Llama-3.1-8B`) when no such path exists:
///   its config and no tokenizer.
///
/// Returns the default served name, the config and the tokenizer (`None` with
/// `skip_tokenizer`, or where there is none).
pub fn load_dummy_config(
    path: &Path,
    skip_tokenizer: bool,
) -> Result<(String, ModelConfig, Option<TextTokenizer>)> {
    let named = |p: &Path| p.file_name().map(|s| s.to_string_lossy().into_owned());
    let (name, config_file) = if path.is_dir() {
        (named(path), path.join("config.json"))
    } else if path.is_file() {
        if path.extension().is_none_or(|e| e != "json") {
            return Err(Error::Model(format!(
                "{}: --load-format dummy reads a config.json (or an HF directory, or a preset name: {})",
                path.display(),
                presets::names()
            )));
        }
        // `.../Llama-3.1-8B/config.json` is served as `Llama-3.1-8B`, `.../llama8b.json` as `llama8b`.
        let dir_name = path
            .parent()
            .and_then(named)
            .filter(|_| path.file_name().is_some_and(|f| f == "config.json"));
        (
            dir_name.or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned())),
            path.to_path_buf(),
        )
    } else {
        let preset = presets::find(&path.to_string_lossy()).ok_or_else(|| {
            Error::Model(format!(
                "{}: no such file or directory, and not a preset name (presets: {})",
                path.display(),
                presets::names()
            ))
        })?;
        return Ok((preset.name.to_string(), preset.config(), None));
    };
    if !config_file.is_file() {
        return Err(Error::Model(format!(
            "{}: --load-format dummy needs config.json in the model directory",
            path.display()
        )));
    }
    let mut config = ModelConfig::from_hf_file(&config_file)?;
    let dir = config_file.parent().unwrap_or(Path::new("."));
    let tokenizer = if skip_tokenizer || !dir.join("tokenizer.json").is_file() {
        None
    } else {
        let tokenizer = TextTokenizer::from_hf_dir(dir)?;
        add_tokenizer_eos(&mut config, &tokenizer);
        Some(tokenizer)
    };
    Ok((name.unwrap_or_else(|| "model".to_string()), config, tokenizer))
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
        let (config, tokenizer) = load_hf_config_and_tokenizer(path)?;
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
