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

/// What a load does with the tokenizer of an HF directory.
#[derive(Clone, Copy, PartialEq)]
enum TokenizerUse {
    /// Read it; a directory without `tokenizer.json` is an error.
    Required,
    /// Read it where `tokenizer.json` exists.
    IfPresent,
    /// Do not read it (`--skip-tokenizer-init`).
    Skip,
}

impl TokenizerUse {
    /// `self`, or [`TokenizerUse::Skip`] under `--skip-tokenizer-init`.
    fn unless_skipped(self, skip_tokenizer: bool) -> Self {
        if skip_tokenizer {
            TokenizerUse::Skip
        } else {
            self
        }
    }
}

/// The config at `config_file` and, as `use_` says, the tokenizer of its directory, whose eos
/// ids join the config's.
fn hf_config_and_tokenizer(
    config_file: &Path,
    use_: TokenizerUse,
) -> Result<(ModelConfig, Option<TextTokenizer>)> {
    let mut config = ModelConfig::from_hf_file(config_file)?;
    let dir = config_file.parent().unwrap_or(Path::new("."));
    let read = match use_ {
        TokenizerUse::Required => true,
        TokenizerUse::IfPresent => dir.join("tokenizer.json").is_file(),
        TokenizerUse::Skip => false,
    };
    if !read {
        return Ok((config, None));
    }
    let tokenizer = TextTokenizer::from_hf_dir(dir)?;
    for &id in tokenizer.eos_token_ids() {
        if !config.eos_token_ids.contains(&id) {
            config.eos_token_ids.push(id);
        }
    }
    Ok((config, Some(tokenizer)))
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
    let use_ = TokenizerUse::IfPresent.unless_skipped(skip_tokenizer);
    let (config, tokenizer) = hf_config_and_tokenizer(&config_file, use_)?;
    Ok((name.unwrap_or_else(|| "model".to_string()), config, tokenizer))
}

/// Loads the model at `path` (an HF directory or a `.gguf` file) with its tokenizer.
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    let (name, model, tokenizer) = load_model_with(path, false)?;
    Ok(LoadedModel {
        name,
        model,
        tokenizer: tokenizer.expect("a required tokenizer is read"),
    })
}

/// [`load_model`], without reading the tokenizer when `skip_tokenizer`
/// (`--skip-tokenizer-init`: then an unsupported tokenizer does not stop start-up, and the
/// eos ids are the config's alone). Returns the default served name, the model and the
/// tokenizer.
pub fn load_model_with(
    path: &Path,
    skip_tokenizer: bool,
) -> Result<(String, LlamaModel, Option<TextTokenizer>)> {
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
        if !path.join("config.json").is_file() {
            return Err(Error::Model(format!(
                "{}: not an HF model directory (no config.json)",
                path.display()
            )));
        }
        let use_ = TokenizerUse::Required.unless_skipped(skip_tokenizer);
        let (config, tokenizer) = hf_config_and_tokenizer(&path.join("config.json"), use_)?;
        let tensors = weights::load_hf_weights(path)?;
        Ok((name, LlamaModel::from_tensors(config, tensors)?, tokenizer))
    } else if path.extension().is_some_and(|e| e == "gguf") {
        let g = gguf::load_gguf(path)?;
        let tokenizer = if skip_tokenizer {
            None
        } else {
            let eos = g.config.eos_token_ids.clone();
            Some(TextTokenizer::from_parts(
                g.tokenizer,
                g.chat_template,
                g.bos_token_id,
                eos,
                g.add_bos_token,
            )?)
        };
        Ok((name, LlamaModel::from_tensors(g.config, g.tensors)?, tokenizer))
    } else {
        Err(Error::Model(format!(
            "{}: expected an HF model directory or a .gguf file",
            path.display()
        )))
    }
}
