//! Reading request bodies: size and JSON syntax failures become [`ApiError`]s, and [`Fields`]
//! reads a JSON object field by field, so that every type error names the field
//! (`sampling_params.temperature`) and says what it should be.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde_json::{Map, Value};

use super::error::ApiError;

/// Largest request body accepted (bytes).
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// The body as a JSON object, or the error to answer with.
pub fn json_object(body: Result<Bytes, BytesRejection>) -> Result<Map<String, Value>, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!(
                "the request body is larger than {} MiB",
                MAX_BODY_BYTES / (1024 * 1024)
            ))
        } else {
            ApiError::bad_request(format!(
                "could not read the request body: {}",
                rejection.body_text()
            ))
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "the request body is empty: send a JSON object",
        ));
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(ApiError::bad_request(format!(
            "the request body must be a JSON object, not {}",
            describe(&other)
        ))),
        Err(e) => Err(ApiError::bad_request(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// A short description of a JSON value for error messages.
pub fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) if s.chars().count() > 40 => "a string".into(),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// A type error about the value at `path`.
pub fn type_error(path: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid(
        path,
        format!("`{path}` must be {expected}, not {}", describe(got)),
    )
}

/// Conversion of one JSON value, with errors naming `path`.
pub trait FromJson: Sized {
    /// Converts `v`, found at `path`.
    fn from_json(v: Value, path: &str) -> Result<Self, ApiError>;
}

impl FromJson for bool {
    fn from_json(v: Value, path: &str) -> Result<Self, ApiError> {
        v.as_bool().ok_or_else(|| type_error(path, "true or false", &v))
    }
}

impl FromJson for f64 {
    fn from_json(v: Value, path: &str) -> Result<Self, ApiError> {
        v.as_f64().ok_or_else(|| type_error(path, "a number", &v))
    }
}

impl FromJson for i64 {
    fn from_json(v: Value, path: &str) -> Result<Self, ApiError> {
        v.as_i64().ok_or_else(|| type_error(path, "an integer", &v))
    }
}

impl FromJson for u64 {
    fn from_json(v: Value, path: &str) -> Result<Self, ApiError> {
        v.as_u64()
            .ok_or_else(|| type_error(path, "a non-negative integer", &v))
    }
}

impl FromJson for usize {
    fn from_json(v: Value, path: &str) -> Result<Self, ApiError> {
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| type_error(path, "a non-negative integer", &v))
    }
}

impl FromJson for u32 {
    fn from_json(v: Value, path: &str) -> Result<Self, ApiError> {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| type_error(path, "a token id (a non-negative integer)", &v))
    }
}

impl FromJson for String {
    fn from_json(v: Value, path: &str) -> Result<Self, ApiError> {
        match v {
            Value::String(s) => Ok(s),
            other => Err(type_error(path, "a string", &other)),
        }
    }
}

impl FromJson for Value {
    fn from_json(v: Value, _path: &str) -> Result<Self, ApiError> {
        Ok(v)
    }
}

impl<T: FromJson> FromJson for Vec<T> {
    fn from_json(v: Value, path: &str) -> Result<Self, ApiError> {
        match v {
            Value::Array(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, item)| T::from_json(item, &format!("{path}[{i}]")))
                .collect(),
            other => Err(type_error(path, "a list", &other)),
        }
    }
}

/// A string or a list of strings (`stop`, `text`, ...), as a list.
pub struct StringOrList(pub Vec<String>);

impl FromJson for StringOrList {
    fn from_json(v: Value, path: &str) -> Result<Self, ApiError> {
        match v {
            Value::String(s) => Ok(StringOrList(vec![s])),
            Value::Array(_) => Ok(StringOrList(Vec::<String>::from_json(v, path)?)),
            other => Err(type_error(path, "a string or a list of strings", &other)),
        }
    }
}

/// A JSON object read field by field. `null` counts as absent, as in SGLang's Python models.
pub struct Fields {
    map: Map<String, Value>,
    prefix: String,
}

impl Fields {
    /// The object `map`, found at `prefix` (empty for the body itself).
    pub fn new(map: Map<String, Value>, prefix: &str) -> Self {
        Fields {
            map,
            prefix: prefix.to_string(),
        }
    }

    /// The full path of field `key`.
    pub fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    /// Removes field `key`; `None` when absent or null.
    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    /// Field `key` converted to `T`.
    pub fn get<T: FromJson>(&mut self, key: &str) -> Result<Option<T>, ApiError> {
        let path = self.path(key);
        self.take(key).map(|v| T::from_json(v, &path)).transpose()
    }

    /// Field `key` as a nested object.
    pub fn object(&mut self, key: &str) -> Result<Option<Fields>, ApiError> {
        let path = self.path(key);
        match self.take(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Fields::new(map, &path))),
            Some(other) => Err(type_error(&path, "an object", &other)),
        }
    }

    /// Whether field `key` is present and not null.
    pub fn has(&self, key: &str) -> bool {
        self.map.get(key).is_some_and(|v| !v.is_null())
    }

    /// Fails on a field nobody read: a misspelt parameter must not be silently ignored.
    pub fn reject_unknown(self) -> Result<(), ApiError> {
        match self.map.into_iter().find(|(_, v)| !v.is_null()) {
            None => Ok(()),
            Some((key, _)) => {
                let path = if self.prefix.is_empty() {
                    key
                } else {
                    format!("{}.{key}", self.prefix)
                };
                Err(ApiError::invalid(
                    &path,
                    format!("unknown or unsupported parameter `{path}`"),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(v: Value) -> Fields {
        match v {
            Value::Object(m) => Fields::new(m, ""),
            _ => unreachable!(),
        }
    }

    #[test]
    fn type_errors_name_the_field_and_the_expectation() {
        let mut f = fields(json!({"sampling_params": {"temperature": "hot", "stop": [1]}}));
        let mut sp = f.object("sampling_params").unwrap().unwrap();
        let e = sp.get::<f64>("temperature").unwrap_err().to_string();
        assert_eq!(
            e,
            "`sampling_params.temperature` must be a number, not the string \"hot\""
        );
        let e = sp.get::<StringOrList>("stop").err().unwrap().to_string();
        assert!(e.contains("`sampling_params.stop[0]` must be a string"), "{e}");
    }

    #[test]
    fn nulls_are_absent_and_leftovers_are_refused() {
        let mut f = fields(json!({"a": null, "b": 1, "typo": 2}));
        assert_eq!(f.get::<u64>("a").unwrap(), None);
        assert_eq!(f.get::<u64>("b").unwrap(), Some(1));
        let e = f.reject_unknown().unwrap_err().to_string();
        assert!(e.contains("`typo`"), "{e}");
        assert!(fields(json!({"x": null})).reject_unknown().is_ok());
    }

    #[test]
    fn bodies_that_are_not_objects_are_refused() {
        let e = json_object(Ok(Bytes::from_static(b"{\"a\": "))).unwrap_err();
        assert!(e.to_string().contains("not valid JSON"), "{e}");
        let e = json_object(Ok(Bytes::from_static(b"[1]"))).unwrap_err();
        assert!(e.to_string().contains("a list"), "{e}");
        let e = json_object(Ok(Bytes::from_static(b"  "))).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let deep = "[".repeat(1000);
        assert!(json_object(Ok(Bytes::from(deep))).is_err());
    }

    #[test]
    fn integers_refuse_negatives_and_fractions() {
        let mut f = fields(json!({"n": -1, "m": 1.5, "id": 4294967296u64}));
        assert!(f.get::<u64>("n").is_err());
        assert!(f.get::<usize>("m").is_err());
        assert!(f.get::<u32>("id").is_err());
    }
}
