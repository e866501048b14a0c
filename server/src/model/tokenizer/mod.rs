//! Tokenization and chat templates: a [`TextTokenizer`] wraps a Hugging Face `tokenizers`
//! tokenizer with the model's special tokens and its chat template, and an
//! [`IncrementalDecoder`] turns generated ids into text for streaming.

mod chat_template;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value as Json;

use crate::error::{Error, Result};
use chat_template::ChatTemplate;

/// One message of a conversation, as the OpenAI-style API and chat templates see it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A model's tokenizer with its special tokens and chat template.
///
/// Cheap to clone (the state is shared) and `Send + Sync`.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    tokenizer: tokenizers::Tokenizer,
    template: Option<ChatTemplate>,
    /// Why there is no usable template, for the error of `apply_chat_template`.
    no_template_reason: String,
    /// Text of the special tokens the template sees (`bos_token`, `eos_token`, ...).
    special_tokens: BTreeMap<String, String>,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    add_bos_token: bool,
    vocab_size: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.inner.vocab_size)
            .field("bos_token_id", &self.inner.bos_token_id)
            .field("eos_token_ids", &self.inner.eos_token_ids)
            .field("add_bos_token", &self.inner.add_bos_token)
            .field("has_chat_template", &self.inner.template.is_some())
            .finish()
    }
}

/// The special token names that transformers hands to chat templates.
const SPECIAL_TOKEN_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

impl TextTokenizer {
    /// Loads a Hugging Face model directory.
    ///
    /// - `tokenizer.json` is required.
    /// - `tokenizer_config.json` (optional): `chat_template` as a string or as a list of
    ///   `{name, template}` (the one named `default` is used, or the only one), `bos_token`,
    ///   `eos_token` and the other special tokens as strings or `AddedToken` dicts
    ///   (`{"content": ...}`), and `add_bos_token`.
    /// - `special_tokens_map.json` (optional, older layout): special tokens the tokenizer
    ///   config does not name.
    /// - `chat_template.jinja`, else `chat_template.json` (`{"chat_template": ...}`), when
    ///   present, take precedence over the template in `tokenizer_config.json`.
    /// - `generation_config.json` (optional): `eos_token_id` as a number or a list, and
    ///   `bos_token_id` when the tokenizer config names no bos token.
    ///
    /// The end-of-sequence ids are those of `generation_config.json` followed by the
    /// tokenizer config's `eos_token` when it is not already among them.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tokenizer = load_tokenizer_json(&dir.join("tokenizer.json"))?;
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_if_exists(&config_path)?.unwrap_or(Json::Null);
        let generation = read_json_if_exists(&dir.join("generation_config.json"))?.unwrap_or(Json::Null);

        // The chat template: a separate file first, then the tokenizer config.
        let jinja_path = dir.join("chat_template.jinja");
        let json_path = dir.join("chat_template.json");
        let (template_choice, template_origin) = if jinja_path.is_file() {
            let text = std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?;
            (TemplateChoice::One(text), jinja_path)
        } else if let Some(value) = read_json_if_exists(&json_path)? {
            let field = value.get("chat_template").cloned().unwrap_or(Json::Null);
            (
                choose_template(&field).map_err(|e| in_file(&json_path, e))?,
                json_path,
            )
        } else {
            let field = config.get("chat_template").cloned().unwrap_or(Json::Null);
            (
                choose_template(&field).map_err(|e| in_file(&config_path, e))?,
                config_path.clone(),
            )
        };

        // Special tokens: the tokenizer config, else the legacy special_tokens_map.json. A
        // token the config sets to null stays unset.
        let legacy = read_json_if_exists(&dir.join("special_tokens_map.json"))?.unwrap_or(Json::Null);
        let declared = |name: &str| config.get(name).or_else(|| legacy.get(name));
        let mut special_tokens = BTreeMap::new();
        for name in SPECIAL_TOKEN_NAMES {
            if let Some(text) = declared(name).and_then(token_content) {
                special_tokens.insert(name.to_string(), text);
            }
        }

        let bos_token_id = match declared("bos_token") {
            Some(value) => token_content(value).and_then(|t| tokenizer.token_to_id(&t)),
            None => generation.get("bos_token_id").and_then(json_u32),
        };
        let mut eos_token_ids: Vec<u32> = match generation.get("eos_token_id") {
            Some(Json::Array(items)) => items.iter().filter_map(json_u32).collect(),
            Some(value) => json_u32(value).into_iter().collect(),
            None => Vec::new(),
        };
        if let Some(id) = special_tokens
            .get("eos_token")
            .and_then(|t| tokenizer.token_to_id(t))
        {
            eos_token_ids.push(id);
        }
        let add_bos_token = config
            .get("add_bos_token")
            .and_then(Json::as_bool)
            .unwrap_or(false);

        let (template, no_template_reason) = match template_choice {
            TemplateChoice::One(source) => {
                let template = ChatTemplate::new(&source).map_err(|e| match e {
                    Error::Tokenizer(msg) => {
                        Error::Tokenizer(format!("{}: {msg}", template_origin.display()))
                    }
                    other => other,
                })?;
                (Some(template), String::new())
            }
            TemplateChoice::None(reason) => (None, format!("{} ({})", reason, dir.display())),
        };
        Ok(Self::build(
            tokenizer,
            template,
            no_template_reason,
            special_tokens,
            bos_token_id,
            eos_token_ids,
            add_bos_token,
        ))
    }

    /// Builds a tokenizer from its parts, as the GGUF loader has them. The template's
    /// `bos_token` and `eos_token` are the texts of `bos_token_id` and the first of
    /// `eos_token_ids`.
    pub fn from_parts(
        tokenizer: tokenizers::Tokenizer,
        chat_template: Option<String>,
        bos_token_id: Option<u32>,
        eos_token_ids: Vec<u32>,
        add_bos_token: bool,
    ) -> Result<Self> {
        let tokenizer = without_truncation_or_padding(tokenizer)?;
        let template = chat_template.as_deref().map(ChatTemplate::new).transpose()?;
        let mut special_tokens = BTreeMap::new();
        if let Some(text) = bos_token_id.and_then(|id| tokenizer.id_to_token(id)) {
            special_tokens.insert("bos_token".to_string(), text);
        }
        if let Some(text) = eos_token_ids.first().and_then(|&id| tokenizer.id_to_token(id)) {
            special_tokens.insert("eos_token".to_string(), text);
        }
        Ok(Self::build(
            tokenizer,
            template,
            "the model has no chat template".to_string(),
            special_tokens,
            bos_token_id,
            eos_token_ids,
            add_bos_token,
        ))
    }

    fn build(
        tokenizer: tokenizers::Tokenizer,
        template: Option<ChatTemplate>,
        no_template_reason: String,
        special_tokens: BTreeMap<String, String>,
        bos_token_id: Option<u32>,
        mut eos_token_ids: Vec<u32>,
        add_bos_token: bool,
    ) -> Self {
        let mut seen = std::collections::HashSet::new();
        eos_token_ids.retain(|id| seen.insert(*id));
        let vocab_size = tokenizer.get_vocab_size(true);
        TextTokenizer {
            inner: Arc::new(Inner {
                tokenizer,
                template,
                no_template_reason,
                special_tokens,
                bos_token_id,
                eos_token_ids,
                add_bos_token,
                vocab_size,
            }),
        }
    }

    /// Token ids of `text`. With `add_special_tokens`, the tokenizer's post-processor runs
    /// (it may add BOS and other markers), and the BOS token is put first when the model
    /// asks for it (`add_bos_token`) and it is not there yet. A prompt rendered by
    /// [`apply_chat_template`](Self::apply_chat_template) already holds its special tokens
    /// as text: encode it with `add_special_tokens` false, as transformers does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .tokenizer
            .encode_fast(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("encoding failed: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        if add_special_tokens && self.inner.add_bos_token {
            if let Some(bos) = self.inner.bos_token_id {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Text of `ids`; special tokens are left out with `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("decoding failed: {e}")))
    }

    /// Decoded text of the single token `id` (special tokens included), as logprob outputs
    /// show it; `None` for an id outside the vocabulary. A byte-level token that holds part
    /// of a multi-byte character decodes to U+FFFD.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.tokenizer.id_to_token(id)?;
        self.inner.tokenizer.decode(&[id], false).ok()
    }

    /// Id of the token spelled `token` (a vocabulary entry or an added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.tokenizer.token_to_id(token)
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.vocab_size
    }

    /// Ids that end generation, deduplicated, in order of preference.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.inner.eos_token_ids
    }

    /// Id of the beginning-of-sequence token, if the model has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.inner.bos_token_id
    }

    /// Whether [`encode`](Self::encode) with special tokens puts BOS first.
    pub fn add_bos_token(&self) -> bool {
        self.inner.add_bos_token
    }

    /// Whether the model has a usable chat template.
    pub fn has_chat_template(&self) -> bool {
        self.inner.template.is_some()
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner.tokenizer
    }

    /// Renders the chat template for `messages`, ending with the assistant's header when
    /// `add_generation_prompt`. The template sees `messages`, `add_generation_prompt`,
    /// `tools` and `documents` (`None`), the special tokens (`bos_token`, `eos_token`, ...),
    /// `raise_exception`, `strftime_now`, a `tojson` filter and Python's string and dict
    /// methods, as in transformers. `raise_exception(msg)` comes back as
    /// `Error::Tokenizer(msg)`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        match &self.inner.template {
            Some(template) => template.render(messages, add_generation_prompt, &self.inner.special_tokens),
            None => Err(Error::Tokenizer(format!(
                "cannot apply a chat template: {}; send a plain completion prompt instead",
                self.inner.no_template_reason
            ))),
        }
    }

    /// An [`IncrementalDecoder`] over this tokenizer.
    pub fn incremental_decoder(&self, skip_special_tokens: bool) -> IncrementalDecoder {
        IncrementalDecoder::new(self, skip_special_tokens)
    }
}

/// What a template field of a config file gives.
enum TemplateChoice {
    One(String),
    /// No usable template, and why.
    None(String),
}

/// Picks the template from a `chat_template` field: a string, or a list of
/// `{name, template}` where `default` (or the only entry) is used.
fn choose_template(field: &Json) -> std::result::Result<TemplateChoice, String> {
    match field {
        Json::Null => Ok(TemplateChoice::None("the model has no chat template".to_string())),
        Json::String(s) => Ok(TemplateChoice::One(s.clone())),
        Json::Array(entries) => {
            let mut named = Vec::new();
            for entry in entries {
                let name = entry.get("name").and_then(Json::as_str);
                let template = entry.get("template").and_then(Json::as_str);
                match (name, template) {
                    (Some(name), Some(template)) => named.push((name.to_string(), template.to_string())),
                    _ => {
                        return Err(
                            "chat_template list entries must be {\"name\": ..., \"template\": ...}"
                                .to_string(),
                        )
                    }
                }
            }
            if let Some((_, template)) = named.iter().find(|(name, _)| name == "default") {
                return Ok(TemplateChoice::One(template.clone()));
            }
            match named.as_slice() {
                [] => Ok(TemplateChoice::None("the model has no chat template".to_string())),
                [(_, template)] => Ok(TemplateChoice::One(template.clone())),
                _ => {
                    let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
                    Ok(TemplateChoice::None(format!(
                        "the model has several chat templates ({}) and none is named \"default\"",
                        names.join(", ")
                    )))
                }
            }
        }
        other => Err(format!(
            "chat_template must be a string or a list of named templates, not {other}"
        )),
    }
}

fn in_file(path: &Path, reason: String) -> Error {
    Error::Tokenizer(format!("{}: {reason}", path.display()))
}

/// Text of a special token given as a string or an `AddedToken` dict.
fn token_content(value: &Json) -> Option<String> {
    match value {
        Json::String(s) => Some(s.clone()),
        Json::Object(map) => map.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

fn json_u32(value: &Json) -> Option<u32> {
    value.as_u64().and_then(|n| u32::try_from(n).ok())
}

fn read_json_if_exists(path: &Path) -> Result<Option<Json>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Tokenizer(format!("{}: invalid JSON: {e}", path.display())))
}

fn load_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let tokenizer = tokenizers::Tokenizer::from_bytes(&bytes)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
    without_truncation_or_padding(tokenizer)
}

/// Some tokenizer.json files carry training-time truncation or padding; a server must
/// neither cut prompts short silently nor pad them.
fn without_truncation_or_padding(mut tokenizer: tokenizers::Tokenizer) -> Result<tokenizers::Tokenizer> {
    tokenizer
        .with_truncation(None)
        .map_err(|e| Error::Tokenizer(format!("cannot turn truncation off: {e}")))?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

/// Turns generated token ids into text as they come, for streaming.
///
/// Each [`push`](Self::push) returns the text that the new id completes, if any: text is
/// held back while it ends in a partial UTF-8 character (byte-level BPE and byte-fallback
/// pieces decode to U+FFFD until the character is whole). Text is decoded over a short
/// window that starts with the ids last emitted, so decoders that depend on context (such
/// as SentencePiece's leading-space handling) produce the same text as decoding everything
/// at once.
///
/// Owned (it shares the tokenizer), so it can live in a streaming task.
pub struct IncrementalDecoder {
    tokenizer: TextTokenizer,
    skip_special_tokens: bool,
    /// The decode window: `ids[..read_offset]` were emitted already and are context only,
    /// `ids[read_offset..]` are held back.
    ids: Vec<u32>,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// How many prompt ids [`with_prompt`](Self::with_prompt) keeps as context.
    const PROMPT_CONTEXT: usize = 6;

    /// A decoder for a generation that starts from scratch.
    pub fn new(tokenizer: &TextTokenizer, skip_special_tokens: bool) -> Self {
        Self::with_prompt(tokenizer, &[], skip_special_tokens)
    }

    /// A decoder for a generation that continues `prompt_ids`: the last few prompt ids are
    /// kept as context (so the first generated word gets its leading space right) but are
    /// never emitted.
    pub fn with_prompt(tokenizer: &TextTokenizer, prompt_ids: &[u32], skip_special_tokens: bool) -> Self {
        let start = prompt_ids.len().saturating_sub(Self::PROMPT_CONTEXT);
        let ids = prompt_ids[start..].to_vec();
        let read_offset = ids.len();
        IncrementalDecoder {
            tokenizer: tokenizer.clone(),
            skip_special_tokens,
            ids,
            read_offset,
        }
    }

    /// Adds one generated id; returns the new text it makes safe to emit, or `None` when
    /// there is none yet.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let (prefix, full) = self.window_texts()?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') || !full.is_char_boundary(prefix.len()) {
            return Ok(None);
        }
        let text = full[prefix.len()..].to_string();
        // The window moves on: the ids just emitted become the next call's context.
        self.ids.drain(..self.read_offset);
        self.read_offset = self.ids.len();
        Ok(Some(text))
    }

    /// Flushes what is still held back (a character left incomplete comes out as U+FFFD)
    /// and empties the decoder.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let (prefix, full) = self.window_texts()?;
        self.ids.clear();
        self.read_offset = 0;
        if full.len() <= prefix.len() {
            return Ok(None);
        }
        let mut cut = prefix.len();
        while !full.is_char_boundary(cut) {
            cut -= 1;
        }
        Ok(Some(full[cut..].to_string()))
    }

    /// Text of the context ids alone, and of the whole window.
    fn window_texts(&self) -> Result<(String, String)> {
        let decode = |ids: &[u32]| -> Result<String> {
            if ids.is_empty() {
                Ok(String::new())
            } else {
                self.tokenizer.decode(ids, self.skip_special_tokens)
            }
        };
        Ok((decode(&self.ids[..self.read_offset])?, decode(&self.ids)?))
    }
}
