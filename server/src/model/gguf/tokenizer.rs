//! Building a `tokenizers::Tokenizer` from the vocabulary a GGUF file carries in its metadata.
//!
//! Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) are supported. The
//! pre-tokenizer is picked by `tokenizer.ggml.pre`, the name llama.cpp gives the text splitting the
//! merges were learned with. Tokens typed control (3) become special added tokens and tokens typed
//! user-defined (4) plain added tokens, so both are matched whole in the input text.

use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::error::Result;

use super::parse::{GgufFile, Value};

/// `tokenizer.ggml.token_type` of a control token (`<|im_start|>`).
const TOKEN_TYPE_CONTROL: i64 = 3;
/// `tokenizer.ggml.token_type` of a user-defined added token.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The pre-tokenizer names (`tokenizer.ggml.pre`) [`build_tokenizer`] understands.
pub const SUPPORTED_PRE_TOKENIZERS: &[&str] = &["gpt2", "gpt-2", "default", "smollm"];

/// The string array under `key`.
pub(crate) fn string_array<'a>(file: &'a GgufFile, key: &str) -> Result<Option<Vec<&'a str>>> {
    let Some(v) = file.get(key) else {
        return Ok(None);
    };
    let items = v.as_array().ok_or_else(|| {
        file.error(format_args!(
            "{key} must be an array of strings, found {}",
            v.type_name()
        ))
    })?;
    items
        .iter()
        .map(|x| {
            x.as_str().ok_or_else(|| {
                file.error(format_args!(
                    "{key} must be an array of strings, found a {}",
                    x.type_name()
                ))
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn optional_str<'a>(file: &'a GgufFile, key: &str) -> Result<Option<&'a str>> {
    match file.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(file.error(format_args!("{key} must be a string, found {}", v.type_name()))),
    }
}

/// The tokenizer described by `file`'s `tokenizer.ggml.*` metadata.
pub fn build_tokenizer(file: &GgufFile) -> Result<Tokenizer> {
    let model = optional_str(file, "tokenizer.ggml.model")?
        .ok_or_else(|| file.error("no tokenizer.ggml.model: the file carries no tokenizer"))?;
    match model {
        "gpt2" => {}
        "llama" => {
            return Err(file.error(
                "SentencePiece GGUF tokenizers (tokenizer.ggml.model = \"llama\") are not supported yet; only byte-level BPE (\"gpt2\")",
            ))
        }
        other => {
            return Err(file.error(format_args!(
                "GGUF tokenizer model {other:?} is not supported (only byte-level BPE, \"gpt2\")"
            )))
        }
    }
    let tokens = string_array(file, "tokenizer.ggml.tokens")?
        .ok_or_else(|| file.error("no tokenizer.ggml.tokens in the file"))?;
    if tokens.is_empty() || tokens.len() > u32::MAX as usize {
        return Err(file.error(format_args!("tokenizer.ggml.tokens has {} entries", tokens.len())));
    }
    let merges = string_array(file, "tokenizer.ggml.merges")?
        .ok_or_else(|| file.error("no tokenizer.ggml.merges: a gpt2 (BPE) tokenizer needs its merges"))?;
    let token_types: Vec<i64> = match file.get("tokenizer.ggml.token_type") {
        None => Vec::new(),
        Some(v) => {
            let types = v
                .as_array()
                .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
                .ok_or_else(|| file.error("tokenizer.ggml.token_type must be an array of integers"))?;
            if types.len() != tokens.len() {
                return Err(file.error(format_args!(
                    "tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {}",
                    types.len(),
                    tokens.len()
                )));
            }
            types
        }
    };

    // If a spelling repeats, keep its lowest id.
    let mut vocab = Vocab::default();
    for (id, tok) in tokens.iter().enumerate().rev() {
        vocab.insert((*tok).to_string(), id as u32);
    }
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    file.error(format_args!(
                        "tokenizer.ggml.merges[{i}] = {m:?} is not two tokens separated by a space"
                    ))
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| file.error(format_args!("cannot build the BPE tokenizer: {e}")))?;

    let byte_level = ByteLevel::new(false, true, true);
    let pre = optional_str(file, "tokenizer.ggml.pre")?;
    let pre_tokenizer = match pre {
        // llama.cpp's "default" splitting differs slightly from GPT-2's for some punctuation and
        // digit runs; GPT-2's is what the HF tokenizers such files come from use.
        None | Some("gpt2" | "gpt-2" | "default") => PreTokenizerWrapper::ByteLevel(byte_level),
        Some("smollm") => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(byte_level),
        ])),
        Some(other) => {
            return Err(file.error(format_args!(
                "GGUF pre-tokenizer {other:?} (tokenizer.ggml.pre) is not supported (supported: {})",
                SUPPORTED_PRE_TOKENIZERS.join(", ")
            )))
        }
    };

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(byte_level));

    let mut special = Vec::new();
    let mut added = Vec::new();
    for (id, &ty) in token_types.iter().enumerate() {
        let content = tokens[id];
        if content.is_empty() {
            continue;
        }
        match ty {
            TOKEN_TYPE_CONTROL => special.push((id, AddedToken::from(content, true).normalized(false))),
            TOKEN_TYPE_USER_DEFINED => added.push((id, AddedToken::from(content, false).normalized(false))),
            _ => {}
        }
    }
    tokenizer.add_special_tokens(&special.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>());
    tokenizer.add_tokens(&added.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>());
    // Added tokens take the id their spelling has in the vocabulary; make sure none was appended.
    for (id, t) in special.iter().chain(&added) {
        let got = tokenizer.token_to_id(&t.content);
        if got != Some(*id as u32) {
            return Err(file.error(format_args!(
                "added token {:?} should have id {id} but the tokenizer gives it {got:?} (repeated spelling in tokenizer.ggml.tokens?)",
                t.content
            )));
        }
    }
    let size = tokenizer.get_vocab_size(true);
    if size != tokens.len() {
        return Err(file.error(format_args!(
            "tokenizer has {size} tokens but tokenizer.ggml.tokens lists {}",
            tokens.len()
        )));
    }
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::parse::tests::Builder;
    use super::*;

    /// A byte-level vocabulary over "a", "b", space (`Ġ`) and digits, with merges for "ab" and
    /// " ab", and two control tokens.
    fn tiny(pre: Option<&str>) -> Builder {
        let mut b = Builder::new();
        b.kv_str("tokenizer.ggml.model", "gpt2");
        if let Some(p) = pre {
            b.kv_str("tokenizer.ggml.pre", p);
        }
        let tokens = ["<s>", "</s>", "a", "b", "Ġ", "1", "2", "ab", "Ġab", "12", "<x y>"];
        b.kv_str_array("tokenizer.ggml.tokens", &tokens);
        b.kv_i32_array("tokenizer.ggml.token_type", &[3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 4]);
        b.kv_str_array("tokenizer.ggml.merges", &["a b", "Ġ ab", "1 2"]);
        b
    }

    fn build(b: &Builder) -> Result<Tokenizer> {
        build_tokenizer(&GgufFile::from_bytes(b.build(), Path::new("tok.gguf")).unwrap())
    }

    #[test]
    fn builds_byte_level_bpe_with_added_tokens() {
        let t = build(&tiny(None)).unwrap();
        let e = t.encode("ab ab<s>b<x y>12", false).unwrap();
        assert_eq!(e.get_ids(), &[7, 8, 0, 3, 10, 9]);
        assert_eq!(t.decode(e.get_ids(), false).unwrap(), "ab ab<s>b<x y>12");
        assert_eq!(t.decode(e.get_ids(), true).unwrap(), "ab abb<x y>12");
    }

    #[test]
    fn smollm_splits_digits() {
        let t = build(&tiny(Some("smollm"))).unwrap();
        assert_eq!(t.encode("12", false).unwrap().get_ids(), &[5, 6]);
        let t = build(&tiny(Some("gpt-2"))).unwrap();
        assert_eq!(t.encode("12", false).unwrap().get_ids(), &[9]);
    }

    #[test]
    fn refuses_unsupported_tokenizers() {
        let e = build(&tiny(Some("qwen2"))).unwrap_err().to_string();
        assert!(e.contains("qwen2") && e.contains("tok.gguf"), "{e}");
        let mut b = Builder::new();
        b.kv_str("tokenizer.ggml.model", "llama");
        let e = build(&b).unwrap_err().to_string();
        assert!(
            e.contains("SentencePiece") && e.contains("not supported yet"),
            "{e}"
        );
        let mut b = Builder::new();
        b.kv_str("tokenizer.ggml.model", "gpt2")
            .kv_str_array("tokenizer.ggml.tokens", &["a", "b", "ab"])
            .kv_str_array("tokenizer.ggml.merges", &["ab"]);
        let e = build(&b).unwrap_err().to_string();
        assert!(e.contains("merges[0]"), "{e}");
        let mut b = Builder::new();
        b.kv_str("tokenizer.ggml.model", "gpt2")
            .kv_str_array("tokenizer.ggml.tokens", &["a", "b"])
            .kv_str_array("tokenizer.ggml.merges", &["a c"]);
        let e = build(&b).unwrap_err().to_string();
        assert!(e.contains("BPE"), "{e}");
    }
}
