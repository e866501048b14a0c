//! The HTTP layer's one error type: every failure an endpoint can answer with, its status code
//! (decided here and nowhere else), and its two JSON shapes: SGLang's native
//! `{"error": {"message": ...}}` and OpenAI's `{"error": {"message", "type", "param", "code"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::engine::request::EngineError;

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or asks for something impossible.
    #[error("{message}")]
    BadRequest {
        /// What is wrong, naming the field.
        message: String,
        /// The offending field, when there is one.
        param: Option<String>,
    },
    /// The OpenAI `model` names neither the base model nor a loaded adapter.
    #[error("The model {0:?} does not exist")]
    ModelNotFound(String),
    /// No such endpoint.
    #[error("no endpoint {0}")]
    NotFound(String),
    /// The endpoint exists but not for this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The body is over the size limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// Missing or wrong API key.
    #[error("a valid API key is required: send `Authorization: Bearer <key>`")]
    Unauthorized,
    /// Too many requests waiting.
    #[error("server overloaded: {0}")]
    Overloaded(String),
    /// The engine is not (or no longer) able to serve.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure on our side.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 about field `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    /// A 400 that concerns no single field.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: None,
        }
    }

    /// The HTTP status, decided here for every endpoint.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Overloaded(_) | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type` field.
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. }
            | ApiError::ModelNotFound(_)
            | ApiError::NotFound(_)
            | ApiError::MethodNotAllowed
            | ApiError::PayloadTooLarge(_) => "invalid_request_error",
            ApiError::Unauthorized => "authentication_error",
            ApiError::Overloaded(_) | ApiError::Unavailable(_) => "server_error",
            ApiError::Internal(_) => "server_error",
        }
    }

    /// OpenAI's `param` and `code` fields.
    fn param_and_code(&self) -> (Option<&str>, Value) {
        match self {
            ApiError::BadRequest { param, .. } => (param.as_deref(), Value::Null),
            ApiError::ModelNotFound(_) => (Some("model"), json!("model_not_found")),
            ApiError::Unauthorized => (None, json!("invalid_api_key")),
            _ => (None, Value::Null),
        }
    }

    /// The body in OpenAI's shape.
    pub fn openai_body(&self) -> Value {
        let (param, code) = self.param_and_code();
        json!({"error": {
            "message": self.to_string(),
            "type": self.error_type(),
            "param": param,
            "code": code,
        }})
    }

    /// The body in SGLang's native shape.
    pub fn native_body(&self) -> Value {
        json!({"error": {"message": self.to_string()}})
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidRequest(m) => ApiError::bad_request(m),
            EngineError::AdapterNotFound(_) => ApiError::invalid("lora_path", e.to_string()),
            EngineError::Adapter(m) => ApiError::bad_request(m),
            EngineError::Overloaded(m) => ApiError::Overloaded(m),
            EngineError::ShuttingDown => ApiError::Unavailable(e.to_string()),
        }
    }
}

/// Native endpoints answer errors in SGLang's shape.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), Json(self.native_body())).into_response()
    }
}

/// An [`ApiError`] answered in OpenAI's shape (the `/v1` endpoints).
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        OpenAiError(e)
    }
}

impl From<EngineError> for OpenAiError {
    fn from(e: EngineError) -> Self {
        OpenAiError(e.into())
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        (self.0.status(), Json(self.0.openai_body())).into_response()
    }
}

/// The response for `err` in the shape that `path`'s endpoint family uses.
pub fn error_for_path(path: &str, err: ApiError) -> Response {
    if path.starts_with("/v1/") {
        OpenAiError(err).into_response()
    } else {
        err.into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_map_to_statuses_in_one_place() {
        let cases = [
            (EngineError::InvalidRequest("x".into()), 400),
            (EngineError::AdapterNotFound("a".into()), 400),
            (EngineError::Overloaded("x".into()), 503),
            (EngineError::ShuttingDown, 503),
        ];
        for (e, status) in cases {
            assert_eq!(ApiError::from(e).status().as_u16(), status);
        }
    }

    #[test]
    fn openai_shape_has_all_four_fields() {
        let body = ApiError::ModelNotFound("m".into()).openai_body();
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["param"], "model");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(body["error"]["message"].as_str().unwrap().contains("\"m\""));
        let body = ApiError::bad_request("nope").native_body();
        assert_eq!(body, json!({"error": {"message": "nope"}}));
    }
}
