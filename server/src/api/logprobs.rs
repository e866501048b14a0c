//! Log-probabilities in the three wire shapes: SGLang's `[logprob, token_id, text|null]`
//! triples, OpenAI completions' parallel lists, and OpenAI chat's `content` entries.

use serde_json::{json, Map, Value};

use crate::engine::request::TokenLogprob;
use crate::model::tokenizer::TextTokenizer;

use super::generation::Generation;

/// The text of one token as clients expect it (decoded, not the raw BPE piece).
pub fn token_text(tok: &TextTokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

/// `[logprob, id, text]`; the text is `null` unless `tok` is given.
fn triple(tok: Option<&TextTokenizer>, logprob: Option<f32>, id: u32) -> Value {
    let text = tok.map_or(Value::Null, |tok| json!(token_text(tok, id)));
    json!([logprob, id, text])
}

fn top_list(tok: Option<&TextTokenizer>, top: &[(u32, f32)]) -> Value {
    top.iter().map(|&(id, lp)| triple(tok, Some(lp), id)).collect()
}

/// Adds SGLang's log-prob fields to `meta`: input/output token log-probs, and the top
/// alternatives when `top_n > 0`. The first prompt position has no log-prob (`null`). Each
/// entry carries its token's text when `tok` is given (`return_text_in_logprobs`).
pub fn native(meta: &mut Map<String, Value>, g: &Generation, tok: Option<&TextTokenizer>, top_n: usize) {
    let start = g.logprob_start.unwrap_or(g.prompt_ids.len());
    let input: Vec<Value> = g
        .input_logprobs
        .iter()
        .enumerate()
        .map(|(i, lp)| {
            let id = lp
                .as_ref()
                .map(|t| t.token_id)
                .or_else(|| g.prompt_ids.get(start + i).copied())
                .unwrap_or_default();
            triple(tok, lp.as_ref().map(|t| t.logprob), id)
        })
        .collect();
    let output: Vec<Value> = g
        .output_logprobs
        .iter()
        .map(|t| triple(tok, Some(t.logprob), t.token_id))
        .collect();
    meta.insert("input_token_logprobs".into(), Value::Array(input));
    meta.insert("output_token_logprobs".into(), Value::Array(output));
    if top_n > 0 {
        let input_top: Vec<Value> = g
            .input_logprobs
            .iter()
            .map(|lp| match lp {
                Some(t) => top_list(tok, &t.top),
                None => Value::Null,
            })
            .collect();
        let output_top: Vec<Value> = g.output_logprobs.iter().map(|t| top_list(tok, &t.top)).collect();
        meta.insert("input_top_logprobs".into(), Value::Array(input_top));
        meta.insert("output_top_logprobs".into(), Value::Array(output_top));
    }
}

/// OpenAI completions' `logprobs` for `tokens`; `offset` is where the first token's text starts.
pub fn completions(tok: &TextTokenizer, tokens: &[TokenLogprob], top_n: usize, mut offset: usize) -> Value {
    let mut texts = Vec::with_capacity(tokens.len());
    let mut offsets = Vec::with_capacity(tokens.len());
    let mut tops = Vec::with_capacity(tokens.len());
    for t in tokens {
        let text = token_text(tok, t.token_id);
        offsets.push(offset);
        offset += text.len();
        texts.push(text);
        let mut top = Map::new();
        for &(id, lp) in t.top.iter().take(top_n) {
            top.insert(token_text(tok, id), json!(lp));
        }
        tops.push(Value::Object(top));
    }
    json!({
        "tokens": texts,
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tops,
        "text_offset": offsets,
    })
}

/// OpenAI chat's `logprobs.content` entries for `tokens`.
pub fn chat(tok: &TextTokenizer, tokens: &[TokenLogprob], top_n: usize) -> Value {
    let entry = |id: u32, lp: f32| {
        let text = token_text(tok, id);
        json!({"token": text, "logprob": lp, "bytes": text.as_bytes()})
    };
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(t.token_id, t.logprob);
            e["top_logprobs"] = t.top.iter().take(top_n).map(|&(id, lp)| entry(id, lp)).collect();
            e
        })
        .collect();
    json!({ "content": content })
}
