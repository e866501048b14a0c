//! Tests of the tokenizer layer against fixtures rendered by transformers
//! (`scripts/fixtures/gen_chat_template_fixture.py`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value as Json};

use super::chat_template::{py_float_repr, strftime_utc, ChatTemplate};
use super::{ChatMessage, IncrementalDecoder, TextTokenizer};
use crate::error::Error;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/chat")
}

fn read_json(path: &Path) -> Json {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn messages_of(value: &Json) -> Vec<ChatMessage> {
    serde_json::from_value(value.clone()).unwrap()
}

fn tiny_dir() -> PathBuf {
    fixtures().join("tiny_bpe")
}

/// A model directory in a temp dir with the tiny tokenizer.json and the given extra files.
fn model_dir(files: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_dir().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn tokenizer_message(err: Error) -> String {
    match err {
        Error::Tokenizer(msg) => msg,
        other => panic!("expected a tokenizer error, got {other:?}"),
    }
}

#[test]
fn tokenizer_is_send_sync_and_decoder_is_owned() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<TextTokenizer>();
    assert_send_sync::<IncrementalDecoder>();
}

#[test]
fn templates_render_like_transformers() {
    let fixture = read_json(&fixtures().join("templates.json"));
    let placeholder = fixture["date_placeholder"].as_str().unwrap();
    let date_format = fixture["date_format"].as_str().unwrap();
    let mut checked = 0;
    for entry in fixture["templates"].as_array().unwrap() {
        let name = entry["name"].as_str().unwrap();
        let template =
            ChatTemplate::new(entry["template"].as_str().unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut special = BTreeMap::new();
        for key in ["bos_token", "eos_token"] {
            if let Some(text) = entry[key].as_str() {
                special.insert(key.to_string(), text.to_string());
            }
        }
        for case in entry["cases"].as_array().unwrap() {
            let what = format!(
                "{name} / {} / add_generation_prompt={}",
                case["conversation"], case["add_generation_prompt"]
            );
            let messages = messages_of(&case["messages"]);
            let agp = case["add_generation_prompt"].as_bool().unwrap();
            let rendered = template.render(&messages, agp, &special);
            if let Some(expected_error) = case["error"].as_str() {
                let err = rendered.expect_err(&what);
                assert_eq!(tokenizer_message(err), expected_error, "{what}");
            } else {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap();
                let today = strftime_utc(date_format, now.as_secs() as i64);
                let expected = case["expected"].as_str().unwrap().replace(placeholder, &today);
                let rendered = rendered.unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(rendered, expected, "{what}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} cases");
}

#[test]
fn strftime_matches_python() {
    let fixture = read_json(&fixtures().join("templates.json"));
    for case in fixture["strftime_cases"].as_array().unwrap() {
        let ts = case["timestamp"].as_i64().unwrap();
        let format = case["format"].as_str().unwrap();
        assert_eq!(
            strftime_utc(format, ts),
            case["expected"].as_str().unwrap(),
            "{format} at {ts}"
        );
    }
}

#[test]
fn float_repr_matches_python() {
    for (value, expected) in [
        (0.0, "0.0"),
        (-0.0, "-0.0"),
        (1.0, "1.0"),
        (2.5, "2.5"),
        (0.1, "0.1"),
        (1e-4, "0.0001"),
        (1.5e-5, "1.5e-05"),
        (1e16, "1e+16"),
        (123456789012345.6, "123456789012345.6"),
        (1.2345678901234567e17, "1.2345678901234566e+17"),
        (-3e100, "-3e+100"),
    ] {
        assert_eq!(py_float_repr(value, false), expected, "{value}");
    }
    assert_eq!(py_float_repr(f64::NAN, true), "NaN");
    assert_eq!(py_float_repr(f64::NEG_INFINITY, false), "-inf");
}

#[test]
fn tiny_bpe_matches_python_tokenizers_and_transformers() {
    let expected = read_json(&fixtures().join("tiny_bpe.json"));
    let tok = TextTokenizer::from_hf_dir(&tiny_dir()).unwrap();
    assert_eq!(
        tok.vocab_size(),
        expected["vocab_size"].as_u64().unwrap() as usize
    );
    for case in expected["encodings"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), ids, "{text:?}");
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            case["decoded"].as_str().unwrap()
        );
        assert_eq!(
            tok.decode(&ids, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap()
        );
    }
    for (id, text) in expected["token_texts"].as_object().unwrap() {
        assert_eq!(
            tok.token_text(id.parse().unwrap()).as_deref(),
            text.as_str(),
            "token {id}"
        );
    }
    assert_eq!(tok.token_text(1_000_000), None);
    for chat in expected["chats"].as_array().unwrap() {
        let messages = messages_of(&chat["messages"]);
        let text = tok.apply_chat_template(&messages, true).unwrap();
        assert_eq!(text, chat["text"].as_str().unwrap());
        let ids: Vec<u32> = serde_json::from_value(chat["ids"].clone()).unwrap();
        assert_eq!(tok.encode(&text, false).unwrap(), ids, "{}", chat["conversation"]);
    }
}

#[test]
fn tiny_bpe_special_tokens() {
    let tok = TextTokenizer::from_hf_dir(&tiny_dir()).unwrap();
    // generation_config.json: [2, 0]; tokenizer_config eos <|im_end|> = 2 is already there.
    assert_eq!(tok.eos_token_ids(), &[2, 0]);
    assert_eq!(tok.bos_token_id(), Some(1));
    assert!(tok.has_chat_template());
    assert!(!tok.add_bos_token());
    assert_eq!(
        tok.encode("Hello", true).unwrap(),
        tok.encode("Hello", false).unwrap()
    );
}

#[test]
fn config_with_named_templates_and_added_token_dicts() {
    let config = json!({
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}"}
        ],
        "bos_token": {"__type": "AddedToken", "content": "<|im_start|>", "special": true},
        "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": true},
        "add_bos_token": true
    });
    let dir = model_dir(&[("tokenizer_config.json", config.to_string())]);
    let tok = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_ids(), &[0]);
    let text = tok
        .apply_chat_template(&[ChatMessage::new("user", "hi")], false)
        .unwrap();
    assert_eq!(text, "<|im_start|>[user]hi<|endoftext|>");
    // add_bos_token puts BOS first, once.
    let plain = tok.encode("Hello", false).unwrap();
    let with_bos = tok.encode("Hello", true).unwrap();
    assert_eq!(with_bos[0], 1);
    assert_eq!(&with_bos[1..], &plain[..]);
    assert_eq!(tok.encode("<|im_start|>Hello", true).unwrap()[..2], [1, plain[0]]);
}

#[test]
fn named_templates_without_default() {
    let config = json!({"chat_template": [
        {"name": "a", "template": "A"},
        {"name": "b", "template": "B"}
    ]});
    let dir = model_dir(&[("tokenizer_config.json", config.to_string())]);
    let tok = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    assert!(!tok.has_chat_template());
    let msg = tokenizer_message(
        tok.apply_chat_template(&[ChatMessage::new("user", "x")], true)
            .unwrap_err(),
    );
    assert!(msg.contains("(a, b)") && msg.contains("default"), "{msg}");

    let single = json!({"chat_template": [{"name": "only", "template": "ONLY"}]});
    let dir = model_dir(&[("tokenizer_config.json", single.to_string())]);
    let tok = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(tok.apply_chat_template(&[], false).unwrap(), "ONLY");
}

#[test]
fn generation_config_eos_number_or_list() {
    let config = json!({"eos_token": "<|im_end|>", "bos_token": null}).to_string();
    let dir = model_dir(&[
        ("tokenizer_config.json", config.clone()),
        ("generation_config.json", r#"{"eos_token_id": 0}"#.into()),
    ]);
    let tok = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(tok.eos_token_ids(), &[0, 2]);
    assert_eq!(tok.bos_token_id(), None);

    let dir = model_dir(&[
        ("tokenizer_config.json", config),
        (
            "generation_config.json",
            r#"{"eos_token_id": [2, 0, 2], "bos_token_id": 1}"#.into(),
        ),
    ]);
    let tok = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(tok.eos_token_ids(), &[2, 0]);
    // The tokenizer config says there is no bos token: generation_config does not override it.
    assert_eq!(tok.bos_token_id(), None);

    // No tokenizer_config.json at all: ids from generation_config alone.
    let dir = model_dir(&[(
        "generation_config.json",
        r#"{"eos_token_id": [2], "bos_token_id": 1}"#.into(),
    )]);
    let tok = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(tok.eos_token_ids(), &[2]);
    assert_eq!(tok.bos_token_id(), Some(1));
}

#[test]
fn legacy_special_tokens_map() {
    let map = json!({"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>"});
    let config = json!({
        "pad_token": null,
        "chat_template": "{{ bos_token }}|{{ eos_token }}|{{ pad_token is defined }}"
    });
    let dir = model_dir(&[
        ("special_tokens_map.json", map.to_string()),
        ("tokenizer_config.json", config.to_string()),
    ]);
    let tok = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_ids(), &[2]);
    assert_eq!(
        tok.apply_chat_template(&[], false).unwrap(),
        "<|im_start|>|<|im_end|>|False"
    );
}

#[test]
fn no_template_is_a_clear_error() {
    let dir = model_dir(&[]);
    let tok = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    assert!(!tok.has_chat_template());
    assert!(tok.eos_token_ids().is_empty());
    let msg = tokenizer_message(
        tok.apply_chat_template(&[ChatMessage::new("user", "x")], true)
            .unwrap_err(),
    );
    assert!(msg.contains("no chat template"), "{msg}");
}

#[test]
fn template_files_take_precedence() {
    let config = json!({"chat_template": "FROM CONFIG"}).to_string();
    let dir = model_dir(&[
        ("tokenizer_config.json", config.clone()),
        (
            "chat_template.json",
            json!({"chat_template": "FROM JSON"}).to_string(),
        ),
    ]);
    let tok = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(tok.apply_chat_template(&[], false).unwrap(), "FROM JSON");

    let dir = model_dir(&[
        ("tokenizer_config.json", config),
        (
            "chat_template.json",
            json!({"chat_template": "FROM JSON"}).to_string(),
        ),
        (
            "chat_template.jinja",
            "FROM JINJA {{ messages | length }}\n".into(),
        ),
    ]);
    let tok = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    // jinja2 drops the one trailing newline of the source.
    assert_eq!(tok.apply_chat_template(&[], false).unwrap(), "FROM JINJA 0");
}

#[test]
fn missing_tokenizer_json_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let err = TextTokenizer::from_hf_dir(dir.path()).unwrap_err();
    let path = dir.path().join("tokenizer.json");
    match &err {
        Error::Io { path: p, .. } => assert_eq!(p, &path),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
}

#[test]
fn malformed_files_name_the_file() {
    let dir = model_dir(&[("tokenizer_config.json", "{not json".into())]);
    let msg = TextTokenizer::from_hf_dir(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("tokenizer_config.json") && msg.contains("invalid JSON"),
        "{msg}"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    let msg = TextTokenizer::from_hf_dir(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("tokenizer.json"), "{msg}");
}

#[test]
fn broken_template_fails_at_load_with_the_reason() {
    let broken = "{% for message in messages %}{{ message.content }}";
    let dir = model_dir(&[(
        "tokenizer_config.json",
        json!({"chat_template": broken}).to_string(),
    )]);
    let msg = tokenizer_message(TextTokenizer::from_hf_dir(dir.path()).unwrap_err());
    assert!(msg.contains("tokenizer_config.json"), "{msg}");
    assert!(
        msg.contains("invalid chat template") && msg.contains("syntax error"),
        "{msg}"
    );

    let tokenizer = tokenizers::Tokenizer::from_file(tiny_dir().join("tokenizer.json")).unwrap();
    let err =
        TextTokenizer::from_parts(tokenizer, Some("{{ 1 + }}".into()), None, vec![], false).unwrap_err();
    assert!(tokenizer_message(err).contains("syntax error"));
}

#[test]
fn from_parts_uses_token_texts_for_the_template() {
    let tokenizer = tokenizers::Tokenizer::from_file(tiny_dir().join("tokenizer.json")).unwrap();
    let template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}{{ eos_token }}";
    let tok =
        TextTokenizer::from_parts(tokenizer, Some(template.into()), Some(1), vec![2, 0, 2], true).unwrap();
    assert_eq!(tok.eos_token_ids(), &[2, 0]);
    assert_eq!(
        tok.apply_chat_template(&[ChatMessage::new("user", "hi")], true)
            .unwrap(),
        "<|im_start|>hi<|im_end|>"
    );
    assert_eq!(tok.encode("hi", true).unwrap()[0], 1);
    assert_ne!(tok.encode("hi", false).unwrap()[0], 1);
}

#[test]
fn raise_exception_and_runtime_errors() {
    let template = ChatTemplate::new(
        "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('Unknown role: ' + m.role) }}{% endif %}{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let special = BTreeMap::new();
    let err = template
        .render(&[ChatMessage::new("robot", "beep")], false, &special)
        .unwrap_err();
    assert_eq!(tokenizer_message(err), "Unknown role: robot");
    assert_eq!(
        template
            .render(&[ChatMessage::new("user", "ok")], false, &special)
            .unwrap(),
        "ok"
    );

    // An engine error (here: an attribute of an undefined value) is reported as a render failure.
    let template = ChatTemplate::new("{{ nothing.here }}").unwrap();
    let msg = tokenizer_message(template.render(&[], false, &special).unwrap_err());
    assert!(msg.starts_with("rendering the chat template failed"), "{msg}");
}

#[test]
fn python_methods_and_helpers() {
    let special = BTreeMap::from([("bos_token".to_string(), "<s>".to_string())]);
    let render = |src: &str, messages: &[ChatMessage]| {
        ChatTemplate::new(src)
            .unwrap()
            .render(messages, true, &special)
            .unwrap()
    };
    let msgs = [ChatMessage::new("user", "  Hello, World  ")];
    assert_eq!(
        render("{{ messages[0].content.strip().lower() }}", &msgs),
        "hello, world"
    );
    assert_eq!(
        render("{{ messages[0]['content'].split(',')[1].rstrip() }}", &msgs),
        " World"
    );
    assert_eq!(
        render("{{ messages[0].content.strip().startswith('Hello') }}", &msgs),
        "True"
    );
    assert_eq!(
        render(
            "{% for k, v in messages[0].items() %}{{ k }}={{ v|trim }};{% endfor %}",
            &msgs
        ),
        "role=user;content=Hello, World;"
    );
    assert_eq!(
        render(
            "{{ 'content' in messages[0] }} {{ messages[0].tool_calls is defined }}",
            &msgs
        ),
        "True False"
    );
    assert_eq!(
        render(
            "{{ bos_token }}{{ eos_token is defined }}{{ add_generation_prompt }}",
            &msgs
        ),
        "<s>FalseTrue"
    );
    assert_eq!(
        render("{{ {'a': [1, 2.0, none]} | tojson }}", &msgs),
        r#"{"a": [1, 2.0, null]}"#
    );
    assert_eq!(render("{{ '<&>' | tojson }}", &msgs), r#""<&>""#);
    assert_eq!(
        render("{{ 'é😀' | tojson(ensure_ascii=true) }}", &msgs),
        r#""\u00e9\ud83d\ude00""#
    );
    assert_eq!(
        render("{{ [] | tojson(indent=2) }}{{ {} | tojson }}", &msgs),
        "[]{}"
    );
    assert_eq!(render("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}", &msgs), "1");
    assert_eq!(
        render("{{ not foo is defined }} {{ messages[0] is mapping }} {{ messages[0].content is string }} {{ messages is sequence }}", &msgs),
        "True True True True"
    );
    assert_eq!(
        render(
            "{{ messages[-1]['role'] }} {{ messages[::-1] | length }} {{ (messages | first).role }}",
            &msgs
        ),
        "user 1 user"
    );
    let year = render("{{ strftime_now('%Y') }}", &msgs);
    assert!(year.len() == 4 && year.starts_with("20"), "{year}");
}

#[test]
fn incremental_decoder_holds_partial_characters() {
    let tok = TextTokenizer::from_hf_dir(&tiny_dir()).unwrap();
    let text = "Café crème 日本 🦀 ok";
    let ids = tok.encode(text, false).unwrap();
    // The crab is four byte tokens in this tiny vocabulary.
    let crab = tok.encode("🦀", false).unwrap();
    assert_eq!(crab.len(), 4, "{crab:?}");

    let mut decoder = tok.incremental_decoder(false);
    let mut pieces = Vec::new();
    let mut held = 0;
    for &id in &ids {
        match decoder.push(id).unwrap() {
            Some(piece) => {
                assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
                pieces.push(piece);
            }
            None => held += 1,
        }
    }
    assert!(held >= 3, "the partial crab bytes must be held back ({held})");
    if let Some(rest) = decoder.finish().unwrap() {
        pieces.push(rest);
    }
    assert_eq!(pieces.concat(), text);
    assert_eq!(pieces.concat(), tok.decode(&ids, false).unwrap());

    // Pushing only the crab's bytes: nothing until the last one.
    let mut decoder = tok.incremental_decoder(false);
    let outputs: Vec<Option<String>> = crab.iter().map(|&id| decoder.push(id).unwrap()).collect();
    assert_eq!(outputs, vec![None, None, None, Some("🦀".to_string())]);
    assert_eq!(decoder.finish().unwrap(), None);

    // An incomplete character at the end comes out on finish, as U+FFFD.
    let mut decoder = tok.incremental_decoder(false);
    assert_eq!(decoder.push(crab[0]).unwrap(), None);
    assert_eq!(decoder.finish().unwrap(), Some("\u{FFFD}".to_string()));
}

#[test]
fn incremental_decoder_special_tokens_and_prompt_context() {
    let tok = TextTokenizer::from_hf_dir(&tiny_dir()).unwrap();
    let ids = tok
        .encode("<|im_start|>assistant\nHi there!<|im_end|>", false)
        .unwrap();
    for skip in [false, true] {
        let mut decoder = IncrementalDecoder::new(&tok, skip);
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&decoder.push(id).unwrap().unwrap_or_default());
        }
        out.push_str(&decoder.finish().unwrap().unwrap_or_default());
        assert_eq!(out, tok.decode(&ids, skip).unwrap(), "skip={skip}");
    }

    // With the prompt as context, only the generated text comes out.
    let prompt = tok.encode("Hello world! How are", false).unwrap();
    let generated = tok.encode(" you today?", false).unwrap();
    let mut decoder = IncrementalDecoder::with_prompt(&tok, &prompt, false);
    let mut out = String::new();
    for &id in &generated {
        out.push_str(&decoder.push(id).unwrap().unwrap_or_default());
    }
    out.push_str(&decoder.finish().unwrap().unwrap_or_default());
    assert_eq!(out, " you today?");
}
