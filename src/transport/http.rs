//! Small helpers for JSON HTTP responses.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::{Value, json};

/// Every response body herald sends.
pub type Body = Full<Bytes>;

/// A JSON response.
pub fn json(status: StatusCode, body: Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A JSON error `{"error": code, "message": message}`.
pub fn error(status: StatusCode, code: &str, message: impl std::fmt::Display) -> Response<Body> {
    json(
        status,
        json!({ "error": code, "message": message.to_string() }),
    )
}
