//! Chat templates: Hugging Face's Jinja chat templates rendered with minijinja, set up to
//! render what transformers renders.
//!
//! transformers compiles templates in a sandboxed jinja2 environment with `trim_blocks` and
//! `lstrip_blocks` on (and jinja2's default of dropping one trailing newline), a `tojson`
//! filter that neither escapes HTML nor sorts keys, and the globals `raise_exception` and
//! `strftime_now`. The context holds `messages`, `tools` and `documents` (both `None` here),
//! `add_generation_prompt` and the special tokens (`bos_token`, `eos_token`, ...). Python
//! string and dict methods (`.strip()`, `.split()`, `.items()`, ...) come from
//! minijinja-contrib's pycompat layer, and values are printed the way Python prints them
//! (`True`, `None`, `['a', 'b']`).
//!
//! Differences left: dict literals written in a template iterate in sorted key order (message
//! dicts keep their `role`, `content` order), `{% break %}`/`{% continue %}` need minijinja's
//! `loop_controls` feature, and `strftime_now` formats the current time in UTC.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, Rest, Value, ValueKind};
use minijinja::{Environment, ErrorKind, Output, State};

use super::ChatMessage;
use crate::error::{Error, Result};

/// The name the template is registered under. It has no file extension, so minijinja never
/// turns on HTML auto-escaping for it.
const TEMPLATE_NAME: &str = "chat_template";

/// A chat template compiled once, rendered many times. `Send + Sync`.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`. A template that does not parse is an [`Error::Tokenizer`] naming
    /// the problem and its line.
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|err| Error::Tokenizer(format!("invalid chat template: {}", describe(&err))))?;
        Ok(ChatTemplate { env })
    }

    /// Renders the template for `messages`. `special_tokens` maps names such as `bos_token`
    /// to their text; a name left out is undefined in the template, as in transformers.
    ///
    /// A `raise_exception(msg)` in the template comes back as `Error::Tokenizer(msg)`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        special_tokens: &BTreeMap<String, String>,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|err| Error::Tokenizer(format!("chat template: {}", describe(&err))))?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| Value::from_object(MessageObject(m.clone())))
            .collect();
        let mut ctx: BTreeMap<String, Value> = special_tokens
            .iter()
            .map(|(name, text)| (name.clone(), Value::from(text.as_str())))
            .collect();
        ctx.insert("messages".into(), Value::from(messages));
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        template.render(Value::from_iter(ctx)).map_err(render_error)
    }
}

/// One message as the template sees it: a dict with `role` then `content`, in that order
/// (as Python's dicts keep them), so `message | tojson` and `message.items()` match.
#[derive(Debug)]
struct MessageObject(ChatMessage);

impl Object for MessageObject {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.0.role.as_str())),
            "content" => Some(Value::from(self.0.content.as_str())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

/// The message of a `raise_exception` call, carried as the source of the minijinja error so
/// it can be told apart from the engine's own errors.
#[derive(Debug)]
struct TemplateException(String);

impl std::fmt::Display for TemplateException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TemplateException {}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(TemplateException(message)),
    )
}

/// One line for a minijinja error: its kind, detail and where in the template.
fn describe(err: &minijinja::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        let _ = write!(text, ": {inner}");
        source = inner.source();
    }
    text
}

fn render_error(err: minijinja::Error) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = source {
        if let Some(raised) = e.downcast_ref::<TemplateException>() {
            return Error::Tokenizer(raised.0.clone());
        }
        source = e.source();
    }
    Error::Tokenizer(format!("rendering the chat template failed: {}", describe(&err)))
}

// ---------------------------------------------------------------------------------------------
// Printing values the way Python does.

/// `{{ value }}`: strings as they are, everything else as Python's `str()` would print it.
fn python_formatter(
    out: &mut Output,
    state: &State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::None
        | ValueKind::Bool
        | ValueKind::Number
        | ValueKind::Seq
        | ValueKind::Map
        | ValueKind::Iterable => {
            let mut text = String::new();
            py_repr(value, &mut text)?;
            out.write_str(&text)
                .map_err(|_| minijinja::Error::new(ErrorKind::WriteFailure, "formatting failed"))
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// Python's `repr()` of a template value, written to `out`.
fn py_repr(value: &Value, out: &mut String) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::Undefined => out.push_str("Undefined"),
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => out.push_str(&number_text(value, false)),
        ValueKind::String => py_str_repr(value.as_str().unwrap_or_default(), out),
        ValueKind::Bytes => {
            out.push_str("b'");
            for &b in value.as_bytes().unwrap_or_default() {
                match b {
                    b'\\' => out.push_str("\\\\"),
                    b'\'' => out.push_str("\\'"),
                    b'\n' => out.push_str("\\n"),
                    b'\r' => out.push_str("\\r"),
                    b'\t' => out.push_str("\\t"),
                    0x20..=0x7e => out.push(b as char),
                    _ => {
                        let _ = write!(out, "\\x{b:02x}");
                    }
                }
            }
            out.push('\'');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&item, out)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&key, out)?;
                out.push_str(": ");
                py_repr(&value.get_item(&key)?, out)?;
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
    Ok(())
}

/// Python's `repr()` of a string: single quotes unless the text holds a single quote and no
/// double quote.
fn py_str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// A number as Python prints it: integers in full, floats as `repr(float)` (`1.0`, `1e+16`,
/// `1.5e-05`). With `json`, the non-finite floats are spelled as `json.dumps` spells them.
fn number_text(value: &Value, json: bool) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    match f64::try_from(value.clone()) {
        Ok(f) => py_float_repr(f, json),
        Err(_) => value.to_string(),
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip, positional for exponents
/// from -4 to 15, scientific with a signed two-digit exponent otherwise.
pub(crate) fn py_float_repr(f: f64, json: bool) -> String {
    if f.is_nan() {
        return if json { "NaN" } else { "nan" }.to_string();
    }
    if f.is_infinite() {
        let text = if json { "Infinity" } else { "inf" };
        return if f < 0.0 {
            format!("-{text}")
        } else {
            text.to_string()
        };
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("LowerExp always writes an exponent");
    let exp: i32 = exp.parse().expect("LowerExp writes a decimal exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let mut out = String::from(sign);
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.push_str(&digits);
                out.extend(std::iter::repeat_n('0', int_len - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        } else {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            out.push_str(&digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// tojson, as transformers defines it: json.dumps(x, ensure_ascii=False, indent=None,
// separators=None, sort_keys=False), with no HTML escaping.

struct JsonOptions {
    ensure_ascii: bool,
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
}

fn tojson(value: Value, args: Rest<Value>) -> std::result::Result<Value, minijinja::Error> {
    let mut positional: Vec<Value> = args.0;
    let kwargs = match positional.last() {
        Some(last) if last.is_kwargs() => Some(Kwargs::try_from(positional.pop().expect("last exists"))?),
        _ => None,
    };
    if positional.len() > 4 {
        return Err(minijinja::Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments",
        ));
    }
    // json.dumps's keyword order after the value: ensure_ascii, indent, separators, sort_keys.
    let names = ["ensure_ascii", "indent", "separators", "sort_keys"];
    let mut given: [Value; 4] = Default::default();
    for (slot, arg) in given.iter_mut().zip(positional) {
        *slot = arg;
    }
    if let Some(kwargs) = &kwargs {
        for (slot, name) in given.iter_mut().zip(names) {
            if kwargs.has(name) {
                *slot = kwargs.get::<Value>(name)?;
            }
        }
        kwargs.assert_all_used()?;
    }
    let [ensure_ascii, indent, separators, sort_keys] = given;
    let indent = match indent.kind() {
        ValueKind::Undefined | ValueKind::None => None,
        ValueKind::Number => {
            let n = indent.as_i64().ok_or_else(|| {
                minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                )
            })?;
            Some(" ".repeat(n.max(0) as usize))
        }
        ValueKind::String => Some(indent.as_str().unwrap_or_default().to_string()),
        _ => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: indent must be an integer or a string",
            ))
        }
    };
    let (item_separator, key_separator) = match separators.kind() {
        ValueKind::Undefined | ValueKind::None => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
        _ => {
            let parts: Vec<Value> = separators.try_iter()?.collect();
            match parts.as_slice() {
                [item, key] if item.as_str().is_some() && key.as_str().is_some() => (
                    item.as_str().unwrap_or_default().to_string(),
                    key.as_str().unwrap_or_default().to_string(),
                ),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ))
                }
            }
        }
    };
    let options = JsonOptions {
        ensure_ascii: ensure_ascii.is_true(),
        indent,
        item_separator,
        key_separator,
        sort_keys: sort_keys.is_true(),
    };
    let mut out = String::new();
    write_json(&value, &options, 0, &mut out)?;
    Ok(Value::from(out))
}

fn write_json(
    value: &Value,
    opts: &JsonOptions,
    level: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&number_text(value, true)),
        ValueKind::String => write_json_str(value.as_str().unwrap_or_default(), opts.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_separator);
                }
                json_newline(opts, level + 1, out);
                write_json(item, opts, level + 1, out)?;
            }
            json_newline(opts, level, out);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let key_text = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_string(),
                    ValueKind::Number => number_text(&key, true),
                    ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
                    ValueKind::None => "null".to_string(),
                    other => {
                        return Err(minijinja::Error::new(
                            ErrorKind::InvalidOperation,
                            format!("tojson: keys must be str, int, float, bool or None, not {other}"),
                        ))
                    }
                };
                entries.push((key_text, item));
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_separator);
                }
                json_newline(opts, level + 1, out);
                write_json_str(key, opts.ensure_ascii, out);
                out.push_str(&opts.key_separator);
                write_json(item, opts, level + 1, out)?;
            }
            json_newline(opts, level, out);
            out.push('}');
        }
        other => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a value of type {other} is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

fn json_newline(opts: &JsonOptions, level: usize, out: &mut String) {
    if let Some(indent) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(indent);
        }
    }
}

/// A JSON string as Python's `json.dumps` writes it.
fn write_json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

// ---------------------------------------------------------------------------------------------
// strftime_now

fn strftime_now(format: String) -> String {
    let secs = match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    strftime_utc(&format, secs)
}

const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Year, month (1-12) and day (1-31) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

/// Formats the UTC time `secs` after the epoch with C `strftime` directives (the glibc
/// `%-d` style flag that drops padding included). Unknown directives are kept as written.
pub(crate) fn strftime_utc(format: &str, secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (hour, minute, second) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday; 0 = Monday
    const CUMULATIVE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUMULATIVE[month as usize - 1] + day + u32::from(month > 2 && is_leap(year));
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let Some(spec) = chars.next() else {
            out.push('%');
            if unpadded {
                out.push('-');
            }
            break;
        };
        let num = |out: &mut String, v: i64, width: usize| {
            if unpadded {
                let _ = write!(out, "{v}");
            } else {
                let _ = write!(out, "{v:0width$}");
            }
        };
        match spec {
            'Y' => {
                let _ = write!(out, "{year}");
            }
            'y' => num(&mut out, year.rem_euclid(100), 2),
            'C' => num(&mut out, year.div_euclid(100), 2),
            'm' => num(&mut out, month.into(), 2),
            'd' => num(&mut out, day.into(), 2),
            'e' => {
                if unpadded {
                    let _ = write!(out, "{day}");
                } else {
                    let _ = write!(out, "{day:>2}");
                }
            }
            'j' => num(&mut out, yday.into(), 3),
            'H' => num(&mut out, hour, 2),
            'I' => num(&mut out, hour12, 2),
            'M' => num(&mut out, minute, 2),
            'S' => num(&mut out, second, 2),
            'p' => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            'A' => out.push_str(WEEKDAYS[weekday]),
            'a' => out.push_str(&WEEKDAYS[weekday][..3]),
            'B' => out.push_str(MONTHS[month as usize - 1]),
            'b' | 'h' => out.push_str(&MONTHS[month as usize - 1][..3]),
            'u' => {
                let _ = write!(out, "{}", weekday + 1);
            }
            'w' => {
                let _ = write!(out, "{}", (weekday + 1) % 7);
            }
            'F' => {
                let _ = write!(out, "{year}-{month:02}-{day:02}");
            }
            'T' => {
                let _ = write!(out, "{hour:02}:{minute:02}:{second:02}");
            }
            'R' => {
                let _ = write!(out, "{hour:02}:{minute:02}");
            }
            'D' => {
                let _ = write!(out, "{month:02}/{day:02}/{:02}", year.rem_euclid(100));
            }
            'Z' => out.push_str("UTC"),
            'z' => out.push_str("+0000"),
            'n' => out.push('\n'),
            't' => out.push('\t'),
            '%' => out.push('%'),
            other => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
        }
    }
    out
}
